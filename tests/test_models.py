"""Detector models: shapes, named variants, and the two depthwise implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models import MODELS, create_model
from jaxcomp.models.centernet import normalize_images
from jaxcomp.models.mobilenet_v2 import make_divisible
from jaxcomp.ops import (
    check_depthwise_impl,
    depthwise_conv3x3_grouped,
    depthwise_conv3x3_shifted,
)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_depthwise_implementations_agree_forward_and_gradients(stride, size):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, *size, 5))
    kernel = jax.random.normal(keys[1], (3, 3, 1, 5))
    grouped = depthwise_conv3x3_grouped(x, kernel, stride)
    shifted = depthwise_conv3x3_shifted(x, kernel, stride)
    assert grouped.shape == shifted.shape
    np.testing.assert_allclose(shifted, grouped, rtol=1e-5, atol=1e-5)

    cotangent = jax.random.normal(keys[2], grouped.shape)

    def vjp(fn):
        return jax.grad(lambda x, k: jnp.sum(fn(x, k, stride) * cotangent), argnums=(0, 1))(
            x, kernel
        )

    for expected, actual in zip(
        vjp(depthwise_conv3x3_grouped), vjp(depthwise_conv3x3_shifted), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_unknown_depthwise_impl_is_rejected():
    assert check_depthwise_impl("auto") == "auto"
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        check_depthwise_impl("fast")
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        create_model("centernet_tiny", num_classes=3, depthwise_impl="fast")


def test_tiny_detector_outputs_and_impls_share_parameters():
    images = jax.random.randint(jax.random.key(1), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    grouped = create_model("centernet_tiny", num_classes=7, depthwise_impl="grouped")
    shifted = create_model("centernet_tiny", num_classes=7, depthwise_impl="shifted")
    variables = jax.jit(grouped.init)(jax.random.key(0), images)
    outputs = jax.jit(grouped.apply)(variables, images)
    assert {k: v.shape for k, v in outputs.items()} == {
        "heatmap": (2, 16, 16, 7),
        "size": (2, 16, 16, 2),
        "offset": (2, 16, 16, 2),
    }
    # The heatmap starts near sigmoid(-2.19) ~ 0.1 everywhere, as CenterNet initializes it.
    assert abs(float(jax.nn.sigmoid(outputs["heatmap"]).mean()) - 0.1) < 0.02
    other = jax.jit(shifted.apply)(variables, images)
    for name in outputs:
        np.testing.assert_allclose(other[name], outputs[name], rtol=1e-4, atol=1e-4)


def test_variants_are_ordered_by_size():
    counts = {}
    for name in MODELS:
        shapes = jax.eval_shape(
            create_model(name, num_classes=13).init,
            jax.random.key(0),
            jnp.zeros((1, 64, 64, 3), jnp.uint8),
        )
        counts[name] = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))
    assert counts["centernet_tiny"] < counts["centernet_student"] < counts["centernet_teacher"]
    # The width axis: x0.25, x0.35, x0.5 (the student), x0.75.
    widths = ["_w025", "_w035", "", "_w075"]
    sizes = [counts[f"centernet_student{width}"] for width in widths]
    assert sizes == sorted(set(sizes))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        create_model("resnet", num_classes=3)
    model = create_model("centernet_tiny", num_classes=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 60, 64, 3)))


def _torchvision_make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible` (torchvision/models/_utils.py), transcribed."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    # Make sure that round down does not go down by more than 10%.
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@pytest.mark.parametrize("divisor", [4, 8, 16])
def test_make_divisible_equals_torchvision_rule(divisor):
    # MobileNetV2's channel counts at its usual widths, and a dense sweep with fractions.
    widths = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
    channels = (16, 24, 32, 64, 96, 160, 320, 1280)
    values = [c * w for c in channels for w in widths] + list(np.linspace(0.5, 400.0, 2001))
    got = [make_divisible(value, divisor) for value in values]
    assert got == [_torchvision_make_divisible(value, divisor) for value in values]
    # The sweep reaches the 10% rule, not only plain rounding.
    rounded = [max(divisor, int(v + divisor / 2) // divisor * divisor) for v in values]
    assert any(r < 0.9 * v for r, v in zip(rounded, values, strict=True))


def test_normalize_images_equals_torchvision_to_tensor_and_normalize():
    # transforms.ToTensor() (x / 255) then transforms.Normalize(mean, std), ImageNet's.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    values = np.arange(256)
    # Every value in every channel, in a different order per channel (a swap would show).
    pixels = np.stack([values, 255 - values, values * 7 % 256], -1).reshape(1, 16, 16, 3)
    expected = (pixels / 255.0 - mean) / std
    for images in (pixels.astype(np.uint8), pixels.astype(np.float32)):
        normalized = normalize_images(jnp.asarray(images))
        assert normalized.dtype == jnp.float32
        np.testing.assert_allclose(normalized, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_keeps_float32_parameters_statistics_outputs_and_gradients():
    images = jax.random.randint(jax.random.key(1), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    full = create_model("centernet_tiny", num_classes=3)
    half = create_model("centernet_tiny", num_classes=3, dtype="bfloat16")
    variables = jax.jit(full.init)(jax.random.key(0), images)
    assert jax.tree.structure(jax.eval_shape(half.init, jax.random.key(0), images)) == (
        jax.tree.structure(variables)
    )

    def loss_and_grads(model):
        def loss(params):
            outputs, updates = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return sum(jnp.mean(v**2) for v in outputs.values()), (outputs, updates)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (_, (outputs, _)), _ = loss_and_grads(full)
    (_, (half_outputs, half_updates)), half_grads = loss_and_grads(half)
    for tree in (half_outputs, half_updates, half_grads):
        leaves = jax.tree.leaves(tree)
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(half_grads))
    # bfloat16 keeps 8 significant bits. The randomly initialised tiny model amplifies
    # that much (perturbing its float32 parameters by 0.4% moves its gradients by ~75%),
    # so values are compared here on the heatmap logits only; the layers' bfloat16
    # gradients are checked one by one in tests/test_layers.py.
    error = jnp.linalg.norm(half_outputs["heatmap"] - outputs["heatmap"])
    assert float(error / jnp.linalg.norm(outputs["heatmap"])) < 1e-2


def test_unknown_compute_dtype_is_rejected():
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\)"):
        create_model("centernet_tiny", num_classes=3, dtype="float16")

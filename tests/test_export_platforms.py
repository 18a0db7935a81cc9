"""A train step exported from this CPU host holds each platform's kernels.

The step is the real thing, small: the tiny detector, `detection_loss`,
`jax.grad` and an AdamW update. Exporting it (`jax.export`, no device needed)
for cpu, tpu and cuda lowers `jax.lax.platform_dependent` for that platform
only, so the program text shows which kernels each platform would run.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxcomp.detection import detection_loss
from jaxcomp.models import create_model
from jaxcomp.quant import qat

IMAGE_SIZE, NUM_CLASSES, MAX_OBJECTS, BATCH = 64, 3, 4, 2


def _batch_shapes() -> dict[str, jax.ShapeDtypeStruct]:
    cells = IMAGE_SIZE // 4
    f32, i32 = jnp.float32, jnp.int32
    return {
        "image": jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8),
        "heatmap": jax.ShapeDtypeStruct((BATCH, cells, cells, NUM_CLASSES), f32),
        "center_index": jax.ShapeDtypeStruct((BATCH, MAX_OBJECTS), i32),
        "size": jax.ShapeDtypeStruct((BATCH, MAX_OBJECTS, 2), f32),
        "offset": jax.ShapeDtypeStruct((BATCH, MAX_OBJECTS, 2), f32),
        "target_mask": jax.ShapeDtypeStruct((BATCH, MAX_OBJECTS), f32),
    }


def _exported_train_step(platform: str, depthwise_impl: str = "auto", dtype: str = "float32"):
    model = create_model(
        "centernet_tiny", num_classes=NUM_CLASSES, depthwise_impl=depthwise_impl, dtype=dtype
    )
    batch = _batch_shapes()
    variables = jax.eval_shape(model.init, jax.random.key(0), batch["image"])
    optimizer = optax.adamw(1e-3)
    opt_state = jax.eval_shape(optimizer.init, variables["params"])

    def train_step(params, batch_stats, opt_state, batch):
        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                batch["image"],
                train=True,
                mutable=["batch_stats"],
            )
            return detection_loss(outputs, batch)[0], updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

    exported = jax.export.export(jax.jit(train_step), platforms=[platform])(
        variables["params"], variables["batch_stats"], opt_state, batch
    )
    depthwise_layers = sum(
        leaf.shape[:3] == (3, 3, 1) for leaf in jax.tree.leaves(variables["params"])
    )
    return exported, depthwise_layers


def _products(text: str) -> list[tuple[str, str, str, str]]:
    """(op, lhs, rhs, result element types) of every convolution and dot in the program."""
    pattern = (
        r"stablehlo\.(convolution|dot_general)\b.*: \(tensor<[^>]*x(\w+)>, "
        r"tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
    )
    return re.findall(pattern, text)


def _conv_group_counts(text: str) -> list[int]:
    """feature_group_count and batch_group_count of every convolution in the program."""
    return [int(n) for n in re.findall(r"(?:feature|batch)_group_count = (\d+)", text)]


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_auto_train_step_holds_the_platforms_kernels(platform):
    exported, depthwise_layers = _exported_train_step(platform)
    text = exported.mlir_module()
    convolutions = text.count("stablehlo.convolution")
    if platform == "cpu":
        # Every depthwise layer is shifted multiply-adds (one optimization barrier in
        # each forward), every 1x1 conv a matmul: the 3x3 stem is the only convolution
        # left (forward and kernel gradient), and nothing is grouped.
        assert max(_conv_group_counts(text)) == 1
        assert text.count("stablehlo.optimization_barrier") == depthwise_layers
        assert convolutions == 2
        assert "stablehlo.dot_general" in text
    else:
        # Grouped convolutions: forward (feature groups) and kernel gradient (batch
        # groups) of each depthwise layer; 1x1 layers as XLA convolutions.
        grouped = sum(count > 1 for count in _conv_group_counts(text))
        assert grouped >= 2 * depthwise_layers
        assert "optimization_barrier" not in text
        assert "dot_general" not in text


@pytest.mark.parametrize("platform, impl", [("tpu", "shifted"), ("cpu", "grouped")])
def test_explicit_depthwise_impl_overrides_the_platform(platform, impl):
    exported, depthwise_layers = _exported_train_step(platform, depthwise_impl=impl)
    text = exported.mlir_module()
    grouped = sum(count > 1 for count in _conv_group_counts(text))
    barriers = text.count("stablehlo.optimization_barrier")
    if impl == "shifted":
        assert grouped == 0 and barriers == depthwise_layers
    else:
        assert grouped >= 2 * depthwise_layers and barriers == 0


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_bfloat16_train_step_convolves_in_bfloat16_with_float32_params_and_grads(platform):
    exported, _ = _exported_train_step(platform, dtype="bfloat16")
    text = exported.mlir_module()
    products = re.findall(r"stablehlo\.(?:convolution|dot_general).*", text)
    assert products and all("bf16" in line for line in products)
    params, batch_stats, _, loss, grads = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    dtypes = {aval.dtype for aval in jax.tree.leaves((params, batch_stats, loss, grads))}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_bfloat16_qat_step_for_tpu_convolves_codes_in_bfloat16_summed_in_float32():
    model = create_model("centernet_tiny", num_classes=NUM_CLASSES, dtype="bfloat16")
    images = _batch_shapes()["image"]
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    config = qat.QuantConfig()
    quant_stats = qat.init_quant_stats(model.apply, variables, images, config=config, train=False)

    def qat_grads(params, batch_stats, quant_stats, images):
        def loss(params):
            outputs, updates = qat.quantized_apply(
                model.apply,
                {"params": params, "batch_stats": batch_stats, "quant_stats": quant_stats},
                images,
                config=config,
                mode="qat",
                train=True,
                mutable=["batch_stats"],
            )
            return sum(jnp.mean(value**2) for value in outputs.values()), updates

        return jax.grad(loss, has_aux=True)(params)

    exported = jax.export.export(jax.jit(qat_grads), platforms=["tpu"])(
        variables["params"], variables["batch_stats"], quant_stats, images
    )
    forward = [p for p in _products(exported.mlir_module()) if p[1:] == ("bf16", "bf16", "f32")]
    # One per quantized layer: all of this model's convolutions.
    assert len(forward) == len(qat.quantized_layers(variables["params"], config))

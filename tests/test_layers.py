"""The CPU kernels of `jaxcomp.ops` and the model layers agree with their references.

`depthwise_conv3x3_shifted` (hand-written gradient) against XLA's grouped conv,
`pointwise_as_matmul` against `lax.conv_general_dilated`, and `layers.BatchNorm`
against `nn.BatchNorm`: forward values and gradients, under jit, vmap and
nested differentiation, plus the transformations a `custom_vjp` cannot support;
and the per-platform choice inside lowered programs.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxcomp.models import layers
from jaxcomp.models.layers import BatchNorm, ConvBN, DepthwiseConv3x3
from jaxcomp.ops import (
    conv_general_dilated_per_platform,
    depthwise_conv3x3,
    depthwise_conv3x3_grouped,
    depthwise_conv3x3_shifted,
    pointwise_as_matmul,
)
from jaxcomp.paths import leaf_names

IMPLS = {"grouped": depthwise_conv3x3_grouped, "shifted": depthwise_conv3x3_shifted}


def _normal(shape, seed=0) -> jax.Array:
    # numpy draws: jax.random would compile a sampler for every new shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(shape, seed=0):
    return _normal(shape, seed), _normal((3, 3, 1, shape[-1]), seed + 1)


def _value_and_grads(impl: str, stride: int):
    """jit(x, kernel, cotangent -> (output, d<out, cotangent>/dx, .../dkernel))."""
    conv = IMPLS[impl]

    def run(x, kernel, cotangent):
        out, vjp = jax.vjp(lambda x, k: conv(x, k, stride), x, kernel)
        return (out, *vjp(cotangent))

    return jax.jit(run)


def _assert_all_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_shifted_matches_grouped_forward_and_gradients(stride, size):
    x, kernel = _inputs((2, *size, 3))
    out_shape = jax.eval_shape(
        lambda x, k: depthwise_conv3x3_grouped(x, k, stride), x, kernel
    ).shape
    cotangent = _normal(out_shape, 7)
    expected = _value_and_grads("grouped", stride)(x, kernel, cotangent)
    actual = _value_and_grads("shifted", stride)(x, kernel, cotangent)
    _assert_all_close(actual, expected, 1e-4)


def _numpy_reference(x, kernel, cotangent, stride):
    """Output, input and kernel gradients of the depthwise conv, in float64 numpy."""
    x, kernel, cotangent = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = cotangent.shape[1:3]
    out = np.zeros_like(cotangent)
    padded_grad = np.zeros_like(padded)
    kernel_grad = np.zeros_like(kernel)
    for dy in range(3):
        for dx in range(3):
            rows = slice(dy, dy + (height - 1) * stride + 1, stride)
            cols = slice(dx, dx + (width - 1) * stride + 1, stride)
            out += padded[:, rows, cols] * kernel[dy, dx, 0]
            padded_grad[:, rows, cols] += cotangent * kernel[dy, dx, 0]
            kernel_grad[dy, dx, 0] = np.sum(padded[:, rows, cols] * cotangent, axis=(0, 1, 2))
    return out, padded_grad[:, 1:-1, 1:-1], kernel_grad


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    channels=st.integers(1, 3),
    stride=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_shifted_matches_direct_sums_on_random_shapes(batch, height, width, channels, stride, seed):
    x, kernel = _inputs((batch, height, width, channels), seed)
    out_shape = (batch, (height - 1) // stride + 1, (width - 1) // stride + 1, channels)
    cotangent = _normal(out_shape, seed + 1)
    actual = _value_and_grads("shifted", stride)(x, kernel, cotangent)
    for a, e in zip(actual, _numpy_reference(x, kernel, cotangent, stride), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_shifted_under_vmap_and_vmapped_gradients(stride):
    xs, kernel = _inputs((2, 1, 5, 4, 2))

    def loss(conv, x, k):
        return jnp.sum(jnp.sin(conv(x, k, stride)))

    for transform in (
        lambda conv: jax.jit(jax.vmap(lambda x, k: conv(x, k, stride), (0, None))),
        lambda conv: jax.jit(
            jax.vmap(jax.grad(lambda x, k: loss(conv, x, k), argnums=(0, 1)), (0, None))
        ),
    ):
        expected = transform(depthwise_conv3x3_grouped)(xs, kernel)
        actual = transform(depthwise_conv3x3_shifted)(xs, kernel)
        _assert_all_close(actual, expected, 1e-4)
    # vmap of the layer is the layer applied example by example.
    looped = jnp.stack([depthwise_conv3x3_grouped(x, kernel, stride) for x in xs])
    _assert_all_close(
        jax.vmap(depthwise_conv3x3_shifted, (0, None, None))(xs, kernel, stride), looped, 1e-4
    )


@pytest.mark.parametrize("stride", [1, 2])
def test_shifted_second_order_reverse_and_hessian(stride):
    x, kernel = _inputs((1, 3, 4, 1))

    def grad_of_grad(conv):
        def inner(x, k):
            return jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, k, stride) ** 2))(x) ** 2)

        return jax.grad(inner, argnums=(0, 1))(x, kernel)

    def hessian(conv):
        return jax.hessian(lambda k: jnp.sum(jnp.tanh(conv(x, k, stride))))(kernel)

    for derivative in (grad_of_grad, hessian):
        # One jit each: run eagerly, every small op would compile on its own.
        actual = jax.jit(lambda d=derivative: d(depthwise_conv3x3_shifted))()
        expected = jax.jit(lambda d=derivative: d(depthwise_conv3x3_grouped))()
        _assert_all_close(actual, expected, 1e-4)


def test_shifted_forward_mode_and_linear_transpose_raise():
    x, kernel = _inputs((1, 4, 4, 2))

    def conv(x):
        return depthwise_conv3x3_shifted(x, kernel, 1)

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(conv, (x,), (x,))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(conv)(x)
    with pytest.raises(NotImplementedError, match="custom_vjp"):
        jax.linear_transpose(conv, x)(conv(x))


def test_shifted_low_precision_input_keeps_dtypes():
    x, kernel = _inputs((2, 6, 6, 3))
    x = x.astype(jnp.bfloat16)
    cotangent = _normal((2, 3, 3, 3), 5).astype(jnp.bfloat16)
    out, x_grad, kernel_grad = _value_and_grads("shifted", 2)(x, kernel, cotangent)
    assert (out.dtype, x_grad.dtype, kernel_grad.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    # The kernel gradient is summed in float32: it matches the float32 computation of
    # the same bfloat16 values to float32 rounding, not to bfloat16's.
    reference = _value_and_grads("grouped", 2)(
        x.astype(jnp.float32),
        kernel.astype(jnp.bfloat16).astype(jnp.float32),
        cotangent.astype(jnp.float32),
    )
    np.testing.assert_allclose(kernel_grad, reference[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.astype(jnp.float32), reference[0], rtol=5e-2, atol=5e-2)


def test_shifted_rejects_a_kernel_of_the_wrong_shape():
    x, kernel = _inputs((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"kernel must have shape \(3, 3, 1, 3\)"):
        depthwise_conv3x3_shifted(x, kernel[..., :2], 1)


def test_depthwise_module_impls_share_parameters_and_outputs():
    x, _ = _inputs((2, 6, 6, 4))
    grouped = DepthwiseConv3x3(stride=2, impl="grouped")
    shifted = DepthwiseConv3x3(stride=2, impl="shifted")
    variables = grouped.init(jax.random.key(0), x)
    _assert_all_close(shifted.init(jax.random.key(0), x), variables, 0)
    assert leaf_names(variables) == ["params/kernel"]
    _assert_all_close(shifted.apply(variables, x), grouped.apply(variables, x), 1e-5)


def _primitives(fn, *args) -> set[str]:
    return {equation.primitive.name for equation in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


NHWC = ("NHWC", "HWIO", "NHWC")


def test_pointwise_as_matmul_is_a_matmul_for_plain_1x1_convs():
    x = _normal((2, 5, 3, 4), 0)
    kernel = _normal((1, 1, 4, 6), 1)
    cotangent = _normal((2, 5, 3, 6), 2)

    def value_and_grads(conv):
        out, vjp = jax.vjp(lambda x, k: conv(x, k, (1, 1), "VALID", None, None, NHWC), x, kernel)
        return (out, *vjp(cotangent))

    assert "conv_general_dilated" not in _primitives(lambda: value_and_grads(pointwise_as_matmul))
    _assert_all_close(
        value_and_grads(pointwise_as_matmul), value_and_grads(lax.conv_general_dilated), 1e-5
    )


@pytest.mark.parametrize(
    "kernel_shape, kwargs",
    [
        ((3, 3, 4, 6), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
        ((1, 1, 4, 6), dict(window_strides=(2, 2), padding="VALID")),
        ((1, 1, 4, 6), dict(window_strides=(1, 1), padding=((1, 0), (0, 0)))),
        ((1, 1, 4, 6), dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2))),
        ((1, 1, 2, 6), dict(window_strides=(1, 1), padding="VALID", feature_group_count=2)),
    ],
)
def test_pointwise_as_matmul_leaves_other_convs_to_xla(kernel_shape, kwargs):
    x = _normal((2, 5, 4, 4), 0)
    kernel = _normal(kernel_shape, 1)

    def conv(fn):
        return lambda x, k: fn(x, k, dimension_numbers=NHWC, **kwargs)

    assert "conv_general_dilated" in _primitives(conv(pointwise_as_matmul), x, kernel)
    _assert_all_close(
        conv(pointwise_as_matmul)(x, kernel), conv(lax.conv_general_dilated)(x, kernel), 1e-5
    )


def test_pointwise_as_matmul_leaves_channels_first_to_xla():
    x = _normal((2, 4, 5, 3), 0)
    kernel = _normal((6, 4, 1, 1), 1)

    def conv(fn):
        return lambda x, k: fn(x, k, (1, 1), "VALID")  # default NCHW / OIHW

    assert "conv_general_dilated" in _primitives(conv(pointwise_as_matmul), x, kernel)
    _assert_all_close(
        conv(pointwise_as_matmul)(x, kernel), conv(lax.conv_general_dilated)(x, kernel), 1e-5
    )


def test_nn_conv_with_pointwise_as_matmul_keeps_parameters_and_values():
    x = _normal((2, 4, 4, 3), 0)
    reference = nn.Conv(5, (1, 1), use_bias=True)
    fast = nn.Conv(5, (1, 1), use_bias=True, conv_general_dilated=pointwise_as_matmul)
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )
    _assert_all_close(fast.apply(variables, x), reference.apply(variables, x), 1e-5)


def _lowered_text(fn, platform: str, *args) -> str:
    """The StableHLO text of `fn` exported for `platform` (no such device needed)."""
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def _grouped_convs(text: str) -> int:
    return sum(int(count) > 1 for count in re.findall(r"feature_group_count = (\d+)", text))


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_auto_kernels_are_chosen_per_platform_inside_the_lowered_program(platform):
    x, kernel = _inputs((2, 6, 6, 4))
    pointwise = _normal((1, 1, 4, 5), 3)

    def loss(x, kernel, pointwise):
        y = depthwise_conv3x3(x, kernel, 2)
        y = conv_general_dilated_per_platform(y, pointwise, (1, 1), "VALID", None, None, NHWC)
        return jnp.sum(jnp.sin(y))

    text = _lowered_text(jax.grad(loss, argnums=(0, 1, 2)), platform, x, kernel, pointwise)
    if platform == "cpu":
        # Shifted multiply-adds (their forward's optimization barrier) and matmuls only.
        assert "stablehlo.convolution" not in text
        assert "stablehlo.optimization_barrier" in text and "stablehlo.dot_general" in text
    else:
        assert _grouped_convs(text) > 0
        assert "optimization_barrier" not in text and "dot_general" not in text


@pytest.mark.parametrize("impl", ["grouped", "shifted"])
def test_explicit_depthwise_impl_is_used_on_every_platform(impl):
    x, kernel = _inputs((1, 4, 4, 3))
    for platform in ("cpu", "tpu"):
        text = _lowered_text(
            lambda x, k: depthwise_conv3x3(x, k, 1, impl=impl), platform, x, kernel
        )
        assert (_grouped_convs(text) > 0) == (impl == "grouped"), platform
    with pytest.raises(ValueError, match="depthwise_impl must be one of"):
        depthwise_conv3x3(x, kernel, 1, impl="fast")


@pytest.mark.parametrize("impl", ["auto", "grouped", "shifted"])
def test_dispatched_depthwise_matches_grouped_values_and_gradients(impl):
    x, kernel = _inputs((2, 7, 5, 3))
    cotangent = _normal((2, 4, 3, 3), 7)

    def value_and_grads(conv):
        out, vjp = jax.vjp(conv, x, kernel)
        return (out, *vjp(cotangent))

    expected = jax.jit(lambda: value_and_grads(lambda x, k: depthwise_conv3x3_grouped(x, k, 2)))()
    actual = jax.jit(lambda: value_and_grads(lambda x, k: depthwise_conv3x3(x, k, 2, impl=impl)))()
    _assert_all_close(actual, expected, 1e-4)


@pytest.mark.parametrize("impl", ["grouped", "shifted"])
def test_bfloat16_codes_with_float32_accumulation_are_exact(impl):
    rng = np.random.default_rng(0)
    # Integer codes as a fake-quantized layer passes them: exact in bfloat16, but
    # their sums need float32.
    x = jnp.asarray(rng.integers(-255, 256, (2, 6, 6, 4)), jnp.bfloat16)
    kernel = jnp.asarray(rng.integers(-127, 128, (3, 3, 1, 4)), jnp.bfloat16)
    out = depthwise_conv3x3(x, kernel, 1, impl=impl, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    expected = depthwise_conv3x3_grouped(x.astype(jnp.float32), kernel.astype(jnp.float32), 1)
    np.testing.assert_array_equal(out, expected)
    grads = jax.grad(
        lambda x, k: jnp.sum(
            depthwise_conv3x3(x, k, 1, impl=impl, preferred_element_type=jnp.float32)
        ),
        argnums=(0, 1),
    )(x, kernel)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


@pytest.mark.parametrize("impl", ["auto", "grouped", "shifted"])
def test_depthwise_module_in_bfloat16_keeps_a_float32_kernel_and_gradient(impl):
    x, _ = _inputs((2, 6, 6, 4))
    module = DepthwiseConv3x3(stride=1, impl=impl, dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    out = module.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    grad = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x).astype(jnp.float32))))(variables)
    assert grad["params"]["kernel"].dtype == jnp.float32
    reference = DepthwiseConv3x3(stride=1, impl="grouped").apply(variables, x)
    np.testing.assert_allclose(out.astype(jnp.float32), reference, rtol=3e-2, atol=3e-2)


def test_conv_general_dilated_per_platform_overrides_and_rejects_unknown():
    x = _normal((2, 3, 3, 4), 0)
    kernel = _normal((1, 1, 4, 5), 1)
    args = ((1, 1), "VALID", None, None, NHWC)
    reference = lax.conv_general_dilated(x, kernel, *args)
    for impl in ("auto", "matmul", "conv"):
        _assert_all_close(
            conv_general_dilated_per_platform(x, kernel, *args, impl=impl), reference, 1e-5
        )
    assert "dot_general" in _lowered_text(
        lambda x, k: conv_general_dilated_per_platform(x, k, *args, impl="matmul"), "tpu", x, kernel
    )
    assert "dot_general" not in _lowered_text(
        lambda x, k: conv_general_dilated_per_platform(x, k, *args, impl="conv"), "cpu", x, kernel
    )
    with pytest.raises(ValueError, match="pointwise impl must be one of"):
        conv_general_dilated_per_platform(x, kernel, *args, impl="fast")


def _batch_norms(train: bool):
    common = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return BatchNorm(**common), nn.BatchNorm(**common)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_flax_values_statistics_and_gradients(train):
    x = 3.0 * _normal((4, 3, 5, 6), 0) + 2.0
    fast, reference = _batch_norms(train)
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.structure(fast.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    # Away from the initial values, so that scale, bias and statistics all matter.
    variables = jax.tree.map(lambda v: v + 0.5, variables)
    cotangent = _normal(x.shape, 2)

    def value_and_grads(module):
        def run(params, x):
            out, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(out * cotangent), (out, updates)

        return jax.jit(jax.grad(run, argnums=(0, 1), has_aux=True))(variables["params"], x)

    _assert_all_close(value_and_grads(fast), value_and_grads(reference), 1e-4)


def test_batch_norm_inference_is_flax_bit_for_bit():
    x = 3.0 * _normal((4, 3, 5, 6), 0) + 2.0
    fast, reference = _batch_norms(train=False)
    variables = jax.tree.map(lambda v: v + 0.5, reference.init(jax.random.key(1), x))
    np.testing.assert_array_equal(fast.apply(variables, x), reference.apply(variables, x))


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_in_bfloat16_keeps_float32_statistics(train):
    x = 3.0 * _normal((4, 3, 5, 6), 0) + 2.0
    common = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.bfloat16)
    fast, reference = BatchNorm(**common), nn.BatchNorm(**common)
    variables = jax.tree.map(lambda v: v + 0.5, reference.init(jax.random.key(1), x))
    half = x.astype(jnp.bfloat16)
    out, updates = fast.apply(variables, half, mutable=["batch_stats"])
    expected, expected_updates = reference.apply(variables, half, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), expected.astype(jnp.float32), atol=2e-2)
    for leaf, expected_leaf in zip(
        jax.tree.leaves(updates), jax.tree.leaves(expected_updates), strict=True
    ):
        assert leaf.dtype == jnp.float32
        np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-5, atol=1e-5)
    # A float32 input (a fake-quantized layer's output) is not rounded to bfloat16.
    wide = fast.apply(variables, x, mutable=["batch_stats"])[0]
    assert wide.dtype == jnp.float32
    reference_f32 = _batch_norms(train)[1].apply(variables, x, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(wide, reference_f32, rtol=1e-5, atol=1e-5)


def test_batch_norm_is_an_nn_batch_norm_and_defers_masks_to_flax():
    x = _normal((2, 3, 3, 4), 0)
    mask = jnp.arange(2 * 3 * 3).reshape(2, 3, 3, 1) % 2 == 0
    fast, reference = _batch_norms(train=True)
    assert isinstance(fast, nn.BatchNorm)
    variables = reference.init(jax.random.key(1), x)
    outputs = [
        module.apply(variables, x, mask=mask, mutable=["batch_stats"])
        for module in (fast, reference)
    ]
    # Flax's own code ran: bit-identical, masked statistics included.
    for a, b in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(outputs[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv_bn_parameter_paths_are_unchanged():
    x = jnp.zeros((1, 4, 4, 3))
    variables = ConvBN(8).init(jax.random.key(0), x, train=False)
    assert leaf_names(variables) == [
        "batch_stats/bn/mean",
        "batch_stats/bn/var",
        "params/bn/bias",
        "params/bn/scale",
        "params/conv/kernel",
    ]
    assert layers.batch_norm(True, "bn").use_running_average is False

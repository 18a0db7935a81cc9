"""Building blocks shared by the detector models.

The 3x3 depthwise convolution has two implementations with identical parameters
and numerics: XLA's grouped convolution (what GPUs and TPUs want) and nine
shifted multiply-adds with a hand-written gradient (what XLA:CPU wants: it
compiles the weight gradient of a grouped conv into a dense CxC convolution,
which made a MobileNetV2 train step ~3x slower). On CPU the 1x1 convolutions of
`ConvBN` also run as plain matmuls (`pointwise_as_matmul`), which XLA:CPU
executes several times faster than the same convolution, backward pass included.
`BatchNorm` is `nn.BatchNorm` with a training-mode output that leaves autodiff
less to keep. None of this changes a parameter, its name or its shape.
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "grouped", "shifted")

# Symmetric padding of one pixel (as torchvision's MobileNetV2), so both
# implementations see the same window for stride 1 and stride 2.
_PADDING = ((1, 1), (1, 1))
_TAPS = tuple((dy, dx) for dy in range(3) for dx in range(3))


def resolve_depthwise_impl(impl: str) -> str:
    """Returns the concrete implementation for `impl`, choosing by backend for 'auto'.

    Args:
      impl: one of 'auto', 'grouped', 'shifted'.

    Returns:
      'grouped' or 'shifted'.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return impl


def depthwise_conv3x3_grouped(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise convolution as one grouped convolution.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel.
      stride: spatial stride.

    Returns:
      NHWC output with C channels.
    """
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=_PADDING,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _out_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def _window(padded: jax.Array, dy: int, dx: int, stride: int, height: int, width: int):
    """The [B, height, width, C] input window of tap (dy, dx) in a 1-pixel-padded input."""
    batch, _, _, channels = padded.shape
    return lax.slice(
        padded,
        (0, dy, dx, 0),
        (batch, dy + (height - 1) * stride + 1, dx + (width - 1) * stride + 1, channels),
        (1, stride, stride, 1),
    )


def _shifted_macs(padded: jax.Array, taps: jax.Array, stride: int, height: int, width: int):
    """sum over (dy, dx) of window(dy, dx) * taps[dy, dx]: one loop fusion for XLA."""
    out = None
    for dy, dx in _TAPS:
        term = _window(padded, dy, dx, stride, height, width) * taps[dy, dx]
        out = term if out is None else out + term
    return out


def shifted_multiply_adds(padded: jax.Array, taps: jax.Array, stride: int) -> jax.Array:
    """VALID 3x3 depthwise convolution of an already padded NHWC input, in its dtype.

    Args:
      padded: NHWC input, padded as the convolution wants.
      taps: [3, 3, C] per-channel weights.
      stride: spatial stride (a Python int).
    """
    height = (padded.shape[1] - 3) // stride + 1
    width = (padded.shape[2] - 3) // stride + 1
    return _shifted_macs(padded, taps, stride, height, width)


def _pad_spatial(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), *_PADDING, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return _depthwise_shifted_fwd(x, kernel, stride)[0]


def _depthwise_shifted_fwd(x, kernel, stride):
    # Written out once: otherwise XLA fuses the BatchNorm and ReLU6 before this layer
    # into every read of the padded input, in the forward windows and in the kernel
    # gradient, and computes them nine times over (a 1.13x slower train step).
    padded = lax.optimization_barrier(_pad_spatial(x))
    height, width = _out_size(x.shape[1], stride), _out_size(x.shape[2], stride)
    out = _shifted_macs(padded, kernel[:, :, 0].astype(x.dtype), stride, height, width)
    # The padded input is what the kernel gradient reads; keeping it (rather than x)
    # spares the backward pass a second pad.
    return out, (padded, kernel)


def _depthwise_shifted_bwd(stride, residuals, cotangent):
    padded, kernel = residuals
    height, width = padded.shape[1] - 2, padded.shape[2] - 2
    out_height, out_width = cotangent.shape[1:3]
    taps = kernel[:, :, 0].astype(cotangent.dtype)
    # Input gradient: the transposed convolution, i.e. the cotangent spread back to
    # stride 1 (interior zeros), padded, and correlated with the flipped kernel.
    spread = lax.pad(
        cotangent,
        jnp.zeros((), cotangent.dtype),
        (
            (0, 0, 0),
            (1, height + 1 - ((out_height - 1) * stride + 1), stride - 1),
            (1, width + 1 - ((out_width - 1) * stride + 1), stride - 1),
            (0, 0, 0),
        ),
    )
    input_grad = _shifted_macs(spread, taps[::-1, ::-1], 1, height, width)
    # Kernel gradient: nine products summed in one variadic reduction, which XLA:CPU
    # fuses with the window slices; nine separate sums each write out their window
    # first (~10x slower). Reducing the spatial axes first and the batch after was the
    # fastest of the orders measured.
    # In at least float32, so that bfloat16 activations do not round the kernel gradient.
    accumulate = jnp.promote_types(cotangent.dtype, jnp.float32)
    wide_cotangent = cotangent.astype(accumulate)
    products = tuple(
        _window(padded, dy, dx, stride, out_height, out_width).astype(accumulate) * wide_cotangent
        for dy, dx in _TAPS
    )
    zeros = tuple(jnp.zeros((), accumulate) for _ in products)
    sums = lax.reduce(
        products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (1, 2)
    )
    kernel_grad = jnp.stack(sums).sum(axis=1).reshape(kernel.shape)
    return input_grad.astype(padded.dtype), kernel_grad.astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def depthwise_conv3x3_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise convolution as nine strided slices times per-channel weights.

    The gradient is hand-written (`jax.custom_vjp`): the input gradient is nine
    shifted multiply-adds over one padded (for stride 2, interior-dilated)
    cotangent, the kernel gradient one fused nine-way reduction. Reverse mode
    (`jax.grad`, `jax.vjp`, gradients of gradients), forward-over-reverse
    (`jax.hessian`) and `jax.vmap` work. Forward mode applied to this function
    itself (`jax.jvp`, `jax.jacfwd`) raises a TypeError and `jax.linear_transpose`
    a NotImplementedError, as for any `custom_vjp` function: use
    `depthwise_conv3x3_grouped` there.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel.
      stride: spatial stride (a Python int).

    Returns:
      NHWC output with C channels, equal to `depthwise_conv3x3_grouped`.
    """
    if kernel.shape != (3, 3, 1, x.shape[-1]):
        raise ValueError(
            f"kernel must have shape (3, 3, 1, {x.shape[-1]}) for an input with "
            f"{x.shape[-1]} channels, got {kernel.shape}"
        )
    return _depthwise_shifted(x, kernel, stride)


def pointwise_as_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` that runs plain 1x1 NHWC convolutions as one 2-D matmul.

    A 1x1 convolution with unit strides and dilations, no padding and one group,
    on an NHWC input with an HWIO kernel (what `nn.Conv` passes), is
    `x.reshape(-1, C_in) @ kernel.reshape(C_in, C_out)`; XLA:CPU runs that, and
    its gradients, several times faster than the convolution it equals, which it
    wraps in transposes. Any other convolution goes to `lax.conv_general_dilated`
    unchanged. Pass it as `nn.Conv(..., conv_general_dilated=pointwise_as_matmul)`.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as for `lax.conv_general_dilated`.

    Returns:
      The convolution's output.
    """
    conv_args = {
        "window_strides": window_strides,
        "padding": padding,
        "lhs_dilation": lhs_dilation,
        "rhs_dilation": rhs_dilation,
        "dimension_numbers": dimension_numbers,
        "feature_group_count": feature_group_count,
        "batch_group_count": batch_group_count,
    }
    if _is_plain_pointwise(lhs, rhs, **conv_args):
        out = jnp.dot(
            lhs.reshape(-1, lhs.shape[-1]),
            rhs.reshape(rhs.shape[-2], rhs.shape[-1]),
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        return out.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return lax.conv_general_dilated(
        lhs, rhs, **conv_args, precision=precision, preferred_element_type=preferred_element_type
    )


def _is_plain_pointwise(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
) -> bool:
    spatial = lhs.ndim - 2
    if spatial < 1 or rhs.ndim != lhs.ndim or rhs.shape[:spatial] != (1,) * spatial:
        return False
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(tuple(v) != (1,) * spatial for v in (window_strides, lhs_dilation, rhs_dilation) if v):
        return False
    if isinstance(padding, str):
        if padding not in ("VALID", "SAME"):
            return False
    elif any(tuple(pair) != (0, 0) for pair in padding):
        return False
    channels_last = (0, lhs.ndim - 1, *range(1, spatial + 1))
    kernel_io_last = (lhs.ndim - 1, lhs.ndim - 2, *range(spatial))
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (
        tuple(numbers.lhs_spec) == channels_last
        and tuple(numbers.rhs_spec) == kernel_io_last
        and tuple(numbers.out_spec) == channels_last
    )


def conv_general_dilated_for_backend() -> Callable | None:
    """The `conv_general_dilated` argument for `nn.Conv`, chosen by backend.

    Returns:
      `pointwise_as_matmul` on CPU; None (`lax.conv_general_dilated`, XLA's
      convolution) on GPU and TPU, which run 1x1 convolutions well as they are.
    """
    return pointwise_as_matmul if jax.default_backend() == "cpu" else None


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise convolution (no bias) whose implementation is picked by backend.

    Attributes:
      stride: spatial stride (1 or 2).
      impl: 'auto' (shifted on CPU, grouped elsewhere), 'grouped' or 'shifted'.
    """

    stride: int = 1
    impl: str = "auto"
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, x.shape[-1]), jnp.float32)
        if resolve_depthwise_impl(self.impl) == "grouped":
            return depthwise_conv3x3_grouped(x, kernel, self.stride)
        return depthwise_conv3x3_shifted(x, kernel, self.stride)

    @nn.nowrap
    def conv_geometry(self, in_features: int) -> dict:
        """Declares this layer as `lax.conv_general_dilated` arguments (NHWC input, HWIO kernel).

        Transforms that re-implement a layer from its kernel (the int8 serving path
        of `jaxcomp.quant.int8`) read this instead of knowing the class.

        Args:
          in_features: channels of the input.

        Returns:
          {'window_strides', 'padding', 'feature_group_count'}.
        """
        return {
            "window_strides": (self.stride, self.stride),
            "padding": _PADDING,
            "feature_group_count": in_features,
        }


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose training-mode output is one multiply-add per element.

    In training mode it computes `x * m + (bias - mean * m)` with
    `m = scale / sqrt(var + epsilon)`, the batch statistics and running averages
    exactly as `nn.BatchNorm` computes them (float32, `E[x^2] - E[x]^2` clipped at 0).
    Flax's `(x - mean) * m + bias` makes autodiff keep `x - mean`, a tensor as large
    as `x`, for the backward pass; this form keeps only `x`, which the convolution
    before it has written anyway (the detector train steps on CPU got ~20% faster).
    Outputs agree with `nn.BatchNorm` to float32 rounding. Inference mode, and
    options this model does not use (a mask, `axis_name`, another axis or dtype,
    no scale or bias), run `nn.BatchNorm`'s own code. Variables and their names
    are `nn.BatchNorm`'s, and it is one (`isinstance`), so checkpoints, BatchNorm
    folding and the int8 path see no difference.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask=None
    ) -> jax.Array:
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if running or not self._is_plain(x, mask):
            return super().__call__(x, use_running_average, mask=mask)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axes)
        var = jnp.maximum(0.0, lax.square(x).mean(axes) - lax.square(mean))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        multiplier = lax.rsqrt(var + self.epsilon) * scale
        return x * multiplier + (bias - mean * multiplier)

    def _is_plain(self, x: jax.Array, mask) -> bool:
        return (
            mask is None
            and self.axis in (-1, x.ndim - 1)
            and self.axis_name is None
            and self.use_scale
            and self.use_bias
            and self.use_fast_variance
            and self.force_float32_reductions
            and self.dtype is None
            and self.param_dtype == jnp.float32
            and x.dtype == jnp.float32
        )


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with the momentum and epsilon torchvision's MobileNetV2 uses."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ConvBN(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU6.

    Submodule names (`conv`, `bn`) are part of the parameter paths that pruning
    and quantization rules select, so they are kept stable.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    activation: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
            conv_general_dilated=conv_general_dilated_for_backend(),
            name="conv",
        )(x)
        x = batch_norm(train, "bn")(x)
        return jax.nn.relu6(x) if self.activation else x


class DepthwiseBN(nn.Module):
    """3x3 depthwise convolution -> BatchNorm -> ReLU6."""

    stride: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = DepthwiseConv3x3(self.stride, self.impl, name="conv")(x)
        return jax.nn.relu6(batch_norm(train, "bn")(x))

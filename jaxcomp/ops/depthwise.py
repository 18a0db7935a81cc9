"""3x3 depthwise convolution: XLA's grouped convolution or nine shifted multiply-adds.

The two implementations have identical parameters and numerics. XLA's grouped
convolution is what GPUs and TPUs want; on CPU, XLA compiles the weight gradient
of a grouped convolution into a dense CxC convolution, which made a MobileNetV2
train step ~3x slower, so there the convolution is nine strided slices times
per-channel weights with a hand-written gradient (`jax.custom_vjp`).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "grouped", "shifted")

# Symmetric padding of one pixel (as torchvision's MobileNetV2), so both
# implementations see the same window for stride 1 and stride 2.
DEPTHWISE_PADDING = ((1, 1), (1, 1))
_TAPS = tuple((dy, dx) for dy in range(3) for dx in range(3))


def check_depthwise_impl(impl: str) -> str:
    """Returns `impl` if it names a depthwise implementation, else raises.

    Args:
      impl: 'auto' (shifted multiply-adds on CPU, grouped convolution elsewhere,
        chosen in the lowered program), 'grouped' or 'shifted' (on every platform).

    Returns:
      `impl`.

    Example:
      >>> check_depthwise_impl("auto")
      'auto'
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    return impl


def depthwise_conv3x3_grouped(
    x: jax.Array, kernel: jax.Array, stride: int, *, preferred_element_type=None
) -> jax.Array:
    """3x3 depthwise convolution as one grouped convolution.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel (cast to `x.dtype`).
      stride: spatial stride.
      preferred_element_type: accumulation and output dtype; None keeps `x.dtype`.

    Returns:
      NHWC output with C channels.
    """
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=DEPTHWISE_PADDING,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        preferred_element_type=preferred_element_type,
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

    Returns:
      NHWC output with C channels, in the dtype of `padded * taps` (int32 codes
      give exact int32 sums).
    """
    height = (padded.shape[1] - 3) // stride + 1
    width = (padded.shape[2] - 3) // stride + 1
    return _shifted_macs(padded, taps, stride, height, width)


def _pad_spatial(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), *DEPTHWISE_PADDING, (0, 0)))


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
    cotangent, the kernel gradient one fused nine-way reduction, summed in at
    least float32 and returned in the kernel's dtype. Reverse mode (`jax.grad`,
    `jax.vjp`, gradients of gradients), forward-over-reverse (`jax.hessian`) and
    `jax.vmap` work. Forward mode applied to this function itself (`jax.jvp`,
    `jax.jacfwd`) raises a TypeError and `jax.linear_transpose` a
    NotImplementedError, as for any `custom_vjp` function: use
    `depthwise_conv3x3_grouped` there.

    Args:
      x: NHWC input; the arithmetic is in its dtype.
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


def _shifted_in(x: jax.Array, kernel: jax.Array, stride: int, dtype) -> jax.Array:
    if dtype is not None:
        # The multiply-adds run in their operands' dtype: widening the input is how
        # this kernel sums in `preferred_element_type`.
        x = x.astype(dtype)
    return depthwise_conv3x3_shifted(x, kernel, stride)


def depthwise_conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    *,
    impl: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """3x3 depthwise convolution with the kernel each platform runs fastest.

    With `impl='auto'` the lowered program holds `depthwise_conv3x3_shifted` for
    CPU and `depthwise_conv3x3_grouped` for every other platform
    (`jax.lax.platform_dependent`), so a program exported from a CPU host for
    TPU or GPU gets the grouped convolution. Gradients flow through either.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel.
      stride: spatial stride (a Python int).
      impl: 'auto', 'grouped' or 'shifted' (the latter two on every platform).
      preferred_element_type: output dtype, e.g. float32 for bfloat16 inputs whose
        products must be summed exactly; the shifted kernel widens the input to it.
        None keeps `x.dtype`.

    Returns:
      NHWC output with C channels.

    Example:
      >>> y = depthwise_conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 1, 4)), 2)
      >>> y.shape
      (1, 4, 4, 4)
    """
    check_depthwise_impl(impl)
    grouped = functools.partial(
        depthwise_conv3x3_grouped, stride=stride, preferred_element_type=preferred_element_type
    )
    shifted = functools.partial(_shifted_in, stride=stride, dtype=preferred_element_type)
    if impl == "grouped":
        return grouped(x, kernel)
    if impl == "shifted":
        return shifted(x, kernel)
    return lax.platform_dependent(x, kernel, cpu=shifted, default=grouped)

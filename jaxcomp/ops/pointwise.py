"""Plain 1x1 convolutions as one matmul on CPU, XLA's convolution elsewhere.

A 1x1 convolution with unit strides and dilations, no padding and one group, on
an NHWC input with an HWIO kernel (what `nn.Conv` passes), is
`x.reshape(-1, C_in) @ kernel.reshape(C_in, C_out)`. XLA:CPU runs that, and its
gradients, several times faster than the same convolution, whose weight
gradient it wraps in transposes; GPUs and TPUs run the convolution well as it is.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

POINTWISE_IMPLS = ("auto", "matmul", "conv")


def _conv_args(
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
) -> dict:
    return {
        "window_strides": window_strides,
        "padding": padding,
        "lhs_dilation": lhs_dilation,
        "rhs_dilation": rhs_dilation,
        "dimension_numbers": dimension_numbers,
        "feature_group_count": feature_group_count,
        "batch_group_count": batch_group_count,
    }


def is_plain_pointwise(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
) -> bool:
    """Whether these `lax.conv_general_dilated` arguments are a matmul over the channels.

    True for a 1x1 kernel with unit strides and dilations, no padding, one group,
    a channels-last input and output and an (..., in, out) kernel.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count: as for
      `lax.conv_general_dilated` (only shapes are read).

    Returns:
      True when `pointwise_as_matmul` runs the convolution as one matmul.
    """
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


def _matmul(lhs, rhs, precision, preferred_element_type):
    out = jnp.dot(
        lhs.reshape(-1, lhs.shape[-1]),
        rhs.reshape(rhs.shape[-2], rhs.shape[-1]),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


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

    Plain means `is_plain_pointwise`; any other convolution goes to
    `lax.conv_general_dilated` unchanged. This is the CPU kernel on every
    platform; `conv_general_dilated_per_platform` picks it for CPU only.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as for `lax.conv_general_dilated`.

    Returns:
      The convolution's output.
    """
    conv_args = _conv_args(
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    if is_plain_pointwise(lhs, rhs, **conv_args):
        return _matmul(lhs, rhs, precision, preferred_element_type)
    return lax.conv_general_dilated(
        lhs, rhs, **conv_args, precision=precision, preferred_element_type=preferred_element_type
    )


def conv_general_dilated_per_platform(
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
    *,
    impl: str = "auto",
) -> jax.Array:
    """`lax.conv_general_dilated` whose plain 1x1 convolutions are a matmul in CPU programs.

    For a plain pointwise convolution (`is_plain_pointwise`) with `impl='auto'`
    the lowered program holds one matmul for CPU and XLA's convolution for every
    other platform (`jax.lax.platform_dependent`); other convolutions are
    `lax.conv_general_dilated` everywhere. Pass it as
    `nn.Conv(..., conv_general_dilated=conv_general_dilated_per_platform)`; it
    changes no parameter, name or shape.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type: as for `lax.conv_general_dilated`.
      impl: 'auto', 'matmul' (on every platform) or 'conv' (XLA's convolution everywhere).

    Returns:
      The convolution's output.
    """
    if impl not in POINTWISE_IMPLS:
        raise ValueError(f"pointwise impl must be one of {POINTWISE_IMPLS}, got {impl!r}")
    conv_args = _conv_args(
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    )
    conv = functools.partial(
        lax.conv_general_dilated,
        **conv_args,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if impl == "conv" or not is_plain_pointwise(lhs, rhs, **conv_args):
        return conv(lhs, rhs)
    matmul = functools.partial(
        _matmul, precision=precision, preferred_element_type=preferred_element_type
    )
    if impl == "matmul":
        return matmul(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=matmul, default=conv)

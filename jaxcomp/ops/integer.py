"""Exact convolution of integer codes (the int8 serving path's kernel), per platform.

XLA:CPU runs integer convolutions without its fast kernels. On CPU, 3x3
depthwise layers become the float model's shifted multiply-adds over the codes
widened to the accumulator type (~100x faster than the int8 grouped
convolution) and 1x1 layers an integer matmul; the results are the same
integers. Every other platform gets XLA's integer convolution.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxcomp.ops.depthwise import shifted_multiply_adds
from jaxcomp.ops.pointwise import pointwise_as_matmul

INTEGER_CONV_IMPLS = ("auto", "cpu", "xla")


def _is_depthwise_3x3(
    lhs: jax.Array, rhs: jax.Array, window_strides, rhs_dilation, feature_group_count
) -> bool:
    return (
        rhs.shape == (3, 3, 1, feature_group_count)
        and feature_group_count == lhs.shape[-1]
        and window_strides[0] == window_strides[1]
        and tuple(rhs_dilation) == (1, 1)
    )


def _cpu_routes(lhs, rhs, *, conv_args, accumulate_dtype):
    if _is_depthwise_3x3(
        lhs,
        rhs,
        conv_args["window_strides"],
        conv_args["rhs_dilation"],
        conv_args["feature_group_count"],
    ):
        return shifted_multiply_adds(
            lhs.astype(accumulate_dtype),
            rhs[:, :, 0].astype(accumulate_dtype),
            conv_args["window_strides"][0],
        )
    return pointwise_as_matmul(
        lhs, rhs, padding="VALID", **conv_args, preferred_element_type=accumulate_dtype
    )


def integer_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    window_strides: Sequence[int],
    rhs_dilation: Sequence[int],
    feature_group_count: int,
    dimension_numbers: lax.ConvDimensionNumbers,
    accumulate_dtype=jnp.int32,
    impl: str = "auto",
) -> jax.Array:
    """VALID convolution of already padded integer codes, summed exactly.

    Args:
      lhs: padded input codes (e.g. int8), channels last.
      rhs: kernel codes (e.g. int8), HWIO.
      window_strides: spatial strides.
      rhs_dilation: kernel dilation.
      feature_group_count: groups (the channels, for a depthwise layer).
      dimension_numbers: `lax.ConvDimensionNumbers` of the NHWC / HWIO / NHWC layout.
      accumulate_dtype: the accumulator and output dtype.
      impl: 'auto' (the CPU routes in CPU programs, XLA's convolution in all others,
        chosen with `jax.lax.platform_dependent`), 'cpu' or 'xla' (on every platform).

    Returns:
      The accumulator, in `accumulate_dtype`.

    Example:
      >>> q = jnp.ones((1, 5, 5, 4), jnp.int8)
      >>> numbers = lax.conv_dimension_numbers(q.shape, (3, 3, 1, 4), ("NHWC", "HWIO", "NHWC"))
      >>> integer_conv(q, jnp.ones((3, 3, 1, 4), jnp.int8), window_strides=(1, 1),
      ...              rhs_dilation=(1, 1), feature_group_count=4,
      ...              dimension_numbers=numbers)[0, 0, 0]
      Array([9, 9, 9, 9], dtype=int32)
    """
    if impl not in INTEGER_CONV_IMPLS:
        raise ValueError(f"integer_conv impl must be one of {INTEGER_CONV_IMPLS}, got {impl!r}")
    conv_args = {
        "window_strides": tuple(window_strides),
        "rhs_dilation": tuple(rhs_dilation),
        "dimension_numbers": dimension_numbers,
        "feature_group_count": feature_group_count,
    }
    xla = functools.partial(
        lax.conv_general_dilated,
        padding="VALID",
        **conv_args,
        preferred_element_type=accumulate_dtype,
    )
    cpu = functools.partial(_cpu_routes, conv_args=conv_args, accumulate_dtype=accumulate_dtype)
    if impl == "xla":
        return xla(lhs, rhs)
    if impl == "cpu":
        return cpu(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=xla)

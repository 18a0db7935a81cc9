"""Integer quantization numerics: integer ranges, rounding, range estimation.

Rounding (`quantize`, `dequantize`, `fake_quant`, `fake_quant_codes`), range
estimation (`min_max`, `abs_max`, `percentile_range`) and the choice of scale
and zero point (`scale_and_zero_point`) are separate small functions; injecting
them into a model is `jaxcomp.quant.qat`'s job.

The arithmetic follows PyTorch's fake-quantize kernels (ATen
`QuantizedOpKernels.cpp`) so that forward values agree bit for bit:

    q = clip(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

with `1 / scale` computed once in float32, as torch's `inv_scale`. The gradient
of `fake_quant` is the clipped straight-through estimator: 1 where the unclipped
`round(x / scale) + zero_point` lies in [qmin, qmax], else 0; scale and zero
point get zero gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Smallest scale, as torch's observers (`torch.finfo(torch.float32).eps`): a
# constant or all-zero tensor still gets a finite, non-zero scale.
SCALE_EPS = float(np.finfo(np.float32).eps)


def _concrete(value) -> np.ndarray | None:
    """Returns `value` as a NumPy array, or None when it is traced (inside jit/grad)."""
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


def _check_int_range(qmin, qmax) -> tuple[int, int]:
    for name, value in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be a Python int (a static bound), got {value!r}")
    if qmin >= qmax:
        raise ValueError(
            f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}; use int_range(bits) to get them"
        )
    return int(qmin), int(qmax)


def _check_scale(scale: jax.Array) -> None:
    values = _concrete(scale)
    if values is not None and not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(
            f"scale must be finite and > 0, got {values}; derive it with scale_and_zero_point, "
            "which floors it at float32 eps"
        )


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for an array of rank {ndim}; "
            f"use an axis in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def _broadcast_param(param, x: jax.Array, axis: int | None, name: str) -> jax.Array:
    """Reshapes a scalar or per-channel `param` so that it broadcasts against `x`."""
    param = jnp.asarray(param)
    if axis is None:
        if param.size != 1:
            raise ValueError(
                f"{name} has shape {param.shape} but axis is None (per-tensor); "
                "pass axis=<channel axis> for per-channel parameters"
            )
        return param.reshape(())
    axis = _normalize_axis(axis, x.ndim)
    if param.ndim == 0:
        return param
    if param.shape != (x.shape[axis],):
        raise ValueError(
            f"{name} must be a scalar or have shape ({x.shape[axis]},) for axis {axis} of an "
            f"array of shape {x.shape}, got shape {param.shape}"
        )
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return param.reshape(shape)


def int_range(bits: int = 8, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """Returns the integer range (qmin, qmax) of a `bits`-wide integer.

    Args:
      bits: width in [2, 8].
      signed: two's complement range if True, else [0, 2**bits - 1].
      narrow: drop the most negative code so the range is symmetric ([-127, 127]
        for int8), as weights quantized symmetrically use; only for signed ranges.

    Returns:
      (qmin, qmax) as Python ints.

    Example:
      >>> int_range(8), int_range(8, narrow=True), int_range(8, signed=False)
      ((-128, 127), (-127, 127), (0, 255))
    """
    _check_bits(bits)
    if not signed:
        if narrow:
            raise ValueError("narrow=True needs signed=True: narrow ranges are symmetric around 0")
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


def _round_and_shift(x: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    # torch multiplies by a float32 `inv_scale = 1.0f / scale` and adds the zero
    # point after rounding; doing the same keeps forward values bit-identical.
    # In at least float32: a bfloat16 product would be rounded to 8 significant
    # bits before it is rounded to a code, and land on the wrong code.
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    inv_scale = 1.0 / scale.astype(jnp.float32)
    return jnp.round(x * inv_scale.astype(x.dtype)) + zero_point.astype(x.dtype)


def quantize(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Maps `x` to integers: clip(round_half_even(x / scale) + zero_point, qmin, qmax).

    Args:
      x: float array.
      scale: scalar, or 1-D of size `x.shape[axis]` for per-channel scales.
      zero_point: like `scale` (integer-valued).
      qmin: smallest integer code.
      qmax: largest integer code.
      axis: channel axis of per-channel `scale`/`zero_point` (negative allowed), or None.
      dtype: result dtype (e.g. jnp.int8); None keeps `x.dtype`.

    Returns:
      An integer-valued array of `x`'s shape (the arithmetic is in at least float32).

    Example:
      >>> quantize(jnp.array([0.5, 1.5, 9.0]), 1.0, 0, -4, 3)
      Array([0., 2., 3.], dtype=float32)
    """
    qmin, qmax = _check_int_range(qmin, qmax)
    _check_scale(scale)
    scale = _broadcast_param(scale, x, axis, "scale")
    zero_point = _broadcast_param(zero_point, x, axis, "zero_point")
    q = jnp.clip(_round_and_shift(x, scale, zero_point), qmin, qmax)
    return q.astype(x.dtype if dtype is None else dtype)


def dequantize(
    q: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    axis: int | None = None,
) -> jax.Array:
    """Maps integer codes back to floats: (q - zero_point) * scale, in float32.

    Args:
      q: integer-valued array (any integer or float dtype).
      scale: scalar, or 1-D of size `q.shape[axis]`.
      zero_point: like `scale`.
      axis: channel axis of per-channel parameters, or None.

    Returns:
      A float32 array of `q`'s shape.
    """
    _check_scale(scale)
    scale = _broadcast_param(scale, q, axis, "scale").astype(jnp.float32)
    zero_point = _broadcast_param(zero_point, q, axis, "zero_point")
    return (q.astype(jnp.float32) - zero_point.astype(jnp.float32)) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, qmin, qmax):
    shifted = _round_and_shift(x, scale, zero_point)
    return ((jnp.clip(shifted, qmin, qmax) - zero_point) * scale).astype(x.dtype)


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax):
    shifted = _round_and_shift(x, scale, zero_point)
    out = ((jnp.clip(shifted, qmin, qmax) - zero_point) * scale).astype(x.dtype)
    in_range = (shifted >= qmin) & (shifted <= qmax)
    return out, (in_range, scale, zero_point)


def _fake_quant_bwd(qmin, qmax, residuals, grad):
    in_range, scale, zero_point = residuals
    return (
        jnp.where(in_range, grad, jnp.zeros_like(grad)),
        jnp.zeros_like(scale),
        jnp.zeros_like(zero_point),
    )


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> jax.Array:
    """Quantizes then dequantizes `x`, with the clipped straight-through gradient.

    Forward: `dequantize(quantize(x))`, computed as torch's fake-quantize kernels
    do. Backward: d/dx is 1 where `round(x / scale) + zero_point` (before
    clipping) lies in [qmin, qmax] and 0 elsewhere; `scale` and `zero_point`
    get zero gradient (they come from observers, not from the loss).

    Args:
      x: float array.
      scale: scalar, or 1-D of size `x.shape[axis]`; finite and > 0.
      zero_point: like `scale` (integer-valued, within [qmin, qmax]).
      qmin: smallest integer code (a Python int).
      qmax: largest integer code (a Python int).
      axis: channel axis of per-channel parameters (negative allowed), or None.

    Returns:
      An array of `x`'s shape and dtype holding values on the quantization grid.

    Example:
      >>> fake_quant(jnp.array([0.26, -3.0]), 0.5, 0, -4, 3)
      Array([ 0.5, -2. ], dtype=float32)
    """
    qmin, qmax = _check_int_range(qmin, qmax)
    _check_scale(scale)
    scale = _broadcast_param(scale, x, axis, "scale").astype(jnp.float32)
    zero_point = _broadcast_param(zero_point, x, axis, "zero_point").astype(jnp.float32)
    return _fake_quant(x, scale, zero_point, qmin, qmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant_codes(x, scale, zero_point, qmin, qmax):
    return _fake_quant_codes_fwd(x, scale, zero_point, qmin, qmax)[0]


def _fake_quant_codes_fwd(x, scale, zero_point, qmin, qmax):
    shifted = _round_and_shift(x, scale, zero_point)
    codes = jnp.clip(shifted, qmin, qmax) - zero_point.astype(shifted.dtype)
    in_range = (shifted >= qmin) & (shifted <= qmax)
    return codes, (in_range, scale, zero_point)


def _fake_quant_codes_bwd(qmin, qmax, residuals, grad):
    in_range, scale, zero_point = residuals
    return (
        jnp.where(in_range, grad / scale.astype(grad.dtype), jnp.zeros_like(grad)),
        jnp.zeros_like(scale),
        jnp.zeros_like(zero_point),
    )


_fake_quant_codes.defvjp(_fake_quant_codes_fwd, _fake_quant_codes_bwd)


def fake_quant_codes(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> jax.Array:
    """The integers `fake_quant` multiplies by `scale`, with the straight-through gradient.

    Forward: `quantize(x) - zero_point`, integer-valued, in at least float32
    (|values| <= 255 for 8 bits, so exact in bfloat16 too). Backward: d/dx is
    `1 / scale` where `fake_quant`'s is 1, else 0, so that `codes * scale` has
    exactly `fake_quant`'s gradient; `scale` and `zero_point` get zero gradient.
    Products of such codes are exact in bfloat16 and their sums in float32, which
    is how a layer computing in bfloat16 stays exact (`jaxcomp.quant.qat`).

    Args:
      x: float array.
      scale: scalar, or 1-D of size `x.shape[axis]`; finite and > 0.
      zero_point: like `scale` (integer-valued, within [qmin, qmax]).
      qmin: smallest integer code (a Python int).
      qmax: largest integer code (a Python int).
      axis: channel axis of per-channel parameters (negative allowed), or None.

    Returns:
      Integer-valued codes of `x`'s shape, float32 (or wider if `x` is).

    Example:
      >>> fake_quant_codes(jnp.array([0.26, -3.0]), 0.5, 0, -4, 3)
      Array([ 1., -4.], dtype=float32)
    """
    qmin, qmax = _check_int_range(qmin, qmax)
    _check_scale(scale)
    scale = _broadcast_param(scale, x, axis, "scale").astype(jnp.float32)
    zero_point = _broadcast_param(zero_point, x, axis, "zero_point").astype(jnp.float32)
    # Widened out here, so that autodiff casts the gradient back to x's dtype.
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return _fake_quant_codes(wide, scale, zero_point, qmin, qmax)


def _reduce_except(fn, x: jax.Array, axis: int | None) -> jax.Array:
    """Applies reduction `fn(array, axis=...)` over all axes of `x` except `axis`."""
    if axis is None:
        return fn(x, axis=None)
    axis = _normalize_axis(axis, x.ndim)
    return fn(x, axis=tuple(a for a in range(x.ndim) if a != axis))


def min_max(x: jax.Array, axis: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Returns (min, max) of `x`, per slice along `axis` if given, else over all of `x`."""
    return _reduce_except(jnp.min, x, axis), _reduce_except(jnp.max, x, axis)


def abs_max(x: jax.Array, axis: int | None = None) -> jax.Array:
    """Returns max(|x|), per slice along `axis` if given, else over all of `x`."""
    return _reduce_except(jnp.max, jnp.abs(x), axis)


def percentile_range(
    x: jax.Array, percentile: float, axis: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """Returns the (100 - p)-th and p-th percentiles of `x`, clipping outliers from the range.

    Args:
      x: float array.
      percentile: p in (50, 100]; 100 gives `min_max`.
      axis: channel axis to keep (one range per channel), or None for one range.

    Returns:
      (low, high), scalars or 1-D along `axis`.
    """
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if axis is None:
        flat = x.reshape(1, -1)
    else:
        flat = jnp.moveaxis(x, _normalize_axis(axis, x.ndim), 0).reshape(x.shape[axis], -1)
    low = jnp.percentile(flat, 100 - percentile, axis=1)
    high = jnp.percentile(flat, percentile, axis=1)
    if axis is None:
        return low[0], high[0]
    return low, high


def _divide_by_constant(numerator: jax.Array, denominator: float) -> jax.Array:
    """`numerator / denominator`, correctly rounded as torch computes it.

    XLA:CPU turns a division by a broadcast scalar into a multiplication by its
    reciprocal, which is 1 ulp off for about half of all inputs; a full-shaped
    divisor behind an optimization barrier keeps the true division.
    """
    divisor = jnp.full(jnp.shape(numerator), denominator, jnp.float32)
    return numerator / jax.lax.optimization_barrier(divisor)


def scale_and_zero_point(
    min_val: jax.Array,
    max_val: jax.Array,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[jax.Array, jax.Array]:
    """Chooses scale and zero point for a range, as torch's MinMax observers do.

    The range is first widened to include 0, so that 0 is exactly representable
    (pruned weights and zero padding stay exactly 0). Symmetric: zero_point 0
    and scale = max(|min|, |max|) / ((qmax - qmin) / 2). Asymmetric: scale =
    (max - min) / (qmax - qmin) and zero_point = clip(qmin - round(min / scale),
    qmin, qmax). The scale is floored at float32 eps, so a constant or all-zero
    range still quantizes.

    Args:
      min_val: scalar or per-channel minimum.
      max_val: like `min_val`.
      qmin: smallest integer code.
      qmax: largest integer code.
      symmetric: symmetric (signed range, zero_point 0) or asymmetric (affine).

    Returns:
      (scale float32, zero_point int32), each of `min_val`'s shape.

    Example:
      >>> scale_and_zero_point(jnp.float32(-1.0), jnp.float32(3.0), -128, 127, False)
      (Array(0.01568628, dtype=float32), Array(-64, dtype=int32))
    """
    qmin, qmax = _check_int_range(qmin, qmax)
    for name, value in (("min_val", min_val), ("max_val", max_val)):
        concrete = _concrete(value)
        if concrete is not None and not np.all(np.isfinite(concrete)):
            raise ValueError(
                f"{name} must be finite, got {concrete}; an observer that saw NaN/inf inputs "
                "(or nothing) cannot give a range"
            )
    if symmetric and qmin >= 0:
        raise ValueError(
            f"symmetric quantization needs a signed range (qmin < 0), got [{qmin}, {qmax}]; "
            "use int_range(bits, signed=True) or symmetric=False"
        )
    min_neg = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
    max_pos = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
    if symmetric:
        scale = _divide_by_constant(jnp.maximum(-min_neg, max_pos), (qmax - qmin) / 2)
        scale = jnp.maximum(scale, jnp.float32(SCALE_EPS))
        return scale, jnp.zeros(scale.shape, jnp.int32)
    scale = _divide_by_constant(max_pos - min_neg, qmax - qmin)
    scale = jnp.maximum(scale, jnp.float32(SCALE_EPS))
    zero_point = qmin - jnp.round(min_neg / scale).astype(jnp.int32)
    return scale, jnp.clip(zero_point, qmin, qmax)


def weight_qparams(
    kernel: jax.Array, bits: int = 8, axis: int = -1
) -> tuple[jax.Array, jax.Array, int, int]:
    """Symmetric per-output-channel parameters for a kernel on the narrow range [-127, 127].

    Args:
      kernel: weights, e.g. HWIO [kh, kw, in, out] or dense [in, out].
      bits: width in [2, 8].
      axis: output-channel axis (one scale per slice).

    Returns:
      (scale [C] float32, zero_point [C] int32 zeros, qmin, qmax).

    Example:
      >>> kernel = jnp.ones((3, 3, 8, 16))
      >>> scale, zero_point, qmin, qmax = weight_qparams(kernel)
      >>> quantized = fake_quant(kernel, scale, zero_point, qmin, qmax, axis=-1)
    """
    qmin, qmax = int_range(bits, signed=True, narrow=True)
    amax = abs_max(kernel, axis)
    scale, zero_point = scale_and_zero_point(-amax, amax, qmin, qmax, symmetric=True)
    return scale, zero_point, qmin, qmax

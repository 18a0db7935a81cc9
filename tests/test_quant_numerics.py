"""Quantization numerics: torch agreement, properties of fake-quant, clear errors."""

import json
import pathlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.quant import numerics, observers
from jaxcomp.quant.numerics import (
    abs_max,
    dequantize,
    fake_quant,
    int_range,
    min_max,
    percentile_range,
    quantize,
    scale_and_zero_point,
    weight_qparams,
)

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "torch_quant_reference.json").read_text()
)
PROPERTY = settings(max_examples=40, deadline=None)


def _f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def _fake_quant_and_grad(x, scale, zero_point, qmin, qmax, upstream, axis=None):
    out, vjp = jax.vjp(lambda v: fake_quant(v, scale, zero_point, qmin, qmax, axis=axis), x)
    return np.asarray(out), np.asarray(vjp(upstream)[0])


@pytest.mark.parametrize(
    "case", REFERENCE["per_tensor"], ids=lambda c: f"s{c['scale']}z{c['zero_point']}"
)
def test_fake_quant_per_tensor_matches_torch_bit_for_bit(case):
    out, grad = _fake_quant_and_grad(
        jnp.asarray(_f32(case["x"])),
        jnp.float32(case["scale"]),
        jnp.int32(case["zero_point"]),
        case["qmin"],
        case["qmax"],
        jnp.asarray(_f32(case["upstream"])),
    )
    np.testing.assert_array_equal(out, _f32(case["out"]))
    np.testing.assert_array_equal(grad, _f32(case["grad"]))


@pytest.mark.parametrize("case", REFERENCE["per_channel"], ids=lambda c: f"axis{c['axis']}")
def test_fake_quant_per_channel_matches_torch_bit_for_bit(case):
    shape = tuple(case["shape"])
    # Our axis may be negative; torch recorded a non-negative one.
    axis = case["axis"] - len(shape) if case["axis"] == len(shape) - 1 else case["axis"]
    out, grad = _fake_quant_and_grad(
        jnp.asarray(_f32(case["x"]).reshape(shape)),
        jnp.asarray(_f32(case["scale"])),
        jnp.asarray(case["zero_point"], jnp.int32),
        case["qmin"],
        case["qmax"],
        jnp.asarray(_f32(case["upstream"]).reshape(shape)),
        axis=axis,
    )
    np.testing.assert_array_equal(out.ravel(), _f32(case["out"]))
    np.testing.assert_array_equal(grad.ravel(), _f32(case["grad"]))


def test_reference_exercises_rounding_boundaries_and_clipping():
    case = REFERENCE["per_tensor"][2]  # scale 0.25: x / scale is exactly k + 0.5
    x = _f32(case["x"])
    ratio = x / np.float32(case["scale"])
    assert np.any(ratio == np.round(ratio - 0.5) + 0.5)
    assert np.any(_f32(case["grad"]) == 0.0)
    assert REFERENCE["torch_version"].startswith("2.")


@pytest.mark.parametrize(
    "case",
    [c for c in REFERENCE["observers"] if c["kind"] != "per_channel"],
    ids=lambda c: c["name"],
)
def test_observer_qparams_match_torch(case):
    state = observers.init_observer()
    for batch in case["batches"]:
        state = observers.observe(
            state, jnp.asarray(_f32(batch)), method=case["kind"], momentum=case.get("momentum", 0.9)
        )
    scale, zero_point = scale_and_zero_point(
        state.min, state.max, case["qmin"], case["qmax"], case["symmetric"]
    )
    if case["kind"] == "minmax":
        assert float(state.min) == case["min"] and float(state.max) == case["max"]
        np.testing.assert_array_equal(np.atleast_1d(scale), _f32(case["scale"]))
    else:
        # torch's EMA is min + c * (batch - min), ours m * min + (1 - m) * batch:
        # equal in exact arithmetic, a few ulp apart in float32.
        np.testing.assert_allclose([state.min, state.max], [case["min"], case["max"]], rtol=1e-6)
        np.testing.assert_allclose(np.atleast_1d(scale), _f32(case["scale"]), rtol=1e-6)
    np.testing.assert_array_equal(np.atleast_1d(zero_point), case["zero_point"])


@pytest.mark.parametrize(
    "case",
    [c for c in REFERENCE["observers"] if c["kind"] == "per_channel"],
    ids=lambda c: c["name"],
)
def test_per_channel_weight_qparams_match_torch(case):
    kernel = jnp.asarray(_f32(case["kernel"]))
    amax = abs_max(kernel, axis=-1)
    scale, zero_point = scale_and_zero_point(-amax, amax, case["qmin"], case["qmax"], True)
    np.testing.assert_array_equal(scale, _f32(case["scale"]))
    np.testing.assert_array_equal(zero_point, case["zero_point"])
    if (case["qmin"], case["qmax"]) == (-127, 127):
        narrow_scale, narrow_zero_point, qmin, qmax = weight_qparams(kernel)
        assert (qmin, qmax) == (-127, 127)
        np.testing.assert_array_equal(narrow_scale, _f32(case["scale"]))
        np.testing.assert_array_equal(narrow_zero_point, 0)


@st.composite
def _affine(draw, bits=None):
    bits = bits or draw(st.integers(2, 8))
    qmin, qmax = int_range(bits, signed=draw(st.booleans()))
    scale = draw(st.floats(2.0**-10, 8.0, width=32))
    zero_point = draw(st.integers(qmin, qmax))
    return np.float32(scale), zero_point, qmin, qmax


@PROPERTY
@given(_affine(), st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=32))
def test_error_is_at_most_half_a_step_inside_the_range(params, fractions):
    scale, zero_point, qmin, qmax = params
    low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    x = _f32(low + np.asarray(fractions) * (high - low))
    out = np.asarray(fake_quant(jnp.asarray(x), scale, zero_point, qmin, qmax))
    # Half a step, plus float32 rounding of x * (1 / scale) and of the product.
    tolerance = scale / 2 + 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x), scale)
    assert np.all(np.abs(out - x) <= tolerance)


@PROPERTY
@given(
    _affine(), hnp.arrays(np.float32, st.integers(1, 32), elements=st.floats(-1e3, 1e3, width=32))
)
def test_fake_quant_is_idempotent(params, x):
    scale, zero_point, qmin, qmax = params
    once = fake_quant(jnp.asarray(x), scale, zero_point, qmin, qmax)
    np.testing.assert_array_equal(fake_quant(once, scale, zero_point, qmin, qmax), once)


@PROPERTY
@given(
    _affine(), hnp.arrays(np.float32, st.integers(1, 32), elements=st.floats(-1e3, 1e3, width=32))
)
def test_gradient_is_exactly_the_unclipped_in_range_indicator(params, x):
    scale, zero_point, qmin, qmax = params
    grad = jax.grad(lambda v: jnp.sum(fake_quant(v, scale, zero_point, qmin, qmax)))(jnp.asarray(x))
    shifted = np.round(x * (np.float32(1) / scale)) + np.float32(zero_point)
    expected = ((shifted >= qmin) & (shifted <= qmax)).astype(np.float32)
    np.testing.assert_array_equal(grad, expected)


def test_scale_and_zero_point_get_zero_gradient():
    x = jnp.array([0.3, -2.0, 7.0])
    grads = jax.grad(lambda s, z: jnp.sum(fake_quant(x, s, z, -128, 127)), argnums=(0, 1))(
        jnp.float32(0.1), jnp.float32(3.0)
    )
    assert grads == (0.0, 0.0)


@PROPERTY
@given(
    hnp.arrays(np.float32, (2, 3, 4), elements=st.floats(-1.0, 1.0, width=32)),
    hnp.arrays(np.float32, (4,), elements=st.floats(2.0**-7, 128.0, width=32)),
)
def test_weight_scales_are_per_output_channel(base, gains):
    kernel = jnp.asarray(base * gains)
    scale, zero_point, qmin, qmax = weight_qparams(kernel)
    assert scale.shape == (4,)
    np.testing.assert_allclose(
        scale,
        np.maximum(np.abs(base * gains).max(axis=(0, 1)) / 127, numerics.SCALE_EPS),
        rtol=1e-6,
    )
    codes = np.asarray(quantize(kernel, scale, zero_point, qmin, qmax, axis=-1))
    out = np.asarray(fake_quant(kernel, scale, zero_point, qmin, qmax, axis=-1))
    np.testing.assert_array_equal(out, codes * np.asarray(scale))
    assert np.abs(codes).max() <= 127


@PROPERTY
@given(
    st.floats(-1e3, 1e3, width=32), st.floats(-1e3, 1e3, width=32), st.integers(2, 8), st.booleans()
)
def test_zero_is_exactly_representable_for_every_asymmetric_range(a, b, bits, signed):
    qmin, qmax = int_range(bits, signed=signed)
    scale, zero_point = scale_and_zero_point(min(a, b), max(a, b), qmin, qmax, symmetric=False)
    assert float(scale) > 0 and qmin <= int(zero_point) <= qmax
    assert float(fake_quant(jnp.zeros(()), scale, zero_point, qmin, qmax)) == 0.0


def test_constant_and_zero_ranges_still_quantize():
    for value in (0.0, 0.7, -3.0):
        scale, zero_point = scale_and_zero_point(value, value, -128, 127, symmetric=False)
        assert np.isfinite(scale) and float(scale) >= numerics.SCALE_EPS
        sym_scale, _ = scale_and_zero_point(value, value, -127, 127, symmetric=True)
        assert float(sym_scale) >= numerics.SCALE_EPS
        out = fake_quant(jnp.full((3,), value), scale, zero_point, -128, 127)
        np.testing.assert_allclose(out, value, atol=float(scale))


def test_quantize_dequantize_round_trip_and_int8_dtype():
    x = jnp.array([[-1.0, 0.0, 0.26], [2.0, 5.0, -7.0]])
    scale, zero_point = jnp.array([0.5, 0.1, 0.02]), jnp.array([0, 3, -2])
    q = quantize(x, scale, zero_point, -128, 127, axis=-1, dtype=jnp.int8)
    assert q.dtype == jnp.int8
    np.testing.assert_array_equal(q, [[-2, 3, 11], [4, 53, -128]])
    np.testing.assert_array_equal(
        dequantize(q, scale, zero_point, axis=1),
        fake_quant(x, scale, zero_point, -128, 127, axis=1),
    )


def test_int_range_and_range_estimators():
    assert int_range(8) == (-128, 127)
    assert int_range(8, narrow=True) == (-127, 127)
    assert int_range(4, signed=False) == (0, 15)
    x = jnp.arange(24.0).reshape(2, 3, 4) - 10.0
    low, high = min_max(x, axis=1)
    np.testing.assert_array_equal(low, [-10.0, -6.0, -2.0])
    np.testing.assert_array_equal(high, [5.0, 9.0, 13.0])
    np.testing.assert_array_equal(abs_max(x, axis=-1), [10.0, 11.0, 12.0, 13.0])
    p_low, p_high = percentile_range(x, 100.0)
    np.testing.assert_allclose([p_low, p_high], [-10.0, 13.0], rtol=1e-6)
    c_low, c_high = percentile_range(x, 90.0, axis=2)
    assert c_low.shape == (4,) and np.all(c_low > low.min()) and np.all(c_high < 13.0 + 1e-6)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: int_range(1), "bits must be an int in \\[2, 8\\], got 1"),
        (lambda: int_range(9), "bits must be an int in \\[2, 8\\], got 9"),
        (lambda: int_range(8.0), "bits must be an int"),
        (lambda: int_range(8, signed=False, narrow=True), "narrow=True needs signed"),
        (lambda: quantize(jnp.ones(3), 1.0, 0, 5, 5), "qmin must be < qmax"),
        (lambda: fake_quant(jnp.ones(3), 1.0, 0, 7, -8), "qmin must be < qmax"),
        (lambda: scale_and_zero_point(0.0, 1.0, 3, 2, False), "qmin must be < qmax"),
        (lambda: fake_quant(jnp.ones(3), 0.0, 0, -128, 127), "scale must be finite and > 0"),
        (lambda: fake_quant(jnp.ones(3), jnp.nan, 0, -128, 127), "scale must be finite and > 0"),
        (lambda: quantize(jnp.ones(3), -1.0, 0, -128, 127), "scale must be finite and > 0"),
        (
            lambda: fake_quant(jnp.ones((2, 3)), jnp.ones(3), 0, -8, 7, axis=2),
            "axis 2 is out of range",
        ),
        (
            lambda: fake_quant(jnp.ones((2, 3)), jnp.ones(3), 0, -8, 7, axis=-3),
            "axis -3 is out of range",
        ),
        (
            lambda: fake_quant(jnp.ones((2, 3)), jnp.ones(2), 0, -8, 7, axis=1),
            "must be a scalar or have shape \\(3,\\)",
        ),
        (lambda: fake_quant(jnp.ones((2, 3)), jnp.ones(3), 0, -8, 7), "axis is None"),
        (lambda: min_max(jnp.ones((2, 3)), axis=5), "axis 5 is out of range"),
        (lambda: scale_and_zero_point(jnp.nan, 1.0, -128, 127, False), "min_val must be finite"),
        (lambda: scale_and_zero_point(-1.0, 1.0, 0, 255, True), "needs a signed range"),
        (lambda: percentile_range(jnp.ones(3), 40.0), "percentile must be in \\(50, 100\\]"),
        (lambda: weight_qparams(jnp.ones((3, 4)), bits=9), "bits must be an int in \\[2, 8\\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


def test_fake_quant_jits_with_traced_scale():
    fn = jax.jit(lambda x, s, z: fake_quant(x, s, z, -128, 127))
    out = fn(jnp.array([0.26, 100.0]), jnp.float32(0.5), jnp.int32(1))
    # 100 / 0.5 + 1 clips to 127, i.e. (127 - 1) * 0.5.
    np.testing.assert_array_equal(out, [0.5, 63.0])


def test_fake_quant_codes_are_the_integers_of_fake_quant_with_its_gradient():
    x = jnp.linspace(-3.0, 3.0, 61)
    scale, zero_point, qmin, qmax = jnp.float32(0.05), jnp.int32(3), -128, 127
    codes = numerics.fake_quant_codes(x, scale, zero_point, qmin, qmax)
    expected = numerics.quantize(x, scale, zero_point, qmin, qmax) - 3
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_allclose(
        codes * scale, numerics.fake_quant(x, scale, zero_point, qmin, qmax), rtol=1e-6
    )
    grad = jax.grad(lambda x: jnp.sum(numerics.fake_quant_codes(x, scale, zero_point, qmin, qmax)))
    fq_grad = jax.grad(lambda x: jnp.sum(numerics.fake_quant(x, scale, zero_point, qmin, qmax)))
    np.testing.assert_allclose(grad(x) * scale, fq_grad(x), rtol=1e-6)


def test_bfloat16_inputs_round_to_the_codes_of_their_float32_values():
    # A bfloat16 product x * (1 / scale) would be rounded before the code is.
    x = jnp.asarray(np.random.default_rng(0).uniform(-4, 4, 4096), jnp.bfloat16)
    scale, zero_point, qmin, qmax = jnp.float32(0.0123), jnp.int32(0), -128, 127
    wide = x.astype(jnp.float32)
    np.testing.assert_array_equal(
        numerics.quantize(x, scale, zero_point, qmin, qmax, dtype=jnp.int8),
        numerics.quantize(wide, scale, zero_point, qmin, qmax, dtype=jnp.int8),
    )
    assert numerics.quantize(x, scale, zero_point, qmin, qmax).dtype == jnp.bfloat16
    codes = numerics.fake_quant_codes(x, scale, zero_point, qmin, qmax)
    assert codes.dtype == jnp.float32
    np.testing.assert_array_equal(
        codes, numerics.fake_quant_codes(wide, scale, zero_point, qmin, qmax)
    )

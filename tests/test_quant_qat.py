"""Observers, weight fake-quant with BatchNorm folding, activation interception, calibration."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models.layers import ConvBN, DepthwiseBN
from jaxcomp.paths import leaf_names
from jaxcomp.quant import numerics, observers, qat
from jaxcomp.quant.qat import QuantConfig


class _Small(nn.Module):
    """ConvBN -> DepthwiseBN -> global pool -> Dense: every kind of layer, compiled in seconds."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(8, kernel_size=3, stride=2, dtype=self.dtype, name="stem")(x, train)
        x = DepthwiseBN(dtype=self.dtype, name="dw")(x, train)
        return nn.Dense(4, dtype=self.dtype, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def small():
    model = _Small()
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = model.init(jax.random.key(1), images)
    keys = jax.random.split(jax.random.key(2), 4)
    # Non-trivial BatchNorm statistics, so that folding is really exercised.
    stats = jax.tree.map(
        lambda v: jnp.abs(v + 0.5 * jax.random.normal(keys[0], v.shape)) + 0.1,
        variables["batch_stats"],
    )
    params = dict(variables["params"])
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v * 1.5 + 0.2 if path[-1].key == "scale" else v, params
    )
    return model, {"params": params, "batch_stats": stats}, images


# Observers.


def test_minmax_observer_tracks_running_range():
    state = observers.init_observer()
    assert float(state.min) == np.inf and float(state.max) == -np.inf and int(state.count) == 0
    state = observers.observe(state, jnp.array([-1.0, 2.0]))
    state = observers.observe(state, jnp.array([0.5, 3.0]))
    assert (float(state.min), float(state.max), int(state.count)) == (-1.0, 3.0, 2)


def test_ema_observer_is_initialised_by_the_first_batch():
    state = observers.observe(observers.init_observer(), jnp.array([-1.0, 2.0]), method="ema")
    assert (float(state.min), float(state.max)) == (-1.0, 2.0)
    state = observers.observe(state, jnp.array([-3.0, 4.0]), method="ema", momentum=0.5)
    assert (float(state.min), float(state.max)) == (-2.0, 3.0)


def test_observer_freezes_at_freeze_step_under_jit():
    update = jax.jit(lambda state, x, step: observers.observe(state, x, step=step, freeze_step=3))
    state = update(observers.init_observer(), jnp.array([-1.0, 1.0]), 2)
    frozen = update(state, jnp.array([-5.0, 5.0]), 3)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), state, frozen))
    assert int(state.count) == 1


def test_observer_errors():
    with pytest.raises(ValueError, match="was never updated: run calibration first"):
        observers.observer_qparams(observers.init_observer(), name="stem/conv")
    with pytest.raises(ValueError, match="observer method must be one of"):
        observers.observe(observers.init_observer(), jnp.ones(2), method="mean")
    with pytest.raises(ValueError, match="needs the current step"):
        observers.observe(observers.init_observer(), jnp.ones(2), freeze_step=3)
    bad = observers.ObserverState(jnp.float32(jnp.nan), jnp.float32(1.0), jnp.int32(1))
    with pytest.raises(ValueError, match="non-finite range"):
        observers.observer_qparams(bad, name="stem/conv")


def test_observer_qparams_use_signed_ranges():
    state = observers.observe(observers.init_observer(), jnp.array([-1.0, 3.0]))
    scale, zero_point, qmin, qmax = observers.observer_qparams(state)
    assert (qmin, qmax) == (-128, 127) and int(zero_point) == -64
    np.testing.assert_allclose(scale, 4.0 / 255.0, rtol=1e-6)
    scale, zero_point, qmin, qmax = observers.observer_qparams(state, symmetric=True)
    assert (qmin, qmax) == (-127, 127) and int(zero_point) == 0
    np.testing.assert_allclose(scale, 3.0 / 127.0, rtol=1e-6)


# Weights.


def test_fake_quant_weights_selects_kernels_by_rules(small):
    _, variables, _ = small
    params = variables["params"]
    out = qat.fake_quant_weights(params, [(r"head/.*", None), (r".*/kernel", True)])
    assert out["head"]["kernel"] is params["head"]["kernel"]
    assert out["stem"]["bn"]["scale"] is params["stem"]["bn"]["scale"]
    kernel, quantized = params["stem"]["conv"]["kernel"], out["stem"]["conv"]["kernel"]
    scale = np.abs(np.asarray(kernel)).max(axis=(0, 1, 2)) / 127
    codes = np.asarray(quantized) / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert not np.array_equal(quantized, kernel)
    four_bit = qat.fake_quant_weights(params, [(r"stem/conv/kernel", 4)])["stem"]["conv"]["kernel"]
    assert len(np.unique(np.asarray(four_bit)[..., 0])) <= 15


def test_fake_quant_weights_errors(small):
    params = small[1]["params"]
    with pytest.raises(ValueError, match="rules matched no leaf"):
        qat.fake_quant_weights(params, [(r"nothing/.*", True)])
    with pytest.raises(ValueError, match="rules must select float kernels"):
        qat.fake_quant_weights(params, [(r"head/bias", True)])
    with pytest.raises(ValueError, match="must be True, None or a bit width"):
        qat.fake_quant_weights(params, [(r"head/kernel", "int8")])


def test_pruned_zeros_stay_exactly_zero(small):
    _, variables, _ = small
    params = variables["params"]
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, params["stem"]["conv"]["kernel"].shape)
    pruned = {
        **params,
        "stem": {**params["stem"], "conv": {"kernel": params["stem"]["conv"]["kernel"] * mask}},
    }
    for out in (
        qat.fake_quant_weights(pruned, [(r".*/kernel", True)]),
        qat.fake_quant_folded_weights(pruned, variables["batch_stats"], [(r".*/kernel", True)]),
    ):
        kernel = np.asarray(out["stem"]["conv"]["kernel"])
        assert np.all(kernel[~np.asarray(mask)] == 0.0)
        assert np.count_nonzero(kernel) > 0


def test_conv_bn_pairs_follow_leaf_names(small):
    pairs = qat.conv_bn_pairs(small[1]["params"])
    assert pairs == {"dw/conv/kernel": "dw/bn", "stem/conv/kernel": "stem/bn"}


def test_fold_batch_norm_equals_conv_then_inference_batch_norm(small):
    model, variables, images = small
    params, stats = variables["params"], variables["batch_stats"]
    conv = ConvBN(8, kernel_size=3, stride=2)
    sub = {"params": params["stem"], "batch_stats": stats["stem"]}
    expected = conv.apply(sub, images, False)
    kernel, bias = qat.fold_batch_norm(
        params["stem"]["conv"]["kernel"],
        params["stem"]["bn"]["scale"],
        params["stem"]["bn"]["bias"],
        stats["stem"]["bn"]["mean"],
        stats["stem"]["bn"]["var"],
    )
    folded = jax.lax.conv_general_dilated(
        images, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(jax.nn.relu6(folded + bias), expected, atol=1e-5)


def test_folded_fake_quant_quantizes_the_folded_kernel_and_trains_gamma(small):
    _, variables, _ = small
    params, stats = variables["params"], variables["batch_stats"]
    rules = [(r"stem/conv/kernel", True)]
    out = qat.fake_quant_folded_weights(params, stats, rules)
    multiplier = qat.bn_multiplier(params["stem"]["bn"]["scale"], stats["stem"]["bn"]["var"])
    folded = params["stem"]["conv"]["kernel"] * multiplier
    np.testing.assert_allclose(
        out["stem"]["conv"]["kernel"] * multiplier, qat.fake_quant_kernel(folded), rtol=1e-6
    )

    def loss(params):
        quantized = qat.fake_quant_folded_weights(params, stats, rules)
        return jnp.sum(quantized["stem"]["conv"]["kernel"] ** 2)

    grads = jax.grad(loss)(params)
    assert np.any(np.asarray(grads["stem"]["conv"]["kernel"]) != 0)
    assert np.any(np.asarray(grads["stem"]["bn"]["scale"]) != 0)


# Activations.


def test_quant_config_is_frozen_hashable_and_validated():
    config = QuantConfig(rules=[("head", None), (".*", True)])
    assert config.rules == (("head", None), (".*", True))
    assert hash(config) == hash(QuantConfig(rules=(("head", None), (".*", True))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight_bits = 4
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 8\\], got 9"):
        QuantConfig(activation_bits=9)
    with pytest.raises(ValueError, match="must be True \\(quantize\\) or None"):
        QuantConfig(rules=((".*", 8),))


def test_quantized_layers_come_from_kernels_and_rules(small):
    params = small[1]["params"]
    assert qat.quantized_layers(params, QuantConfig()) == ("dw/conv", "head", "stem/conv")
    config = QuantConfig(rules=(("head", None), (".*", True)))
    assert qat.quantized_layers(params, config) == ("dw/conv", "stem/conv")
    with pytest.raises(ValueError, match="rules matched no leaf"):
        qat.quantized_layers(params, QuantConfig(rules=(("neck/.*", True),)))


def test_calibrate_mode_observes_without_changing_outputs(small):
    model, variables, images = small
    out, updates = qat.quantized_apply(
        model.apply, variables, images, config=QuantConfig(), mode="calibrate"
    )
    np.testing.assert_array_equal(out, model.apply(variables, images))
    stats = updates["quant_stats"]
    assert sorted(leaf_names(stats)) == sorted(
        f"{layer}/input/{field}"
        for layer in ("dw/conv", "head", "stem/conv")
        for field in ("count", "max", "min")
    )
    stem = stats["stem"]["conv"]["input"]
    assert int(stem["count"]) == 1
    assert float(stem["min"]) == float(images.min()) and float(stem["max"]) == float(images.max())


def test_qat_mode_fake_quantizes_layer_inputs_and_trains(small):
    model, variables, images = small
    config = QuantConfig(freeze_observers_step=5)
    seen = {}

    def record(next_fun, args, kwargs, context):
        # Installed inside quantized_apply's interceptor: sees the fake-quantized input.
        if context.method_name == "__call__" and "/".join(context.module.path) == "head":
            seen["head"] = args[0]
        return next_fun(*args, **kwargs)

    def loss(params, quant_stats, step):
        def apply(variables, *args, **kwargs):
            with nn.intercept_methods(record):
                return model.apply(variables, *args, **kwargs)

        out, updates = qat.quantized_apply(
            apply,
            {**variables, "params": params, "quant_stats": quant_stats},
            images,
            config=config,
            mode="qat",
            step=step,
        )
        return jnp.sum(out**2), (updates["quant_stats"], seen["head"])

    stats = qat.init_quant_stats(model.apply, variables, images, config=config)
    assert int(stats["head"]["input"]["count"]) == 0
    (value, (stats, head_input)), grads = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], stats, 0
    )
    assert int(stats["head"]["input"]["count"]) == 1
    assert np.isfinite(value) and np.any(np.asarray(grads["stem"]["conv"]["kernel"]) != 0)
    state = observers.as_observer_state(stats["head"]["input"])
    scale, zero_point, _, _ = observers.observer_qparams(state)
    codes = np.asarray(head_input) / float(scale) + int(zero_point)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    (_, (frozen, _)), _ = jax.value_and_grad(loss, has_aux=True)(variables["params"], stats, 5)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), stats, frozen))


def test_eval_mode_needs_calibrated_observers(small):
    model, variables, images = small
    with pytest.raises(ValueError, match="observer for dw/conv was never updated"):
        qat.quantized_apply(model.apply, variables, images, config=QuantConfig(), mode="eval")
    stats = qat.init_quant_stats(model.apply, variables, images, config=QuantConfig())
    with pytest.raises(ValueError, match="was never updated: run calibration first"):
        qat.quantized_apply(
            model.apply,
            {**variables, "quant_stats": stats},
            images,
            config=QuantConfig(),
            mode="eval",
        )
    with pytest.raises(ValueError, match="mode must be one of"):
        qat.quantized_apply(model.apply, variables, images, config=QuantConfig(), mode="train")


def test_calibrate_runs_batches_and_eval_uses_the_result(small):
    model, variables, images = small
    batches = [images * (i + 1) for i in range(3)]
    config = QuantConfig()
    stats = qat.calibrate(model.apply, variables, batches, config)
    stem = stats["stem"]["conv"]["input"]
    assert int(stem["count"]) == 3
    assert float(stem["min"]) == float(min(b.min() for b in batches))
    assert float(stem["max"]) == float(max(b.max() for b in batches))
    out = qat.quantized_apply(
        model.apply, {**variables, "quant_stats": stats}, images, config=config, mode="eval"
    )
    float_out = model.apply(variables, images)
    assert not np.array_equal(out, float_out)
    np.testing.assert_allclose(out, float_out, atol=0.1 * float(jnp.abs(float_out).max()))
    with pytest.raises(ValueError, match="batches is empty"):
        qat.calibrate(model.apply, variables, [], config)


def test_ema_observer_config_is_used_by_the_interceptor(small):
    model, variables, images = small
    config = QuantConfig(observer="ema", momentum=0.5)
    stats = qat.calibrate(model.apply, variables, [images, 3 * images], config)
    stem = stats["stem"]["conv"]["input"]
    np.testing.assert_allclose(stem["max"], 0.5 * images.max() + 0.5 * 3 * images.max(), rtol=1e-6)
    assert numerics.int_range(config.activation_bits) == (-128, 127)


def test_jitted_qat_step_compiles_once(small):
    model, variables, images = small
    config = QuantConfig(freeze_observers_step=1)

    @jax.jit
    def step_fn(variables, step):
        return qat.quantized_apply(
            model.apply, variables, images, config=config, mode="qat", step=step
        )[1]["quant_stats"]

    stats = qat.init_quant_stats(model.apply, variables, images, config=config)
    for step in range(3):
        stats = step_fn({**variables, "quant_stats": stats}, step)
    assert step_fn._cache_size() == 1
    assert int(stats["stem"]["conv"]["input"]["count"]) == 1


def test_kernel_codes_times_steps_are_the_fake_quantized_kernels(small):
    _, variables, _ = small
    config = QuantConfig()
    params, batch_stats = variables["params"], variables["batch_stats"]
    kernels = qat.quantize_kernel_codes(params, batch_stats, config)
    assert sorted(kernels) == list(qat.quantized_layers(params, config))
    quantized = qat.quantize_weights(params, batch_stats, config)
    for layer, (codes, step) in kernels.items():
        codes = np.asarray(codes)
        np.testing.assert_array_equal(codes, np.round(codes))
        assert np.abs(codes).max() == 127 and step.shape == (codes.shape[-1],)
        expected = np.asarray(qat._lookup(quantized, f"{layer}/kernel"))
        np.testing.assert_allclose(codes * np.asarray(step), expected, rtol=1e-6, atol=1e-9)


def _qat_value_and_grads(model, variables, images, config):
    def loss(params):
        out, updates = qat.quantized_apply(
            model.apply,
            {**variables, "params": params},
            images,
            config=config,
            mode="qat",
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


def test_bfloat16_layers_compute_from_codes_as_exactly_as_float32(small):
    _, variables, images = small
    config = QuantConfig()
    variables = {
        **variables,
        "quant_stats": qat.calibrate(_Small().apply, variables, [images], config, train=False),
    }
    (_, out), grads = _qat_value_and_grads(_Small(), variables, images, config)
    (_, half_out), half_grads = _qat_value_and_grads(
        _Small(dtype=jnp.bfloat16), variables, images, config
    )
    # Integer codes are exact in bfloat16 and their sums in float32: the outputs are
    # the float32 model's, not bfloat16-rounded ones.
    assert half_out.dtype == jnp.float32
    np.testing.assert_allclose(half_out, out, rtol=1e-5, atol=1e-5)
    names = leaf_names(grads)
    for name, half, full in zip(
        names, jax.tree.leaves(half_grads), jax.tree.leaves(grads), strict=True
    ):
        assert half.dtype == jnp.float32
        # The backward convolutions of a bfloat16 layer run in bfloat16 (~0.4% error).
        # BatchNorm scales are left out: the stem's gradient is a sum that cancels to
        # 0.6 relative error in bfloat16 (2e-4 when the same codes are summed in float32).
        if not name.endswith("/scale"):
            error = float(jnp.linalg.norm(half - full) / jnp.linalg.norm(full))
            assert error < 1e-2, (name, error)


def test_bfloat16_layers_without_codes_would_round(small):
    """The reason for the codes: plain fake quant in bfloat16 is off by many steps."""
    _, variables, images = small
    config = QuantConfig()
    quant_stats = qat.calibrate(_Small().apply, variables, [images], config, train=False)
    layers = qat.quantized_layers(variables["params"], config)
    fake_params = qat.quantize_weights(variables["params"], variables["batch_stats"], config)
    half = _Small(dtype=jnp.bfloat16)

    def run(kernel_codes):
        interceptor = qat.activation_quant_interceptor(
            layers, config, mode="eval", kernel_codes=kernel_codes
        )
        with nn.intercept_methods(interceptor):
            return half.apply(
                {**variables, "params": fake_params, "quant_stats": quant_stats}, images
            )

    reference = qat.quantized_apply(
        _Small().apply,
        {**variables, "quant_stats": quant_stats},
        images,
        config=config,
        mode="eval",
    )
    codes = qat.quantize_kernel_codes(variables["params"], variables["batch_stats"], config)
    exact = np.abs(np.asarray(run(codes)) - np.asarray(reference)).max()
    rounded = np.abs(np.asarray(run(None), np.float32) - np.asarray(reference)).max()
    assert exact < 1e-5 * float(np.abs(reference).max()) < rounded

"""Int8 QAT and PTQ in the real training run, alone and composed with pruning."""

import jax
import numpy as np
import pytest

from jaxcomp import methods, paths, prune, quant, training
from jaxcomp.config import validate_config


def _restore(config, workdir, step=None):
    experiment = training.build_experiment(config)
    template = experiment.init_state(seed=1)
    manager = training.checkpoint_manager(str(workdir), config.train)
    step = manager.latest_step() if step is None else step
    return experiment, jax.device_get(training.restore_checkpoint(manager, step, template))


def _observers(state):
    return state.methods["quant"][quant.QUANT_STATS]


def test_pruned_qat_run_keeps_zeros_through_quantization_and_serves_int8(tiny_config, tmp_path):
    config = tiny_config
    config.prune.method = "unstructured"
    config.prune.sparsity = 0.5
    config.prune.schedule = "one_shot"
    config.quant.mode = "qat"
    config.quant.observer = "ema"
    config.quant.freeze_observers_step = 4
    config.quant.freeze_bn_step = 4
    result = training.train_and_evaluate(config, str(tmp_path))
    summary = result["compression"]
    assert set(summary) >= {"model", "int8"}
    # The int8 serving path decodes the same detections as fake quant, to within 0.2 AP.
    assert abs(summary["int8"]["AP"] - summary["model"]["AP"]) <= 0.002
    assert abs(summary["int8"]["AP50"] - summary["model"]["AP50"]) <= 0.002
    assert summary["int8"]["bytes_raw"] < summary["model"]["bytes_raw"] / 2

    experiment, final = _restore(config, tmp_path)
    _, at_4 = _restore(config, tmp_path, step=4)
    counts = {
        name: int(leaf)
        for name, leaf in zip(
            paths.leaf_names(_observers(final)), jax.tree.leaves(_observers(final)), strict=True
        )
        if name.endswith("count")
    }
    assert counts and set(counts.values()) == {4}, "observers must stop at step 4"
    # From step 4 on, observers and BatchNorm statistics are frozen; the weights still train.
    for frozen in (_observers, lambda state: state.batch_stats):
        for before, after in zip(
            jax.tree.leaves(frozen(at_4)),
            jax.tree.leaves(frozen(final)),
            strict=True,
        ):
            np.testing.assert_array_equal(before, after)
    assert any(
        not np.array_equal(before, after)
        for before, after in zip(
            jax.tree.leaves(at_4.params), jax.tree.leaves(final.params), strict=True
        )
    )

    masks = prune.masks_of(final.opt_state)
    quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    quantized = quant.quantize_weights(final.params, final.batch_stats, quant_config)
    for name, mask, weight in zip(
        paths.leaf_names(final.params),
        jax.tree.leaves(masks),
        jax.tree.leaves(quantized),
        strict=True,
    ):
        mask = np.broadcast_to(np.asarray(mask), np.shape(weight))
        assert (np.asarray(weight)[~mask] == 0).all(), f"{name}: a pruned weight became non-zero"


def test_ptq_calibrates_without_changing_the_weights(
    tiny_config, tmp_path, save_initial_checkpoint
):
    save_initial_checkpoint(tiny_config, tmp_path / "float", seed=7)
    config = tiny_config
    config.init_from = str(tmp_path / "float")
    config.quant.mode = "ptq"
    config.train.steps = 3
    config.optim.warmup_steps = 0
    result = training.train_and_evaluate(config, str(tmp_path / "ptq"))
    assert "int8" in result["compression"]

    experiment, calibrated = _restore(config, tmp_path / "ptq")
    float_variables = training.restore_variables(str(tmp_path / "float"), experiment.variables)
    for expected, actual in zip(
        jax.tree.leaves(float_variables),
        jax.tree.leaves({"batch_stats": calibrated.batch_stats, "params": calibrated.params}),
        strict=True,
    ):
        np.testing.assert_array_equal(actual, expected)
    counts = {
        int(leaf)
        for name, leaf in zip(
            paths.leaf_names(_observers(calibrated)),
            jax.tree.leaves(_observers(calibrated)),
            strict=True,
        )
        if name.endswith("count")
    }
    assert counts == {3}


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("quant.mode", "int4", r"config.quant.mode='int4'; use one of"),
        ("quant.weight_bits", 9, r"config.quant.weight_bits must be an integer in \[2, 8\]"),
        ("quant.activation_bits", 1, r"activation_bits must be an integer in \[2, 8\], got 1"),
        ("quant.freeze_bn_step", 99, r"config.quant.freeze_bn_step=99 must be None or in"),
        ("quant.observer", "histogram", "config.quant.observer='histogram'"),
    ],
)
def test_bad_quant_configs_name_the_field(tiny_config, field, value, message):
    tiny_config.quant.mode = "qat"
    section, name = field.split(".")
    tiny_config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(tiny_config, 1)


def test_ptq_without_a_trained_model_is_refused(tiny_config):
    tiny_config.quant.mode = "ptq"
    with pytest.raises(ValueError, match="set config.init_from"):
        validate_config(tiny_config, 1)

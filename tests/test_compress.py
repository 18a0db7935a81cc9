"""Pruning in the real training run: masks in the checkpoint, reports, shrinking, fine-tuning."""

import json
import os
import types

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcomp import methods, paths, prune, training
from jaxcomp.config import default_config, validate_config
from jaxcomp.models import create_model


def _prune_config(config, method, sparsity=0.5):
    config.prune.method = method
    config.prune.sparsity = sparsity
    config.prune.schedule = "polynomial"
    config.prune.begin_step = 0
    config.prune.end_step = 4
    config.prune.frequency = 2
    return config


def _first_batches(experiment, count):
    dataset = training.experiment_train_dataset(experiment)
    return [dataset[step] for step in range(count)]


def _restore_final_state(config, workdir):
    experiment = training.build_experiment(config)
    template = experiment.init_state(seed=1)
    manager = training.checkpoint_manager(str(workdir), config.train)
    return experiment, manager, template


def test_gradual_pruning_run_keeps_exact_masks_in_the_checkpoint(tiny_config, tmp_path):
    config = _prune_config(tiny_config, "unstructured")
    result = training.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and result["metrics"] is not None

    experiment, manager, template = _restore_final_state(config, tmp_path)
    rules = methods.default_prune_rules("unstructured", 0.5, paths.leaf_names(template.params))
    targets = dict(
        zip(
            paths.leaf_names(template.params),
            jax.tree.leaves(
                paths.resolve_rules(template.params, rules), is_leaf=lambda x: x is None
            ),
            strict=True,
        )
    )
    masks_by_step = {}
    for step in manager.all_steps():
        state = jax.device_get(training.restore_checkpoint(manager, step, template))
        masks_by_step[step] = dict(
            zip(
                paths.leaf_names(state.params),
                jax.tree.leaves(prune.masks_of(state.opt_state)),
                strict=True,
            )
        )
        if step == 6:
            final = state
    for name, param in zip(
        paths.leaf_names(final.params), jax.tree.leaves(final.params), strict=True
    ):
        mask = np.asarray(masks_by_step[6][name])
        if targets[name] is None:
            assert mask.all(), name
            continue
        assert (~mask).sum() == round(0.5 * param.size), name
        assert (param[~mask] == 0).all(), f"{name}: pruned weights must be exactly zero"
    # The update of step t sets the params of step t + 1: the checkpoint of step 4 holds
    # the masks of update 2 (sparsity 0.4375), step 6 those of update 4 (0.5). Monotone.
    for name in masks_by_step[6]:
        assert not (masks_by_step[6][name] & ~masks_by_step[4][name]).any()
    pruned = {
        step: sum(int((~np.asarray(mask)).sum()) for mask in masks.values())
        for step, masks in masks_by_step.items()
    }
    assert pruned[2] == 0 < pruned[4] < pruned[6]

    summary = json.load(open(tmp_path / "compression.json"))
    assert summary["model"] == result["compression"]["model"]
    model = result["compression"]["model"]
    assert model["nonzeros"] < model["parameters"]
    assert model["flops_nonzero"] < model["flops"]
    # On the tiny model orbax's per-array metadata outweighs the weights, so sizes are
    # compared in tests/test_prune_storage.py on a larger tree; here they must be measured.
    assert min(model["bytes_raw"], model["bytes_dense"], model["bytes_sparse"]) > 0
    assert os.path.isdir(tmp_path / "export" / "sparse")
    assert os.path.getsize(tmp_path / "sparsity.png") > 10_000
    assert "| **pruned leaves** |" in open(tmp_path / "sparsity.md").read()


# ~55 s; tests/test_shrink.py checks shrunk == masked outputs on the model directly.
@pytest.mark.slow
def test_channel_pruning_run_exports_a_smaller_model_with_equal_outputs(tiny_config, tmp_path):
    config = _prune_config(tiny_config, "channel")
    result = training.train_and_evaluate(config, str(tmp_path))
    model_row, shrunk_row = result["compression"]["model"], result["compression"]["shrunk"]
    assert shrunk_row["parameters"] < model_row["parameters"]
    assert shrunk_row["flops"] < model_row["flops"]
    # After 6 steps both APs are ~0, so equal APs would prove nothing: the outputs are compared.

    export = tmp_path / "export"
    checkpointer = ocp.StandardCheckpointer()
    masked = checkpointer.restore(str(export / "dense"))
    shrunk = checkpointer.restore(str(export / "shrunk" / "dense"))
    num_classes = masked["params"]["heatmap"]["out"]["kernel"].shape[-1]
    masked_model = create_model("centernet_tiny", num_classes=num_classes)
    shrunk_model = create_model(
        "centernet_tiny", num_classes=num_classes, channels=dict(shrunk_row["channels"])
    )
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    expected = masked_model.apply(masked, images)
    actual = shrunk_model.apply(shrunk, images)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-4)


def test_init_from_starts_from_another_runs_parameters(
    tiny_config, tmp_path, save_initial_checkpoint
):
    saved = save_initial_checkpoint(tiny_config, tmp_path / "dense", seed=7)
    experiment = training.build_experiment(tiny_config)
    variables = training.restore_variables(str(tmp_path / "dense"), experiment.variables)
    state = training.init_state(
        experiment.model, experiment.optimizer, 64, 0, experiment.mesh, variables
    )
    for expected, actual in zip(
        jax.tree.leaves((saved.params, saved.batch_stats)),
        jax.tree.leaves((state.params, state.batch_stats)),
        strict=True,
    ):
        np.testing.assert_array_equal(actual, expected)

    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*init_from=''"):
        training.restore_variables(str(tmp_path / "missing"), experiment.variables)
    tiny_config.model.channels = (("heatmap/hidden", 8),)
    smaller = training.build_experiment(tiny_config)
    with pytest.raises(ValueError, match="does not fit config.model.name.*heatmap"):
        training.restore_variables(str(tmp_path / "dense"), smaller.variables)


class _ConvDense(nn.Module):
    """A 3x3 stride-2 conv (3 -> 4 channels), then a dense layer (4 -> 5) at every position."""

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.Conv(4, (3, 3), strides=2, name="conv")(images)
        return nn.Dense(5, name="dense")(x)


def test_compression_summary_counts_of_a_model_counted_by_hand(tmp_path):
    config = default_config()  # not pruned, not quantized
    config.data.image_size = 8
    model = _ConvDense()
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.uint8))
    params = jax.tree.map(lambda leaf: np.ones(leaf.shape, np.float32), shapes["params"])
    params["conv"]["kernel"][..., 0] = 0.0  # one output channel: 3 * 3 * 3 weights
    params["dense"]["kernel"][0] = 0.0  # one input channel: 5 weights
    state = training.TrainState(step=6, params=params, batch_stats={}, opt_state=None)
    experiment = types.SimpleNamespace(config=config, model=model, methods=())
    summary = training.compression_summary(
        experiment, state, str(tmp_path), {"AP": 0.4, "AP50": 0.6}
    )

    model_row = summary["model"]
    # 8x8 input, stride 2: 4x4 = 16 output positions for the conv and the dense layer alike.
    conv_macs, dense_macs = 16 * (3 * 3 * 3 * 4), 16 * (4 * 5)
    parameters = (3 * 3 * 3 * 4 + 4) + (4 * 5 + 5)
    assert model_row["parameters"] == parameters == 137
    assert model_row["nonzeros"] == parameters - 27 - 5
    assert model_row["sparsity"] == pytest.approx(32 / 137)
    assert model_row["flops"] == 2 * (conv_macs + dense_macs) == 4096
    assert model_row["flops_nonzero"] == 2 * (16 * (108 - 27) + 16 * (20 - 5)) == 3072
    assert model_row["bytes_raw"] == 4 * parameters  # float32
    assert min(model_row["bytes_dense"], model_row["bytes_sparse"]) > 0
    assert (model_row["AP"], model_row["AP50"]) == (0.4, 0.6)
    assert set(summary) == {"model", "layers"}
    assert json.load(open(tmp_path / "compression.json")) == json.loads(json.dumps(summary))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prune.method", "magnitude", r"config.prune.method='magnitude'; use one of"),
        ("prune.sparsity", 1.0, r"config.prune.sparsity must be in \[0, 1\), got 1.0"),
        ("prune.sparsity", -0.1, r"config.prune.sparsity must be in \[0, 1\)"),
        ("prune.end_step", 0, "the schedule's end must come after its start"),
        ("prune.n", 5, "needs 0 < n <= m"),
        ("prune.score", "taylor", "config.prune.score='taylor'; use one of"),
    ],
)
def test_bad_prune_configs_name_the_field(tiny_config, field, value, message):
    tiny_config.prune.method = "unstructured"
    section, name = field.split(".")
    tiny_config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(tiny_config, 1)


def test_rules_that_match_nothing_fail_before_training(tiny_config, tmp_path):
    tiny_config.prune.method = "unstructured"
    tiny_config.prune.rules = ((r"backbone/blok_\d+/.*kernel", 0.5),)
    with pytest.raises(ValueError, match="matched no leaf"):
        training.train_and_evaluate(tiny_config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_nm_pruning_step_compiles_once_and_keeps_the_pattern(tiny_config):
    config = _prune_config(tiny_config, "nm")
    config.prune.schedule = "one_shot"
    experiment = training.build_experiment(config)
    state = experiment.init_state(seed=0)
    batches = [
        training.global_batch(batch, experiment.mesh, training.TRAIN_FIELDS)
        for batch in _first_batches(experiment, 3)
    ]
    for batch in batches:  # the first step computes the masks, the others only apply them
        state, _ = experiment.train_step_at(0)(state, batch)
    assert experiment.jitted_train_step(0)._cache_size() == 1, "the pruning train step re-compiled"
    params = jax.device_get(state.params)
    rules = dict(methods.default_prune_rules("nm", 0.5, paths.leaf_names(params)))
    checked = 0
    for name, kernel in zip(paths.leaf_names(params), jax.tree.leaves(params), strict=True):
        if not name.endswith("kernel") or "depthwise" in name or "_dw/" in name or name in rules:
            continue
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
        assert ((groups != 0).sum(axis=1) <= 2).all(), f"{name} breaks 2:4"
        checked += 1
    assert checked > 10

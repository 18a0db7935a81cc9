"""Distillation inside the real jitted train step, on the tiny detector and dataset."""

import jax
import numpy as np
import pytest

from jaxcomp import training
from jaxcomp.config import validate_config

# The teacher's heads are narrower than the student's, so a feature term on a head's
# hidden conv needs the 1x1 adapter (the tiny neck has one width only).
TEACHER_CHANNELS = (("heatmap/hidden", 8),)


@pytest.fixture
def teacher_workdir(tiny_config, tmp_path, save_initial_checkpoint):
    config = tiny_config.copy_and_resolve_references()
    config.model.channels = TEACHER_CHANNELS
    save_initial_checkpoint(config, tmp_path / "teacher", seed=7)
    return str(tmp_path / "teacher")


def _distill_config(config, teacher_workdir):
    config.distill.teacher = teacher_workdir
    config.distill.teacher_model = "centernet_tiny"
    config.distill.teacher_channels = TEACHER_CHANNELS
    config.distill.temperature = 2.0
    config.distill.feature_layers = (("heatmap/conv", 1.0),)
    config.distill.feature_loss = "pkd"
    return config


def test_distillation_step_trains_student_and_adapter_leaves_teacher_alone(
    tiny_config, teacher_workdir
):
    config = _distill_config(tiny_config, teacher_workdir)
    experiment = training.build_experiment(config)
    state = experiment.init_state(seed=0)
    adapter_before = jax.device_get(state.method_params["distill"]["heatmap"]["conv"])
    assert adapter_before["kernel"].shape == (16, 8), "a 1x1 adapter maps 16 to 8 channels"
    teacher_before = jax.device_get(experiment.constants["distill"])
    student_before = jax.device_get(state.params)
    dataset = training.experiment_train_dataset(experiment)
    losses = []
    for step in range(3):
        batch = training.global_batch(dataset[step], experiment.mesh, training.TRAIN_FIELDS)
        state, metrics = experiment.train_step_at(step)(state, batch)
        losses.append(jax.device_get(metrics))
    assert experiment.jitted_train_step(0)._cache_size() == 1, "the distillation step re-compiled"
    for name in ("distill_heatmap", "distill_size", "distill_offset", "distill_feature"):
        assert np.isfinite(losses[-1][name]) and losses[-1][name] > 0, name
    np.testing.assert_allclose(
        losses[-1]["total"],
        losses[-1]["detection"]
        + losses[-1]["distill_heatmap"]
        + 0.1 * losses[-1]["distill_size"]
        + losses[-1]["distill_offset"]
        + losses[-1]["distill_feature"],
        rtol=1e-5,
    )
    for before, after in zip(
        jax.tree.leaves(teacher_before),
        jax.tree.leaves(jax.device_get(experiment.constants["distill"])),
        strict=True,
    ):
        np.testing.assert_array_equal(before, after)
    adapter_after = jax.device_get(state.method_params["distill"]["heatmap"]["conv"])
    assert not np.array_equal(adapter_before["kernel"], adapter_after["kernel"])
    # Every student leaf moved (the teacher's did not, above).
    changed = jax.tree.map(
        lambda before, after: not np.array_equal(before, after),
        student_before,
        jax.device_get(state.params),
    )
    assert all(jax.tree.leaves(changed)), changed


def test_missing_teacher_is_an_error_before_any_file_is_written(tiny_config, tmp_path):
    config = _distill_config(tiny_config, str(tmp_path / "no_teacher"))
    workdir = tmp_path / "student"
    with pytest.raises(FileNotFoundError, match="config.distill.teacher=.*holds no checkpoint"):
        training.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_teacher_of_another_dataset_names_the_head_and_shapes(
    tiny_config, tmp_path, save_initial_checkpoint
):
    other = tiny_config.copy_and_resolve_references()
    other.model.channels = TEACHER_CHANNELS
    save_initial_checkpoint(other, tmp_path / "teacher", seed=1)
    config = _distill_config(tiny_config, str(tmp_path / "teacher"))
    config.distill.teacher_channels = ()  # what the teacher was trained with differs
    with pytest.raises(ValueError, match=r"heatmap/conv/kernel: \(1, 1, 16, 8\) != .*16\)"):
        training.build_experiment(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 0.0, "config.distill: the distillation temperature must be > 0, got 0"),
        ("heatmap_loss", "focal", "unknown distillation loss 'focal'"),
        ("feature_weight", -0.5, "feature_weight must be >= 0"),
        ("teacher_model", "resnet50", "config.distill.teacher_model='resnet50' is not a model"),
    ],
)
def test_bad_distillation_settings_fail_validation(tiny_config, field, value, message):
    config = _distill_config(tiny_config, "workdirs/teacher")
    config.distill[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config, 1)


def test_distillation_with_ptq_is_rejected(tiny_config):
    config = _distill_config(tiny_config, "workdirs/teacher")
    config.init_from = "workdirs/student"
    config.quant.mode = "ptq"
    with pytest.raises(ValueError, match="nothing to distil"):
        validate_config(config, 1)

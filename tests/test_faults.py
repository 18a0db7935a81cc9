"""Fault injection: killed and preempted runs, damaged checkpoints, an unusable workdir.

The killed runs are real CLI subprocesses (`python -m jaxcomp.main`) on the tiny model
and dataset; their resumed results are compared leaf by leaf, exactly, with an
uninterrupted CLI run of the same config. A run to be signalled is held at a chosen step
until the signal is sent, so what the tests assert follows from events (a step logged, a
checkpoint directory renamed into place), never from how fast the machine is.
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from jaxcomp import paths, prune, training
from jaxcomp.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_CHANNELS = (("heatmap/hidden", 8),)
STEPS = 16
NOBODY = 65534  # the conventional unprivileged user id


def _tiny_fields(data_dir: str) -> dict:
    return {
        "data.name": "jaxcomp_embedded/tiny",
        "data.data_dir": data_dir,
        "data.image_size": 64,
        "data.max_objects": 8,
        "data.num_workers": 0,
        "model.name": "centernet_tiny",
        "train.steps": STEPS,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "optim.warmup_steps": 2,
        "eval.batch_size": 16,
        "eval.top_k": 20,
    }


def _compressed_fields(teacher_workdir: str) -> dict:
    """Gradual pruning + QAT (observers and BatchNorm frozen late) + distillation."""
    return {
        "prune.method": "unstructured",
        "prune.sparsity": 0.5,
        "prune.schedule": "polynomial",
        "prune.begin_step": 0,
        "prune.end_step": 12,
        "prune.frequency": 2,
        "quant.mode": "qat",
        "quant.observer": "ema",
        "quant.freeze_observers_step": 12,
        "quant.freeze_bn_step": 12,
        "distill.teacher": teacher_workdir,
        "distill.teacher_model": "centernet_tiny",
        "distill.teacher_channels": TEACHER_CHANNELS,
        "distill.temperature": 2.0,
        "distill.feature_layers": (("heatmap/conv", 1.0),),
    }


def _protocol_fields(teacher_workdir: str) -> dict:
    """The methods written on the protocol: movement pruning (scores in its state), LSQ
    (learned steps, first-batch zero points) and distillation from two layers."""
    return {
        "prune.method": "unstructured",
        "prune.score": "movement",
        "prune.sparsity": 0.5,
        "prune.begin_step": 1,
        "prune.end_step": 12,
        "prune.frequency": 2,
        "quant.mode": "lsq",
        "distill.teacher": teacher_workdir,
        "distill.teacher_model": "centernet_tiny",
        "distill.teacher_channels": TEACHER_CHANNELS,
        "distill.feature_layers": (("heatmap/conv", 0.5), ("neck", 1.0)),
    }


def _config(fields: dict):
    config = default_config()
    for key, value in fields.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config


_CONFIG_FILE = """from jaxcomp.config import default_config


def get_config():
    config = default_config()
    for key, value in {fields!r}.items():
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[name] = value
    return config
"""


def _config_file(fields: dict, path) -> str:
    """A config file for the CLI setting exactly `fields`, as `_config` does in-process."""
    path.write_text(_CONFIG_FILE.format(fields=fields))
    return str(path)


# Resumed runs are compared bit for bit: every run computes on CPU, whatever the host has.
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# Generous bounds for a busy 2-core machine (a 90 s run took over 600 s at a load of 14):
# a run that takes longer is hung, not slow.
TIMEOUT_SECONDS = 1800


def _command(config_file: str, workdir, cache_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxcomp.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={cache_dir}",
    ]


def _run_cli(command: list[str]) -> str:
    """Runs the CLI to its end; returns its output, or fails showing it."""
    result = subprocess.run(
        command, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _start_paused(command: list[str], log, pause_at: int, resume_file):
    """Starts the CLI paused after logging step `pause_at`, until `resume_file` exists.

    A signal sent while it waits lands at a known step, however fast the machine
    (`tests/pausing_cli.py`).

    Its output goes to the file `log` (a pipe could fill and block).
    """
    script = os.path.join(REPO, "tests", "pausing_cli.py")
    env = {**_ENV, "JAXCOMP_TEST_PAUSE_AT": str(pause_at), "JAXCOMP_TEST_RESUME": str(resume_file)}
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, script, *command[3:]],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _finalized_steps(workdir) -> list[int]:
    """Steps whose checkpoint is complete: orbax renames a step's directory into place last."""
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(name) for name in names if name.isdigit())


def _logged_step(workdir) -> int:
    """The last step in metrics.jsonl (0 if none); a line being written is skipped."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    steps = [0]
    for line in open(metrics).readlines() if os.path.exists(metrics) else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return max(steps)


def _wait_for(process, condition, what: str, log) -> None:
    """Waits until `condition()` holds; fails if the run ends first or seems hung."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"the run ended (exit {process.returncode}) before {what}:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"no {what} after {TIMEOUT_SECONDS} s, the run looks hung:\n"
                f"{log.read_text()[-3000:]}"
            )
        time.sleep(0.02)


def _wait_for_exit(process, log) -> int:
    """The run's exit status; fails if it does not exit (a hung run)."""
    try:
        return process.wait(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the run did not exit within {TIMEOUT_SECONDS} s:\n{log.read_text()[-3000:]}")


def _template(config):
    return training.build_experiment(config).init_state(seed=1)


def _final_state(config, workdir, template):
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        assert manager.latest_step() == config.train.steps
        return jax.device_get(training.restore_checkpoint(manager, config.train.steps, template))


def _max_abs_difference(a, b) -> dict[str, float]:
    """Per field of the TrainState, the max |a - b| over all of its leaves."""
    differences = {}
    for field in (
        "step",
        "params",
        "batch_stats",
        "opt_state",
        "methods",
        "method_params",
        "method_opt_state",
    ):
        leaves_a, leaves_b = jax.tree.leaves(getattr(a, field)), jax.tree.leaves(getattr(b, field))
        assert len(leaves_a) == len(leaves_b), field
        differences[field] = max(
            (
                float(np.max(np.abs(np.float64(x) - np.float64(y)), initial=0.0))
                for x, y in zip(leaves_a, leaves_b, strict=True)
            ),
            default=0.0,
        )
    return differences


@pytest.fixture(scope="module")
def teacher_workdir(tiny_data_dir, tmp_path_factory):
    config = _config({**_tiny_fields(tiny_data_dir), "model.channels": TEACHER_CHANNELS})
    workdir = tmp_path_factory.mktemp("teacher")
    experiment = training.build_experiment(config)
    state = experiment.init_state(seed=7)
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        training.save_checkpoint(manager, state)
    return str(workdir)


def _uninterrupted_run(fields: dict, directory, cache_dir: str):
    """Runs the CLI on `fields` from scratch to its end; returns its final state."""
    command = _command(_config_file(fields, directory / "config.py"), directory / "run", cache_dir)
    _run_cli(command)
    config = _config(fields)
    return _final_state(config, directory / "run", _template(config))


@pytest.fixture(scope="module")
def plain_reference(tiny_data_dir, tmp_path_factory, compilation_cache):
    """The uninterrupted plain run: its config fields and final state."""
    fields = _tiny_fields(tiny_data_dir)
    directory = tmp_path_factory.mktemp("plain_reference")
    return fields, _uninterrupted_run(fields, directory, compilation_cache)


def _kill_and_resume(fields, reference, tmp_path, cache_dir, seed: int) -> dict[str, float]:
    """SIGKILLs the CLI run at a seeded random step after its first checkpoint, resumes it.

    Returns the max abs difference to `reference` per state field.
    """
    workdir = tmp_path / "killed"
    command = _command(_config_file(fields, tmp_path / "config.py"), workdir, cache_dir)
    kill_at = int(np.random.default_rng(seed).integers(3, STEPS - 5))
    log = tmp_path / "killed.log"
    # Never resumed: the run waits at `kill_at` until it is killed.
    process = _start_paused(command, log, pause_at=kill_at, resume_file=tmp_path / "never")
    _wait_for(
        process,
        lambda: _logged_step(workdir) == kill_at and _finalized_steps(workdir),
        f"step {kill_at} and a complete checkpoint",
        log,
    )
    process.kill()
    assert _wait_for_exit(process, log) == -signal.SIGKILL
    saved = _finalized_steps(workdir)
    assert _logged_step(workdir) == kill_at and max(saved) < kill_at, saved

    output = _run_cli(command)
    assert f"checkpoint of step {max(saved)} in" in output, output
    config = _config(fields)
    return _max_abs_difference(_final_state(config, workdir, _template(config)), reference)


# Two CLI starts (imports, cached compiles) after the reference's; 130 s, plus 270 s for
# the reference, in a `-m slow -n 2` run on 2 cores shared with other work (load ~10).
@pytest.mark.slow
def test_sigkill_at_random_step_then_resume_equals_uninterrupted_run(
    plain_reference, tmp_path, compilation_cache
):
    fields, reference = plain_reference
    differences = _kill_and_resume(fields, reference, tmp_path, compilation_cache, seed=0)
    assert differences == dict.fromkeys(differences, 0.0)


# Three CLI starts, the first compiling the pruned, QAT and distilled steps: 720 s there.
@pytest.mark.slow
def test_sigkill_of_pruned_qat_distilled_run_then_resume_is_exact(
    tiny_data_dir, teacher_workdir, tmp_path, compilation_cache
):
    fields = {**_tiny_fields(tiny_data_dir), **_compressed_fields(teacher_workdir)}
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = _uninterrupted_run(fields, reference_dir, compilation_cache)
    # Every part of the state a resume must bring back is there to compare.
    masks = jax.tree.leaves(prune.masks_of(reference.opt_state))
    assert masks and not all(np.all(mask) for mask in masks), "no weight was pruned"
    observers = reference.methods["quant"]["quant_stats"]
    assert jax.tree.leaves(observers) and jax.tree.leaves(reference.method_params["distill"])
    assert any(name.endswith("count") for name in paths.leaf_names(observers))
    differences = _kill_and_resume(fields, reference, tmp_path, compilation_cache, seed=1)
    assert differences == dict.fromkeys(differences, 0.0)


# ~90 s, as the test above, for the methods written on the protocol.
@pytest.mark.slow
def test_sigkill_of_movement_lsq_two_layer_distilled_run_then_resume_is_exact(
    tiny_data_dir, teacher_workdir, tmp_path, compilation_cache
):
    fields = {**_tiny_fields(tiny_data_dir), **_protocol_fields(teacher_workdir)}
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = _uninterrupted_run(fields, reference_dir, compilation_cache)
    scores = jax.tree.leaves(reference.methods["prune"]["scores"])
    assert any(np.any(leaf != 0) for leaf in scores), "no movement was accumulated"
    assert bool(reference.methods["quant"]["initialized"])
    assert jax.tree.leaves(reference.method_params["quant"])
    assert jax.tree.leaves(reference.method_params["distill"])
    differences = _kill_and_resume(fields, reference, tmp_path, compilation_cache, seed=2)
    assert differences == dict.fromkeys(differences, 0.0)


# Each run is held after logging one of these steps, signalled, then let go: the step after
# it is odd, so its checkpoint (checkpoint_every=2) can only come from the SIGTERM.
SIGTERM_AFTER = (2, 6, 10)


# Three SIGTERMs, each followed by a CLI start that resumes: 200 s there.
@pytest.mark.slow
def test_repeated_sigterm_saves_last_step_exits_0_and_resume_is_exact(
    plain_reference, tmp_path, compilation_cache
):
    fields, reference = plain_reference
    workdir = tmp_path / "preempted"
    command = _command(_config_file(fields, tmp_path / "config.py"), workdir, compilation_cache)
    for attempt, pause_at in enumerate(SIGTERM_AFTER):
        log, resume_file = tmp_path / f"preempted_{attempt}.log", tmp_path / f"resume_{attempt}"
        process = _start_paused(command, log, pause_at, resume_file)
        _wait_for(process, lambda s=pause_at: _logged_step(workdir) == s, f"step {pause_at}", log)
        assert pause_at + 1 not in _finalized_steps(workdir)
        process.send_signal(signal.SIGTERM)
        resume_file.touch()
        assert _wait_for_exit(process, log) == 0, log.read_text()
        # The step in flight when the signal came is finished, saved, and the run stops.
        stopped = pause_at + 1
        assert _logged_step(workdir) == stopped
        assert max(_finalized_steps(workdir)) == stopped, _finalized_steps(workdir)
        assert f"Stopped at step {stopped}" in log.read_text()
    _run_cli(command)
    config = _config(fields)
    differences = _max_abs_difference(_final_state(config, workdir, _template(config)), reference)
    assert differences == dict.fromkeys(differences, 0.0)


# Damaged checkpoints, in-process and fast: steps 2, 4, 6 of a tiny state, 6 damaged.


@pytest.fixture(scope="module")
def saved_steps(tiny_data_dir, tmp_path_factory):
    """A checkpoint directory of steps 2, 4, 6 whose params differ (+ step); and the states."""
    config = _config(_tiny_fields(tiny_data_dir))
    template = _template(config)
    workdir = tmp_path_factory.mktemp("saved_steps")
    states = {}
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        for step in (2, 4, 6):
            states[step] = template.replace(
                step=template.step + step,
                params=jax.tree.map(lambda leaf, s=step: leaf + s, template.params),
            )
            training.save_checkpoint(manager, states[step])
    return config, str(workdir), jax.device_get(states), template


def _truncate_array_file(step_dir):
    biggest = max(glob.glob(f"{step_dir}/default/ocdbt.process_0/d/*"), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)


def _remove_array_files(step_dir):
    for path in glob.glob(f"{step_dir}/default/ocdbt.process_0/d/*"):
        os.remove(path)


def _remove_item_metadata(step_dir):
    os.remove(f"{step_dir}/default/_METADATA")


def _empty_step_dir(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


DAMAGES = {
    "truncated_array_file": _truncate_array_file,
    "array_files_missing": _remove_array_files,
    "item_metadata_missing": _remove_item_metadata,
    "empty_step_dir": _empty_step_dir,
}


@pytest.fixture
def damaged_copy(saved_steps, tmp_path):
    config, workdir, states, template = saved_steps
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return config, copy, states, template


def _assert_restored(restored, expected):
    for got, want in zip(
        jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_step_falls_back_with_warning_and_keeps_good_steps(
    damaged_copy, damage, caplog, capsys
):
    config, workdir, states, template = damaged_copy
    checkpoints = workdir / "checkpoints"
    DAMAGES[damage](checkpoints / "6")
    with (
        caplog.at_level(logging.WARNING),
        training.checkpoint_manager(str(workdir), config.train) as manager,
    ):
        restored = training.restore_latest(manager, template)
        _assert_restored(restored, states[4])
        assert manager.all_steps() == [2, 4]
        # The step's next save is not refused as "already exists".
        training.save_checkpoint(manager, restored.replace(step=restored.step + 2))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 4, 6]
    # Names the bad step, why, where it went and the step used; logged and printed.
    message = (
        r"checkpoint of step 6 in .* cannot be restored \(.+\); moved it to "
        r"6\.unreadable-\S+ and resuming from the checkpoint of step 4"
    )
    assert re.search(message, caplog.text) and re.search(message, capsys.readouterr().out)
    assert len(glob.glob(str(checkpoints / "6.unreadable-*"))) == 1


def test_save_interrupted_by_a_crash_is_reported_and_redone(damaged_copy, capsys):
    config, workdir, states, template = damaged_copy
    checkpoints = workdir / "checkpoints"
    # What a process killed while writing step 6 leaves: orbax's tmp dir, half-written.
    _truncate_array_file(checkpoints / "6")
    os.remove(checkpoints / "6" / "commit_success.txt")
    os.rename(checkpoints / "6", checkpoints / "6.orbax-checkpoint-tmp")
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        restored = training.restore_latest(manager, template)
        _assert_restored(restored, states[4])
        training.save_checkpoint(manager, restored.replace(step=restored.step + 2))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 4, 6]
    output = capsys.readouterr().out
    assert "save of step 6 in" in output and "resuming from the checkpoint of step 4" in output
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]


def test_no_readable_step_is_an_error_naming_the_directory_and_moves_nothing(damaged_copy):
    config, workdir, _, template = damaged_copy
    checkpoints = workdir / "checkpoints"
    for step in (2, 4, 6):
        _remove_array_files(checkpoints / str(step))
    with (
        training.checkpoint_manager(str(workdir), config.train) as manager,
        pytest.raises(
            RuntimeError,
            match=rf"no checkpoint in {re.escape(str(checkpoints))} can be restored: step 6: ",
        ),
    ):
        training.restore_latest(manager, template)
    assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]


# ~30 s (the train step's compile): the unit tests above cover the same fallback.
@pytest.mark.slow
def test_run_resumes_past_a_damaged_step_and_saves_it_again(saved_steps, tmp_path):
    """Through `train_and_evaluate`: restores step 4, retrains and re-saves step 6."""
    config, workdir, _, _ = saved_steps
    shutil.copytree(workdir, tmp_path / "run")
    _truncate_array_file(tmp_path / "run" / "checkpoints" / "6")
    result = training.train_and_evaluate(config, str(tmp_path / "run"), stop_at=6)
    assert result["step"] == 6 and result["preempted"]
    assert _finalized_steps(tmp_path / "run") == [2, 4, 6]
    assert len(glob.glob(str(tmp_path / "run" / "checkpoints" / "6.unreadable-*"))) == 1


# An unusable workdir fails before anything is built or compiled.


@pytest.fixture
def compiles():
    """The names of the XLA compiles (or compile-cache reads) made while the test runs."""
    seen = []

    def on_event(event, **kwargs):
        if "compile" in event:
            seen.append(event)

    def on_duration(event, duration, **kwargs):
        on_event(event)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    yield seen
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_duration)


def test_workdir_under_a_file_is_refused_before_any_compile(saved_steps, tmp_path, compiles):
    config = saved_steps[0]
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" / "run"
    with pytest.raises(NotADirectoryError, match=r"cannot create workdir '.*file/run': .*file is"):
        training.train_and_evaluate(config, str(workdir))
    assert compiles == []


def test_full_disk_is_refused_before_any_compile(saved_steps, tmp_path, compiles, monkeypatch):
    # Simulated: the real free space of tmp_path is below a minimum set above it.
    monkeypatch.setattr(training.checkpoints, "MIN_FREE_BYTES", 2**62)
    workdir = tmp_path / "run"
    with pytest.raises(OSError, match=r"the disk of workdir '.*run' is full: .* MiB free") as error:
        training.train_and_evaluate(saved_steps[0], str(workdir))
    assert error.value.errno == 28  # ENOSPC
    assert compiles == [] and not workdir.exists()


# `check_workdir` directly, root or not: what each refusal names, and that it creates nothing.


def test_check_workdir_refuses_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    workdir = tmp_path / "file" / "runs" / "run"
    with pytest.raises(
        NotADirectoryError,
        match=rf"cannot create workdir '{re.escape(str(workdir))}': "
        rf"{re.escape(str(tmp_path / 'file'))} is a file, not a directory; pass --workdir",
    ):
        training.check_workdir(str(workdir))
    assert (tmp_path / "file").read_text() == "not a directory"


def test_check_workdir_refuses_a_disk_with_less_free_space_than_required(tmp_path):
    workdir = tmp_path / "new" / "run"
    stats = os.statvfs(tmp_path)
    # More than the disk holds in all, so other writers cannot change the outcome.
    required = stats.f_blocks * stats.f_frsize + 2**30
    with pytest.raises(OSError, match=rf"workdir '.*new/run' is full: .* MiB free at {tmp_path}"):
        training.check_workdir(str(workdir), min_free_bytes=required)
    training.check_workdir(str(workdir), min_free_bytes=0)
    assert not (tmp_path / "new").exists()


def _error_as_user(uid: int, function) -> str:
    """Calls `function()` in a forked child running as `uid`; its exception as 'Type: message'.

    Returns '' if it raised nothing.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        message = ""
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            function()
        except Exception as error:  # reported to the parent, which asserts on it
            message = f"{type(error).__name__}: {error}"
        finally:
            # Whatever happened, the child must not return into pytest.
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        message = reader.read()
    os.waitpid(child, 0)
    return message


# The forked child only drops its user and calls `check_workdir` (no JAX), then exits.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_check_workdir_refuses_a_directory_the_user_cannot_write(tmp_path):
    if os.geteuid() != 0:
        parent = tmp_path / "read_only"
        parent.mkdir(mode=0o500)
        with pytest.raises(
            PermissionError, match=r"cannot write to workdir .*read_only.* not writ"
        ):
            training.check_workdir(str(parent / "run"))
        return
    # Root may write anywhere: ask as an unprivileged user, in a directory it can reach
    # (pytest's tmp_path is private to root) but not write.
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        parent = os.path.join(base, "read_only")
        os.mkdir(parent, mode=0o755)
        message = _error_as_user(
            NOBODY, lambda: training.check_workdir(os.path.join(parent, "run"))
        )
    assert re.fullmatch(
        rf"PermissionError: cannot write to workdir '{re.escape(parent)}/run': "
        rf"{re.escape(parent)} is not writable by this user; pass --workdir .*",
        message,
    ), message

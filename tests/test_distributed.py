"""A real two-process run of the CLI (`jax.distributed` over gloo on CPU) against one process.

Process layout: 2 processes x 2 simulated CPU devices = the same 4-device `data`
mesh as 1 process x 4 devices, so the two runs compute the same global batches.
The single-process run trains from scratch and checkpoints every step; the
two-process run resumes from its step-1 checkpoint (a single-process checkpoint
restored by 2 processes) and finishes, each process reading its own half of every
batch; the test process (1 device) then restores both final checkpoints (the
2-process one included) and compares them.

Adam normalises every gradient entry by its own magnitude, so an entry whose
gradient is float noise moves by a full learning-rate step in a sign that the
noise picks: the two runs' gradients agree to ~1e-6 (all-reduce order differs),
their losses to ~1e-5, and their parameters to within a small fraction of the
distance training moved them, not bit for bit.
"""

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxcomp import training
from jaxcomp.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
RESUME_STEP = 1
SIZE = 64

# Cold compiles dominate (~3.5 min on 2 CPU cores): the single-process run, then the two
# processes compiling side by side. (`jax_share_binary_between_hosts` would compile once, but
# in jax 0.10.2 process 1 hung here, waiting for a program that process 0 never shared.)
# One worker builds the module fixture once (`make test-slow` runs with --dist=loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def _config_file(directory, data_dir: str, **changes) -> str:
    """conftest's tiny config as a config file, checkpointing every step of a 3-step run."""
    overrides = {
        "data.name": "jaxcomp_embedded/tiny",
        "data.data_dir": data_dir,
        "data.image_size": SIZE,
        "data.max_objects": 8,
        "data.num_workers": 0,
        "model.name": "centernet_tiny",
        # The grouped depthwise conv compiles in half the time of the shifted one on CPU.
        "model.depthwise_impl": "grouped",
        "train.steps": STEPS,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "train.keep_checkpoints": STEPS,
        # Step 1 runs at learning rate 0 (warmup), so steps 2 and 3 move the parameters.
        "optim.warmup_steps": 1,
        "eval.batch_size": 16,
        "eval.top_k": 20,
        **changes,
    }
    path = directory / "tiny_distributed.py"
    path.write_text(
        "from jaxcomp.config import default_config\n\n\n"
        "def get_config():\n"
        "    config = default_config()\n"
        f"    config.update_from_flattened_dict({overrides!r})\n"
        "    return config\n"
    )
    return str(path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _started(commands: list[tuple[list[str], int]], log_paths: list, extra_env=None):
    """Starts `(command, device count)` pairs at once; kills what still runs on exit."""
    processes = []
    try:
        for (command, devices), log_path in zip(commands, log_paths, strict=True):
            env = {
                **os.environ,
                **(extra_env or {}),
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            }
            with open(log_path, "w") as log:
                processes.append(
                    subprocess.Popen(
                        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_all(processes, log_paths: list, timeout: float) -> None:
    """Waits for every process; fails with the log of one that failed."""
    for process in processes:
        process.wait(timeout=timeout)
    for process, log_path in zip(processes, log_paths, strict=True):
        assert process.returncode == 0, log_path.read_text()[-5000:]


def _run(commands: list[tuple[list[str], int]], log_paths: list, timeout: float) -> None:
    """Runs `(command, device count)` pairs at once; fails with the log of one that failed."""
    with _started(commands, log_paths) as processes:
        _wait_all(processes, log_paths, timeout)


def _cli(config_path: str, workdir, cache_dir, *distributed: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxcomp.main",
        f"--config={config_path}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={cache_dir}",
        *distributed,
    ]


def _two_process_commands(config_path: str, workdir, cache_dir) -> list[tuple[list[str], int]]:
    coordinator = f"--coordinator_address=localhost:{_free_port()}"
    return [
        (
            _cli(
                config_path,
                workdir,
                cache_dir,
                "--distributed",
                coordinator,
                "--num_processes=2",
                f"--process_id={index}",
            ),
            2,
        )
        for index in range(2)
    ]


def _train_rows(workdir) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if "total" in row}


def _copy_step(source_workdir, step: int, target_workdir) -> None:
    shutil.copytree(
        source_workdir / "checkpoints" / str(step), target_workdir / "checkpoints" / str(step)
    )


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir):
    """Workdirs of the 1-process run, the 2-process run resumed from it, and its step 1."""
    directory = tmp_path_factory.mktemp("distributed")
    config_path = _config_file(directory, tiny_data_dir)
    cache_dir = directory / "xla_cache"
    one, two, start = directory / "one", directory / "two", directory / "start"
    _run([(_cli(config_path, one, cache_dir), 4)], [directory / "one.log"], timeout=600)
    _copy_step(one, RESUME_STEP, two)
    _copy_step(one, RESUME_STEP, start)
    logs = [directory / f"two_{index}.log" for index in range(2)]
    _run(_two_process_commands(config_path, two, cache_dir), logs, timeout=600)
    assert f"Resuming from the checkpoint of step {RESUME_STEP}" in logs[0].read_text()
    return {"one": one, "two": two, "start": start, "config": config_path}


def _restored_state(config_path: str, workdir, step: int | None = None):
    """What a single-process run of the config restores from `workdir` (default: the latest)."""
    config = load_config_file(config_path)
    experiment = training.build_experiment(config)
    abstract = jax.eval_shape(
        functools.partial(
            training.create_train_state, experiment.model, experiment.optimizer, SIZE
        ),
        jax.random.key(0),
    )
    replicated = NamedSharding(experiment.mesh, PartitionSpec())
    template = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), abstract
    )
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        step = manager.latest_step() if step is None else step
        return jax.device_get(training.restore_checkpoint(manager, step, template))


def test_two_processes_train_like_one_and_resume_across_topologies(runs):
    # The same global batches: the 2-process losses are the 1-process ones.
    single, double = _train_rows(runs["one"]), _train_rows(runs["two"])
    assert sorted(single) == list(range(1, STEPS + 1))
    assert sorted(double) == list(range(RESUME_STEP + 1, STEPS + 1))
    for step in double:
        np.testing.assert_allclose(double[step]["total"], single[step]["total"], rtol=1e-4)
    # The first resumed step starts from the same restored parameters.
    step = RESUME_STEP + 1
    np.testing.assert_allclose(double[step]["grad_norm"], single[step]["grad_norm"], rtol=1e-4)
    for name in ("one", "two"):
        assert json.loads((runs[name] / "eval.json").read_text())["step"] == STEPS

    # This 1-device process restores the 4-device and the 2-process checkpoints alike.
    one, two = (_restored_state(runs["config"], runs[name], step) for name in ("one", "two"))
    # That step's BatchNorm statistics are over the global batch in both runs, not per process.
    np.testing.assert_allclose(_flat(two.batch_stats), _flat(one.batch_stats), rtol=1e-4, atol=1e-6)
    final_one, final_two, initial = (
        _restored_state(runs["config"], runs[name]) for name in ("one", "two", "start")
    )
    assert int(final_one.step) == int(final_two.step) == STEPS
    for name in ("params", "batch_stats"):
        one, two = _flat(getattr(final_one, name)), _flat(getattr(final_two, name))
        difference, moved = np.abs(two - one), np.abs(one - _flat(getattr(initial, name)))
        print(
            f"{name} after step {STEPS}: max |two - one| {difference.max():.2e}, "
            f"mean {difference.mean():.2e}; mean |one - start| {moved.mean():.2e}"
        )
        # Noise-signed Adam steps (and the statistics downstream of them) stay small.
        assert difference.mean() < 0.01 * moved.mean(), name
    beyond = np.abs(_flat(final_two.params) - _flat(final_one.params)) > (
        1e-6 + 1e-4 * np.abs(_flat(final_one.params))
    )
    print(f"params beyond float tolerance: {beyond.mean():.2%}")
    assert beyond.mean() < 0.01


def test_init_from_restores_a_checkpoint_of_another_topology(runs):
    config = load_config_file(runs["config"])
    expected = training.build_experiment(config).variables
    for name in ("one", "two"):
        variables = training.restore_variables(str(runs[name]), expected)
        resumed = _restored_state(runs["config"], runs[name])
        for key in ("params", "batch_stats"):
            leaves = zip(
                jax.tree.leaves(variables[key]), jax.tree.leaves(getattr(resumed, key)), strict=True
            )
            for got, want in leaves:
                np.testing.assert_array_equal(np.asarray(got), want)


def _logged_steps(workdir) -> int:
    """Train rows in metrics.jsonl so far; a line being written is not counted."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line.endswith("}") and '"total"' in line)


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path, tiny_data_dir):
    """One preempted host: both processes save one checkpoint together and exit 0.

    Both processes wait after logging step 2 (`tests/pausing_cli.py`) while process 1
    receives SIGTERM, so the signal lands at a known step however fast the machine.
    """
    steps, pause_at = 40, 2
    config_path = _config_file(
        tmp_path, tiny_data_dir, **{"train.steps": steps, "train.checkpoint_every": steps}
    )
    workdir, cache_dir = tmp_path / "run", tmp_path / "xla_cache"
    resume_file = tmp_path / "resume"
    pausing = [
        ([sys.executable, os.path.join(REPO, "tests", "pausing_cli.py"), *command[3:]], devices)
        for command, devices in _two_process_commands(config_path, workdir, cache_dir)
    ]
    logs = [tmp_path / f"process_{index}.log" for index in range(2)]
    pause = {"JAXCOMP_TEST_PAUSE_AT": str(pause_at), "JAXCOMP_TEST_RESUME": str(resume_file)}
    with _started(pausing, logs, pause) as processes:
        while _logged_steps(workdir) < pause_at:
            assert all(p.poll() is None for p in processes), logs[1].read_text()[-3000:]
            time.sleep(0.1)
        processes[1].send_signal(signal.SIGTERM)
        resume_file.touch()
        # A process left alone in a collective would hang: the timeout catches that.
        _wait_all(processes, logs, timeout=1800)
    saved = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert len(saved) == 1 and pause_at < saved[0] < steps, saved
    for log in logs:
        assert f"saved step {saved[0]} " in log.read_text(), log.read_text()[-3000:]
    assert not (workdir / "eval.json").exists()

    logs = [tmp_path / f"resumed_{index}.log" for index in range(2)]
    _run(_two_process_commands(config_path, workdir, cache_dir), logs, timeout=1800)
    assert f"Resuming from the checkpoint of step {saved[0]}" in logs[0].read_text()
    assert json.loads((workdir / "eval.json").read_text())["step"] == steps

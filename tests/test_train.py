"""The real train step, checkpoint resume, sharding and the CLI, on the tiny model and dataset."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxcomp import training
from jaxcomp.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_batches(experiment, count):
    dataset = training.experiment_train_dataset(experiment)
    return [dataset[step] for step in range(count)]


def test_train_step_learns_and_compiles_once(tiny_config):
    tiny_config.optim.learning_rate = 1e-2
    experiment = training.build_experiment(tiny_config)
    state = experiment.init_state(seed=0)
    batch = training.global_batch(
        _first_batches(experiment, 1)[0], experiment.mesh, training.TRAIN_FIELDS
    )
    initial_params = jax.device_get(state.params)
    losses = []
    for _ in range(4):  # the same batch: the loss must go down
        state, metrics = experiment.train_step_at(0)(state, batch)
        losses.append(float(metrics["total"]))
    assert experiment.jitted_train_step(0)._cache_size() == 1, "the train step re-compiled"
    assert int(state.step) == 4
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), initial_params, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(changed))


PEAK, WARMUP, TOTAL, WEIGHT_DECAY = 0.1, 4, 12, 0.5


def _expected_learning_rate(step: int) -> float:
    """Linear warmup from 0 to PEAK, then a half cosine down to 1% of PEAK at TOTAL."""
    if step <= WARMUP:
        return PEAK * step / WARMUP
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    end = 0.01 * PEAK
    return end + (PEAK - end) * (1 + math.cos(math.pi * progress)) / 2


def test_optimizer_learning_rate_schedule_and_weight_decayed_leaves():
    optim = default_config().optim
    optim.update(learning_rate=PEAK, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY)
    optimizer = training.make_optimizer(optim, total_steps=TOTAL)
    names = [
        "backbone/block_1/depthwise/kernel",
        "backbone/block_1/expand/bn/bias",
        "backbone/block_1/expand/bn/scale",
        "backbone/block_1/expand/conv/kernel",
        "heatmap/out/bias",
        "heatmap/out/kernel",
    ]
    kernels = [name for name in names if name.endswith("kernel")]
    params = {name: np.ones(3, np.float32) for name in names}
    state = optimizer.init(params)
    zeros = jax.tree.map(np.zeros_like, params)
    # With zero gradients Adam's step is 0, so AdamW's update is -lr(step) * decay * param:
    # 0 on the leaves without weight decay, and the learning rate read off the others.
    learning_rates = []
    for step in range(TOTAL + 1):
        updates, state = optimizer.update(zeros, state, params)
        moved = [name for name in names if float(updates[name][0]) != 0.0]
        assert moved == (kernels if step else []), step
        learning_rates.append(-float(updates["heatmap/out/kernel"][0]) / WEIGHT_DECAY)
    # Mid-warmup, warmup end (the peak), mid-cosine, and the end (1% of the peak).
    for step in (WARMUP // 2, WARMUP, (WARMUP + TOTAL) // 2, TOTAL):
        assert learning_rates[step] == pytest.approx(_expected_learning_rate(step), rel=1e-5)


def test_resume_after_interruption_equals_uninterrupted_run(tiny_config, tmp_path):
    full = training.train_and_evaluate(tiny_config, str(tmp_path / "full"))
    assert not full["preempted"] and full["step"] == 6
    assert full["images_per_second"] > 0 and full["first_step_seconds"] > 0
    stopped = training.train_and_evaluate(tiny_config, str(tmp_path / "resumed"), stop_at=3)
    assert stopped["preempted"] and stopped["step"] == 3
    resumed = training.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert resumed["step"] == 6

    experiment = training.build_experiment(tiny_config)
    template = experiment.init_state(seed=1)

    def final_state(workdir):
        manager = training.checkpoint_manager(str(workdir), tiny_config.train)
        assert manager.latest_step() == 6
        return jax.device_get(training.restore_latest(manager, template))

    for expected, actual in zip(
        jax.tree.leaves(final_state(tmp_path / "full")),
        jax.tree.leaves(final_state(tmp_path / "resumed")),
        strict=True,
    ):
        np.testing.assert_array_equal(actual, expected)
    assert resumed["metrics"] == full["metrics"]
    lines = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [line["step"] for line in lines if "total" in line] == [2, 4, 6]
    # What evaluation returned is what eval.json holds (the AP values themselves are
    # checked on hand-made detections in tests/test_evaluation.py).
    eval_json = json.load(open(tmp_path / "full" / "eval.json"))
    np.testing.assert_equal(eval_json, {"step": 6, **full["metrics"]})


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoint(tiny_config, tmp_path):
    tiny_config.optim.learning_rate = 1e30
    tiny_config.optim.grad_clip_norm = 1e30
    tiny_config.train.steps = 8
    with pytest.raises(training.NonFiniteLossError, match=r"at step \d+.*last good checkpoint"):
        training.train_and_evaluate(tiny_config, str(tmp_path))
    manager = training.checkpoint_manager(str(tmp_path), tiny_config.train)
    for step in manager.all_steps():
        experiment = training.build_experiment(tiny_config)
        template = experiment.init_state(seed=0)
        restored = training.restore_checkpoint(manager, step, template)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored.params))


_SHARDED_SCRIPT = """
import sys, json, numpy as np, jax
from jaxcomp import training
from jaxcomp.config import default_config
config = default_config()
config.update_from_flattened_dict(json.loads(sys.argv[1]))
experiment = training.build_experiment(config)
state = experiment.init_state(seed=0)
from jaxcomp.data import pipeline
ds = pipeline.train_dataset(experiment.builder.as_data_source("train"), image_size=64,
    global_batch_size=config.train.batch_size, max_objects=config.data.max_objects,
    num_classes=pipeline.num_classes(experiment.builder), seed=config.seed)
losses, grad_norms = [], []
for step in range(3):
    state, metrics = experiment.train_step_at(0)(
        state, training.global_batch(ds[step], experiment.mesh, training.TRAIN_FIELDS))
    losses.append(float(metrics["total"]))
    grad_norms.append(float(metrics["grad_norm"]))
    if step == 0:
        stats = [np.asarray(x) for x in jax.tree.leaves(state.batch_stats)]
np.savez(sys.argv[2], losses=np.array(losses), grad_norms=np.array(grad_norms),
         devices=jax.device_count(), **{str(i): x for i, x in enumerate(stats)})
"""


def _flat_config(config):
    return {
        "data.name": config.data.name,
        "data.data_dir": config.data.data_dir,
        "data.image_size": 64,
        "data.max_objects": config.data.max_objects,
        "data.num_workers": 0,
        "model.name": config.model.name,
        "train.steps": 6,
        "train.batch_size": 4,
        "optim.warmup_steps": 2,
        "eval.batch_size": 16,
    }


def _run_script(config, out, devices):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }
    subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, json.dumps(_flat_config(config)), str(out)],
        check=True,
        env=env,
        cwd=REPO,
    )
    return np.load(out)


def test_four_devices_match_one_device(tiny_config, tmp_path):
    one = _run_script(tiny_config, tmp_path / "one.npz", 1)
    four = _run_script(tiny_config, tmp_path / "four.npz", 4)
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-4)
    # Adam divides by sqrt(v), so the ~1e-7 differences of the cross-device sum grow into
    # ~1e-4 after two updates on weights whose gradients are tiny: later steps get 1e-3.
    np.testing.assert_allclose(four["grad_norms"][:2], one["grad_norms"][:2], rtol=1e-4)
    np.testing.assert_allclose(four["grad_norms"][2:], one["grad_norms"][2:], rtol=1e-3)
    # After one step the running variances equal the single-device ones only if the
    # batch statistics are computed over the global batch, not per device. (Later
    # steps drift by float noise that Adam's normalisation amplifies.)
    stats = [key for key in one.files if key.isdigit()]
    assert stats
    for key in stats:
        np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-6)


def test_cli_sigterm_saves_and_exits_cleanly_then_resumes(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    overrides = [f"--config.{key}={value}" for key, value in _flat_config(tiny_config).items()]
    overrides = [o for o in overrides if not o.startswith("--config.train.steps")]
    command = [
        sys.executable,
        "-m",
        "jaxcomp.main",
        "--config=configs/student.py",
        f"--workdir={workdir}",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}",
        *overrides,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    log = tmp_path / "run.log"
    with open(log, "w") as output:  # a pipe could fill and block the run
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True
        )
    metrics_file = workdir / "metrics.jsonl"
    # A generous bound for a busy machine: a run that has logged nothing by then is hung.
    deadline = time.monotonic() + 600
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        if process.poll() is not None:
            pytest.fail(f"the run ended before logging two steps:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no two steps logged in 600 s, the run looks hung:\n{log.read_text()}")
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=600)  # a generous bound: no exit by then is a hang
    output = log.read_text()
    assert process.returncode == 0, output
    assert "Run the same command again to resume" in output
    manager = training.checkpoint_manager(str(workdir), tiny_config.train)
    saved = manager.latest_step()
    assert saved is not None and saved >= 2
    # The same command picks up from the saved step.
    finish = subprocess.run(
        [*command[:5], f"--config.train.steps={saved + 2}", *command[6:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert json.loads(finish.stdout.strip().splitlines()[-1])["step"] == saved + 2


# ~35 s; the same train loop as the embedded-data tests, through the VOC builder.
@pytest.mark.slow
def test_voc_config_trains_on_mock_voc(tmp_path):
    """configs/voc.py end to end on tfds.testing.mock_data (random VOC-shaped examples)."""
    import tensorflow_datasets as tfds

    from jaxcomp.config import load_config_file

    config = load_config_file(os.path.join(REPO, "configs/voc.py:student"))
    config.model.name = "centernet_tiny"
    config.data.update(image_size=64, max_objects=8, num_workers=0)
    config.train.update(steps=2, batch_size=4, checkpoint_every=2, eval_every=0)
    config.optim.warmup_steps = 1
    config.eval.batch_size = 4
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        result = training.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 2 and not result["preempted"]
    assert np.isfinite(result["train"]["total"])
    # mock_data draws unordered boxes and mismatched label lists: sanitized and counted.
    assert result["train"]["num_bad_boxes"] > 0
    assert set(result["metrics"]) >= {"AP", "AP50"}


def test_first_ctrl_c_requests_a_stop_and_second_interrupts():
    # Python's own handlers, as in a fresh `python -m jaxcomp.main` started from a
    # terminal: a test run launched in the background inherits SIGINT ignored, and then
    # the second Ctrl-C would be ignored too. The worker's are put back afterwards.
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    inherited = {sig: signal.signal(sig, handler) for sig, handler in defaults.items()}
    try:
        with training.StopRequest() as stop:
            assert not stop.is_set()
            signal.raise_signal(signal.SIGINT)
            assert stop.is_set()
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        for sig, handler in defaults.items():
            assert signal.getsignal(sig) is handler
    finally:
        for sig, handler in inherited.items():
            if handler is not None:
                signal.signal(sig, handler)

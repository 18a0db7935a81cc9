"""The training loop: `train_and_evaluate(config, workdir)` is the whole job.

It reads top to bottom: check the workdir, build the experiment, restore or create
the state, run the compiled steps (logging, checkpointing, stopping on request),
evaluate, and measure what the trained model and its exported forms cost.
"""

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from jaxcomp.data import pipeline
from jaxcomp.training.checkpoints import (
    _WORKDIR_FIX,
    check_workdir,
    checkpoint_manager,
    restore_latest,
    restore_variables,
    save_checkpoint,
)
from jaxcomp.training.experiment import (
    Experiment,
    build_experiment,
    evaluate_experiment,
    experiment_train_dataset,
)
from jaxcomp.training.export import compression_summary
from jaxcomp.training.metrics import MetricsWriter, StopRequest, summarize_metrics
from jaxcomp.training.state import TrainState, global_batch
from jaxcomp.training.steps import TRAIN_FIELDS


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

    Args:
      config: the experiment config (see `jaxcomp.config.default_config`).
      workdir: checkpoints, `metrics.jsonl`, TensorBoard logs and `eval.json` go here.
      stop_at: stop after this step with a checkpoint, exactly as a SIGTERM would
        (for time-boxed jobs); the same call without it later resumes and finishes.

    Returns:
      {'step': last step, 'preempted': bool, 'metrics': COCO metrics or None if preempted,
       'train': last averaged train scalars, 'images_per_second': mean training throughput
       after the first step, 'first_step_seconds': the first step's time (mostly its
       compile), 'params': number of parameters}.
    """
    check_workdir(workdir)
    experiment = build_experiment(config)
    try:
        os.makedirs(workdir, exist_ok=True)
        # Hosts share the workdir: one writer, as for every file but orbax's.
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    except OSError as error:
        raise OSError(
            error.errno, f"cannot write to workdir {workdir!r} ({error}); {_WORKDIR_FIX}"
        ) from error

    manager = checkpoint_manager(workdir, config.train)
    end_step = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    # Started before the state is built so that the data workers start up meanwhile; a
    # resume that falls back to an older checkpoint starts them again at its step.
    expected_start = manager.latest_step() or 0
    batches = _train_batches(experiment, expected_start, end_step)
    try:
        state = _initial_state(experiment, manager)
        start_step = int(state.step)
        num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        if start_step >= end_step < config.train.steps:
            manager.close()
            return {
                "step": start_step,
                "preempted": True,
                "metrics": None,
                "train": {},
                "images_per_second": float("nan"),
                "first_step_seconds": float("nan"),
                "params": num_params,
            }
        if start_step != expected_start:
            batches.close()
            batches = _train_batches(experiment, start_step, end_step)
        writer = MetricsWriter(workdir)
        result = _train_loop(
            experiment, state, batches, start_step, manager, writer, workdir, end_step
        )
    finally:
        batches.close()
    writer.close()
    manager.wait_until_finished()
    manager.close()
    state = result.pop("state")
    if result["metrics"] is not None:
        result["compression"] = compression_summary(experiment, state, workdir, result["metrics"])
    return {**result, "params": num_params}


def _initial_state(experiment: Experiment, manager: ocp.CheckpointManager) -> TrainState:
    """The state to train from: the newest checkpoint, else a fresh (or `init_from`) state."""
    config = experiment.config
    start_variables = None
    if config.init_from and manager.latest_step() is None:
        start_variables = restore_variables(config.init_from, experiment.variables)
    return restore_latest(manager, experiment.init_state(start_variables))


def _train_batches(experiment: Experiment, start_step: int, end_step: int) -> Iterator[dict]:
    return pipeline.iterate_batches(
        experiment_train_dataset(experiment),
        start_step,
        max(end_step - start_step, 0),
        experiment.config.data.num_workers,
    )


def _train_loop(
    experiment, state, batches: Iterator[dict], start_step, manager, writer, workdir, end_step
) -> dict:
    config = experiment.config
    pending: list[tuple[int, dict]] = []
    bad_examples = {"num_bad_boxes": 0, "num_truncated": 0}
    last_scalars: dict[str, float] = {}
    progress = tqdm.tqdm(
        total=config.train.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    timer_step, timer_start = start_step, time.perf_counter()
    train_seconds = 0.0  # excludes evaluation and the first (compiling) step
    first_step_seconds = float("nan")
    step = start_step
    stopping = False
    # Several processes stop together at the step JAX's preemption service agrees on.
    with StopRequest(install=jax.process_count() == 1) as stop:
        for local_batch in batches:
            for name in bad_examples:
                bad_examples[name] += int(local_batch[name].sum())
            state, metrics = experiment.train_step_at(step)(
                state,
                global_batch(local_batch, experiment.mesh, TRAIN_FIELDS, experiment.batch_axes),
            )
            step += 1
            pending.append((step, metrics))
            progress.update(1)
            if step == start_step + 1:
                # Time the compile on its own so that images/s measures training only.
                jax.block_until_ready(metrics)
                first_step_seconds = time.perf_counter() - timer_start
                timer_step, timer_start = step, time.perf_counter()
            last_step = step == config.train.steps
            stopping = (
                stop.is_set()
                or manager.reached_preemption(step)
                or step == end_step < config.train.steps
            )
            saving = step % config.train.checkpoint_every == 0 or last_step or stopping
            if step % config.train.log_every == 0 or saving:
                last_scalars = summarize_metrics(pending)
                pending.clear()
                elapsed = time.perf_counter() - timer_start
                train_seconds += elapsed
                images_per_second = (step - timer_step) * config.train.batch_size / elapsed
                timer_step, timer_start = step, time.perf_counter()
                last_scalars.update(
                    images_per_second=images_per_second, **_all_processes_sum(bad_examples)
                )
                writer.write(step, last_scalars)
                progress.set_postfix(
                    loss=f"{last_scalars['total']:.3f}", img_s=f"{images_per_second:.1f}"
                )
            if saving:
                save_checkpoint(manager, state)
            if stopping:
                logging.warning("Stop requested: saved step %d to %s", step, manager.directory)
                break
            if config.train.eval_every and step % config.train.eval_every == 0 and not last_step:
                writer.write(
                    step,
                    {f"eval/{k}": v for k, v in evaluate_experiment(experiment, state).items()},
                )
                timer_start = time.perf_counter()  # images/s counts training only
    progress.close()
    metrics = None
    if not stopping:
        metrics = evaluate_experiment(experiment, state)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump({"step": step, **metrics}, f, indent=2)
    return {
        "state": state,
        "step": step,
        "preempted": stopping,
        "metrics": metrics,
        "train": last_scalars,
        "images_per_second": _mean_rate(step - start_step - 1, config, train_seconds),
        "first_step_seconds": first_step_seconds,
    }


def _all_processes_sum(counts: dict[str, int]) -> dict[str, int]:
    """Sums per-process counters over all processes (every process logs at the same steps)."""
    if jax.process_count() == 1:
        return dict(counts)
    totals = multihost_utils.process_allgather(np.array(list(counts.values()))).sum(axis=0)
    return {name: int(total) for name, total in zip(counts, totals, strict=True)}


def _mean_rate(steps: int, config: ml_collections.ConfigDict, seconds: float) -> float:
    return steps * config.train.batch_size / seconds if steps > 0 and seconds else float("nan")

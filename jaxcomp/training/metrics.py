"""Metrics to disk and TensorBoard, non-finite losses, and stop requests (SIGTERM, Ctrl-C)."""

import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


class MetricsWriter:
    """Scalars to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            # COCO reports nan for size ranges without objects; TensorBoard would warn on each.
            if np.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


class StopRequest:
    """Set by SIGTERM (what preemptible VMs send) or a first Ctrl-C: the loop saves and exits.

    A second Ctrl-C interrupts at once, as usual. With `install=False` (a run of
    several processes) no handler is installed: a signal that stopped only the process
    that received it would leave the others waiting in a collective. There JAX's
    preemption service keeps its own SIGTERM handler and agrees on the step at which
    every process stops (`CheckpointManager.reached_preemption`).
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, install: bool = True):
        self._install = install
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self._event.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            print(
                "\nStopping after this step with a checkpoint (Ctrl-C again to abort).", flush=True
            )

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if self._install and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def is_set(self) -> bool:
        return self._event.is_set()


def summarize_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Fetches buffered step metrics, checks they are finite and averages them.

    Buffering lets steps dispatch asynchronously; the check runs before every
    log and checkpoint, so a non-finite state is never saved.
    """
    fetched = jax.device_get([metrics for _, metrics in pending])
    for (step, _), metrics in zip(pending, fetched, strict=True):
        if not np.isfinite(metrics["total"]):
            raise NonFiniteLossError(
                f"loss became {metrics['total']} at step {step} "
                f"(terms: { {k: float(v) for k, v in metrics.items()} }); the last good "
                "checkpoint is kept. Lower config.optim.learning_rate or "
                "config.optim.grad_clip_norm and resume."
            )
    return {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}

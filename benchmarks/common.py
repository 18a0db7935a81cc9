"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so importable)."""

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

NUM_CLASSES = 14


def synthetic_batch(batch_size: int, image_size: int, max_objects: int = 16) -> dict:
    """A batch with the shapes and dtypes of the real pipeline's, every box row valid."""
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, image_size, (batch_size, max_objects, 2, 2)).astype(np.float32)
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        "boxes": np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1),
        "labels": rng.integers(0, NUM_CLASSES, (batch_size, max_objects), dtype=np.int32),
        "box_mask": np.ones((batch_size, max_objects), bool),
    }


def seconds(fn: Callable, *args) -> float:
    """Wall time of one call of `fn(*args)`, waiting for its results."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def alternate(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Times each runner once per round, round after round, after one untimed call each.

    Alternating makes machine noise (these machines are shared) hit every side alike,
    so the median of paired ratios is steadier than a ratio of separate medians.
    """
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return times


def median_ms(values: list[float]) -> float:
    return 1000 * float(np.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator."""
    return float(np.median(np.array(numerator) / np.array(denominator)))


def run_json_child(script: str, flag: str, environ: Mapping[str, str] | None = None) -> dict:
    """Runs `script` in a fresh Python process with `flag` and this process's flags, and
    returns the JSON object its last line of output holds.

    Args:
      script: the benchmark script's path (its `__file__`).
      flag: the flag that makes it measure in that process, e.g. '--child'.
      environ: the child's environment; None inherits this one's.
    """
    command = [sys.executable, script, flag, *sys.argv[1:]]
    result = subprocess.run(command, env=environ, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])

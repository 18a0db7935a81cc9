"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so importable)."""

import json
import subprocess
import sys
from collections.abc import Mapping

import numpy as np

from jaxcomp.latency import alternate as alternate
from jaxcomp.latency import median_ms as median_ms
from jaxcomp.latency import paired_ratio as paired_ratio
from jaxcomp.latency import seconds as seconds

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

"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so importable)."""

import numpy as np

from jaxcomp.models import OUTPUT_STRIDE

NUM_CLASSES = 14


def synthetic_batch(batch_size: int, image_size: int, max_objects: int = 16) -> dict:
    """A batch with the shapes and dtypes of the real pipeline's (contents do not matter here)."""
    rng = np.random.default_rng(0)
    cells = image_size // OUTPUT_STRIDE
    return {
        "image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        "heatmap": rng.random((batch_size, cells, cells, NUM_CLASSES), dtype=np.float32) ** 8,
        "center_index": rng.integers(0, cells * cells, (batch_size, max_objects), dtype=np.int32),
        "size": rng.random((batch_size, max_objects, 2), dtype=np.float32) * 8,
        "offset": rng.random((batch_size, max_objects, 2), dtype=np.float32),
        "target_mask": np.ones((batch_size, max_objects), np.float32),
    }

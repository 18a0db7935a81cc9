"""Inference latency of models side by side in one process: alternated rounds, medians.

Timing one model after another lets the load of a shared machine drift between
them; timing each once per round, round after round, makes noise hit all of them
alike, and the median over rounds of each one's time over a reference's is
steadier than a ratio of separate medians. `benchmarks/` time their variants with
the same helpers.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxcomp import quant
from jaxcomp.export.run import FinishedRun

# A forward pass: (weights, uint8 images [batch, side, side, 3]) -> outputs.
Forward = Callable[[Any, np.ndarray], Any]


def seconds(fn: Callable, *args) -> float:
    """Wall time of one call of `fn(*args)`, waiting for its results."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def alternate(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Times each runner once per round, round after round, after one untimed call each."""
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


def serving_forward(run: FinishedRun) -> tuple[Forward, Any]:
    """The jitted inference forward of a finished run's exported model, and its weights.

    A quantized run runs its int8 serving path (`quant.int8_apply`), a channel-pruned
    one its shrunk model (`load_run` shrinks it), any other its float model, zeros kept.
    """
    model = run.model
    if run.quant_config is not None:
        config = run.quant_config
        return jax.jit(
            lambda tree, images: quant.int8_apply(model, tree, images, config=config, train=False)
        ), run.int8_tree()
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False)), (
        run.variables
    )


def compare_latency(
    forwards: dict[str, tuple[Forward, Any]],
    reference: str,
    image_size: int,
    batch_sizes: tuple[int, ...] = (1, 16),
    repeats: int = 9,
) -> dict[str, dict[str, float]]:
    """Each forward's median time per batch size, and its ratio to `reference`'s.

    Args:
      forwards: name -> (forward, weights), e.g. from `serving_forward`.
      reference: the name the ratios divide by.
      image_size: the side of the (random uint8) input images.
      batch_sizes: the batch sizes to time, each with all forwards alternated.
      repeats: timed rounds per batch size.

    Returns:
      name -> {'ms_batch<b>': median milliseconds, 'ratio_batch<b>': median over rounds
      of its time over the reference's}, for each batch size b.

    Example:
      >>> double = jax.jit(lambda w, x: x * w)
      >>> table = compare_latency({"a": (double, 2), "b": (double, 3)}, "a", 32, (1,), 3)
      >>> table["a"]["ratio_batch1"]
      1.0
    """
    if reference not in forwards:
        raise ValueError(f"reference {reference!r} is not one of the timed {sorted(forwards)}")
    table: dict[str, dict[str, float]] = {name: {} for name in forwards}
    for batch_size in batch_sizes:
        rng = np.random.default_rng(batch_size)
        images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
        runners = {
            name: lambda forward=forward, weights=weights, images=images: seconds(
                forward, weights, images
            )
            for name, (forward, weights) in forwards.items()
        }
        times = alternate(runners, repeats)
        for name, values in times.items():
            table[name][f"ms_batch{batch_size}"] = median_ms(values)
            table[name][f"ratio_batch{batch_size}"] = paired_ratio(values, times[reference])
    return table

"""Sparsity schedules: how much to prune at each optimizer step, as pure jittable functions.

A `Schedule` maps a (possibly traced) int step to a float32 sparsity and says
on which steps masks are recomputed. Between update steps the sparsity holds
the value of the last update step, so masks and sparsity always agree.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.prune.masks import validate_sparsity


class Schedule(NamedTuple):
    """A sparsity schedule.

    Attributes:
      sparsity: `step -> float32 scalar`, pure and jittable (step may be traced).
      is_update_step: `step -> bool scalar`: whether masks are recomputed at `step`.
      final_sparsity: the sparsity the schedule reaches and keeps.
    """

    sparsity: Callable[[Any], jax.Array]
    is_update_step: Callable[[Any], jax.Array]
    final_sparsity: float


def _validate_step(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _validate_span(begin_step: Any, end_step: Any) -> tuple[int, int]:
    begin = _validate_step("begin_step", begin_step, 0)
    end = _validate_step("end_step", end_step, 0)
    if end <= begin:
        raise ValueError(
            f"a schedule whose end is before its start: end_step={end} must be greater than "
            f"begin_step={begin}"
        )
    return begin, end


def _as_step(step: Any) -> jax.Array:
    return jnp.asarray(step, jnp.int32)


def one_shot_schedule(sparsity: float, step: int = 0) -> Schedule:
    """Prunes once, at `step`, straight to `sparsity`.

    Args:
      sparsity: the target, in [0, 1).
      step: the optimizer step at which to prune.

    Returns:
      A `Schedule`: sparsity 0 before `step`, `sparsity` from it on.

    Example:
      >>> float(one_shot_schedule(0.5, step=10).sparsity(12))
      0.5
    """
    target = validate_sparsity(sparsity)
    at = _validate_step("step", step, 0)

    def sparsity_fn(t: Any) -> jax.Array:
        return jnp.where(_as_step(t) >= at, jnp.float32(target), jnp.float32(0.0))

    def is_update_step(t: Any) -> jax.Array:
        return _as_step(t) == at

    return Schedule(sparsity_fn, is_update_step, target)


def iterative_schedule(
    final_sparsity: float, begin_step: int, end_step: int, num_prunes: int
) -> Schedule:
    """Prunes `num_prunes` times, each time the same fraction of the remaining weights.

    The prunes happen at equally spaced steps from `begin_step` to `end_step`
    (both included; a single prune happens at `begin_step`). After k of K
    prunes the sparsity is `1 - (1 - final_sparsity) ** (k / K)`, as in the
    iterative pruning of Han et al. (2015).

    Args:
      final_sparsity: the sparsity after the last prune, in [0, 1).
      begin_step: the step of the first prune.
      end_step: the step of the last prune (> begin_step).
      num_prunes: how many prunes (>= 1).

    Returns:
      A `Schedule`.

    Example:
      >>> schedule = iterative_schedule(0.75, begin_step=0, end_step=10, num_prunes=2)
      >>> float(schedule.sparsity(0)), float(schedule.sparsity(10))
      (0.5, 0.75)
    """
    final = validate_sparsity(final_sparsity, "final_sparsity")
    begin, end = _validate_span(begin_step, end_step)
    count = _validate_step("num_prunes", num_prunes, 1)
    if count > 1 and end - begin < count - 1:
        raise ValueError(
            f"num_prunes={count} prunes need at least {count - 1} steps between begin_step="
            f"{begin} and end_step={end}; lower num_prunes or widen the span"
        )
    steps = (
        [begin] if count == 1 else [begin + k * (end - begin) // (count - 1) for k in range(count)]
    )
    prune_steps = jnp.asarray(steps, jnp.int32)

    def sparsity_fn(t: Any) -> jax.Array:
        done = jnp.sum(prune_steps <= _as_step(t))
        remaining = jnp.power(jnp.float32(1.0 - final), done.astype(jnp.float32) / count)
        sparsity = jnp.where(done >= count, jnp.float32(final), 1.0 - remaining)
        return jnp.where(done == 0, jnp.float32(0.0), sparsity).astype(jnp.float32)

    def is_update_step(t: Any) -> jax.Array:
        return jnp.any(prune_steps == _as_step(t))

    return Schedule(sparsity_fn, is_update_step, final)


def polynomial_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
    power: float = 3,
) -> Schedule:
    """The gradual schedule of Zhu & Gupta (2017).

    `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power`, taken at
    the last update step <= t. Masks are recomputed every `frequency` steps in
    [begin_step, end_step] and once more at `end_step`, so the final sparsity is
    reached exactly. The sparsity is 0 before `begin_step` and `final_sparsity`
    after `end_step`.

    Args:
      final_sparsity: s_f, in [0, 1).
      begin_step: t0, the first update step.
      end_step: the step at which s_f is reached (> begin_step).
      frequency: steps between updates (>= 1).
      initial_sparsity: s_i, the sparsity at begin_step (<= final_sparsity).
      power: the exponent (> 0); 3 prunes fast early and slowly late.

    Returns:
      A `Schedule`.

    Example:
      >>> schedule = polynomial_schedule(0.8, begin_step=0, end_step=100, frequency=10)
      >>> float(schedule.sparsity(100))
      0.800000011920929
    """
    final = validate_sparsity(final_sparsity, "final_sparsity")
    initial = validate_sparsity(initial_sparsity, "initial_sparsity")
    if initial > final:
        raise ValueError(
            f"initial_sparsity={initial} must not exceed final_sparsity={final}; "
            "a schedule only prunes more over time"
        )
    begin, end = _validate_span(begin_step, end_step)
    every = _validate_step("frequency", frequency, 1)
    if isinstance(power, bool) or not isinstance(power, numbers.Real) or not power > 0:
        raise ValueError(f"power must be a number > 0, got {power!r}")

    def sparsity_fn(t: Any) -> jax.Array:
        t = _as_step(t)
        last = jnp.minimum(begin + (t - begin) // every * every, end)
        progress = (last - begin).astype(jnp.float32) / (end - begin)
        sparsity = final + (initial - final) * jnp.power(1.0 - progress, jnp.float32(power))
        sparsity = jnp.where(t >= end, jnp.float32(final), sparsity.astype(jnp.float32))
        return jnp.where(t < begin, jnp.float32(0.0), sparsity)

    def is_update_step(t: Any) -> jax.Array:
        t = _as_step(t)
        on_grid = ((t - begin) % every == 0) | (t == end)
        return (t >= begin) & (t <= end) & on_grid

    return Schedule(sparsity_fn, is_update_step, final)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "one_shot": one_shot_schedule,
    "iterative": iterative_schedule,
    "polynomial": polynomial_schedule,
}

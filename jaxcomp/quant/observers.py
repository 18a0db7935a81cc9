"""Activation range observers as explicit, jittable state.

An observer is a `ObserverState(min, max, count)` pytree: `observe` returns a
new state from an old one and a batch, `observer_qparams` turns a state into
quantization parameters. Nothing is hidden in a module or a global, so the
state checkpoints and shards like any other array.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.quant import numerics


class ObserverState(NamedTuple):
    """Running range of a tensor.

    Attributes:
      min: float32 scalar, +inf before the first batch.
      max: float32 scalar, -inf before the first batch.
      count: int32 scalar, number of batches observed.
    """

    min: jax.Array
    max: jax.Array
    count: jax.Array


def init_observer() -> ObserverState:
    """Returns the state of an observer that has seen nothing (min=+inf, max=-inf, count=0)."""
    return ObserverState(jnp.float32(jnp.inf), jnp.float32(-jnp.inf), jnp.int32(0))


def _running_min_max(state: ObserverState, batch_min, batch_max, momentum: float):
    del momentum
    return jnp.minimum(state.min, batch_min), jnp.maximum(state.max, batch_max)


def _moving_average(state: ObserverState, batch_min, batch_max, momentum: float):
    first = state.count == 0
    new_min = jnp.where(first, batch_min, momentum * state.min + (1 - momentum) * batch_min)
    new_max = jnp.where(first, batch_max, momentum * state.max + (1 - momentum) * batch_max)
    return new_min, new_max


# Range estimators by name: `(state, batch_min, batch_max, momentum) -> (min, max)`.
OBSERVERS = {"minmax": _running_min_max, "ema": _moving_average}
OBSERVER_METHODS = tuple(OBSERVERS)


def observe(
    state: ObserverState,
    x: jax.Array,
    *,
    method: str = "minmax",
    momentum: float = 0.9,
    step: jax.Array | int | None = None,
    freeze_step: int | None = None,
) -> ObserverState:
    """Updates an observer with one batch `x` (no gradient flows into the state).

    Args:
      state: the current state.
      x: the batch (any shape); its global min and max are observed.
      method: 'minmax' (running min and max) or 'ema' (exponential moving average
        of each batch's min and max, the first batch initialising it).
      momentum: EMA decay, new = momentum * old + (1 - momentum) * batch.
      step: the current train step (may be traced); needed with `freeze_step`.
      freeze_step: once `step >= freeze_step`, the state no longer changes.

    Returns:
      The new state.

    Example:
      >>> state = observe(init_observer(), jnp.array([-1.0, 2.0]))
      >>> float(state.min), float(state.max), int(state.count)
      (-1.0, 2.0, 1)
    """
    if method not in OBSERVERS:
        raise ValueError(f"observer method must be one of {tuple(OBSERVERS)}, got {method!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if freeze_step is not None and step is None:
        raise ValueError(
            f"freeze_step={freeze_step} needs the current step: pass step=<train step>"
        )
    batch_min, batch_max = numerics.min_max(jax.lax.stop_gradient(x).astype(jnp.float32))
    new_min, new_max = OBSERVERS[method](state, batch_min, batch_max, momentum)
    new = ObserverState(new_min, new_max, state.count + 1)
    if freeze_step is None:
        return new
    frozen = jnp.asarray(step) >= freeze_step
    return jax.tree.map(lambda old, updated: jnp.where(frozen, old, updated), state, new)


def check_observed(state: ObserverState, name: str = "this layer") -> None:
    """Raises if the observer saw no batch or a non-finite range (checked when concrete)."""
    count = numerics._concrete(state.count)
    if count is not None and count <= 0:
        raise ValueError(f"observer for {name} was never updated: run calibration first")
    low, high = numerics._concrete(state.min), numerics._concrete(state.max)
    if low is not None and high is not None and not np.all(np.isfinite([low, high])):
        raise ValueError(
            f"observer for {name} holds a non-finite range [{low}, {high}]: its inputs had "
            "NaN or inf values; fix the model or the data, then recalibrate"
        )


def observer_qparams(
    state: ObserverState,
    bits: int = 8,
    symmetric: bool = False,
    *,
    name: str = "this layer",
) -> tuple[jax.Array, jax.Array, int, int]:
    """Scale and zero point for the range an observer saw.

    Asymmetric ranges use the full signed range ([-128, 127] for 8 bits) with a
    zero point; symmetric ones the narrow range ([-127, 127]) with zero point 0,
    as int8 x int8 serving wants.

    Args:
      state: an observer that has seen at least one batch.
      bits: width in [2, 8].
      symmetric: symmetric (zero_point 0) or asymmetric.
      name: the layer, for the error message.

    Returns:
      (scale float32 scalar, zero_point int32 scalar, qmin, qmax).
    """
    check_observed(state, name)
    qmin, qmax = numerics.int_range(bits, signed=True, narrow=symmetric)
    scale, zero_point = numerics.scale_and_zero_point(state.min, state.max, qmin, qmax, symmetric)
    return scale, zero_point, qmin, qmax


def as_observer_state(value) -> ObserverState:
    """Converts a stored `{'min', 'max', 'count'}` dict (or an ObserverState) to ObserverState."""
    if isinstance(value, ObserverState):
        return value
    return ObserverState(value["min"], value["max"], value["count"])

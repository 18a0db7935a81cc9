"""Distillation losses: a student's outputs against a frozen teacher's, scalar out.

Every loss has the same call signature, `loss(student, teacher, *, temperature,
weights)`, so the registry `LOSSES` can hold them and a config can name one; a
loss that has no use for an argument ignores it (documented per loss). Inputs are
arrays of any float dtype, the arithmetic is float32, and nothing here knows
about detection: the caller decides what the arrays are (class logits, a
heatmap, a feature map) and where to weight them. Pass the teacher's arrays
through `jax.lax.stop_gradient`; the losses do it too so a gradient never
reaches the teacher.
"""

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

_EPS = 1e-6


class DistillLoss(Protocol):
    """The signature every registered loss has."""

    def __call__(
        self,
        student: jax.Array,
        teacher: jax.Array,
        *,
        temperature: float,
        weights: jax.Array | None,
    ) -> jax.Array: ...


def check_temperature(temperature: float) -> None:
    """Raises ValueError unless `temperature` is a positive number (arrays are not checked)."""
    if isinstance(temperature, jax.Array):
        return
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(
            f"the distillation temperature must be > 0, got {temperature}; "
            "1.0 leaves the logits unchanged, 2-4 softens them"
        )


def _check_shapes(student: jax.Array, teacher: jax.Array, loss: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes "
            "differ; feature maps of different widths need an adapter "
            "(jaxcomp.distill.apply_adapter)"
        )


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean of `values`, or its `weights`-weighted mean (weights broadcast to `values`)."""
    if weights is None:
        return jnp.mean(values)
    weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), values.shape)
    return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), _EPS)


def soft_target_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    axis: int = -1,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Hinton et al.'s soft-target loss: T^2 KL(softmax(teacher / T) || softmax(student / T)).

    Summed over `axis` and averaged over the batch (axis 0), as
    `torch.nn.functional.kl_div(log_softmax(s / T), softmax(t / T), reduction="batchmean")
    * T**2`. The T^2 factor keeps gradient magnitudes comparable across temperatures.

    Args:
      student_logits: [B, ..., K] logits.
      teacher_logits: logits of the same shape.
      temperature: softens both distributions; > 0.
      axis: the class axis.
      weights: optional per-distribution weights (the logits' shape without `axis`);
        the weighted sum is still divided by the batch size.

    Returns:
      A float32 scalar, 0 when the logits are equal.

    Example:
      >>> float(soft_target_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 2.0))
      0.0
    """
    check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, "soft_target_kl")
    student_log = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis)
    teacher_log = jax.nn.log_softmax(
        jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature, axis
    )
    kl = jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log), axis=axis)
    if weights is not None:
        kl = kl * jnp.broadcast_to(jnp.asarray(weights, jnp.float32), kl.shape)
    return temperature**2 * jnp.sum(kl) / student_logits.shape[0]


def sigmoid_soft_target(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Per-element binary soft targets: T^2 KL(sigmoid(teacher / T) || sigmoid(student / T)).

    The form a per-class heatmap (CenterNet) needs: each element is its own
    Bernoulli distribution. Computed from `log_sigmoid`, finite for any finite logit.

    Args:
      student_logits: logits of any shape, e.g. a [B, h, w, C] heatmap.
      teacher_logits: logits of the same shape.
      temperature: softens both; > 0.
      weights: optional weights broadcastable to the logits (the teacher's confidence,
        a foreground mask); the result is the weighted mean, else the plain mean.

    Returns:
      A float32 scalar, 0 when the logits are equal.

    Example:
      >>> logits = jnp.array([[-3.0, 2.0]])
      >>> float(sigmoid_soft_target(logits, logits, 2.0))
      0.0
    """
    check_temperature(temperature)
    _check_shapes(student_logits, teacher_logits, "sigmoid_soft_target")
    student = jnp.asarray(student_logits, jnp.float32) / temperature
    teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature
    teacher_prob = jax.nn.sigmoid(teacher)
    kl = teacher_prob * (jax.nn.log_sigmoid(teacher) - jax.nn.log_sigmoid(student)) + (
        1.0 - teacher_prob
    ) * (jax.nn.log_sigmoid(-teacher) - jax.nn.log_sigmoid(-student))
    return temperature**2 * _weighted_mean(kl, weights)


def l1_imitation(
    student: jax.Array,
    teacher: jax.Array,
    temperature: float = 1.0,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """L1 distance to the teacher's regression outputs, summed over the last axis.

    Args:
      student: [..., D] predictions (a size or offset map [B, h, w, D]).
      teacher: the teacher's predictions, same shape.
      temperature: unused (regression targets are not distributions).
      weights: optional weights of the positions ([..., 1] or [...]), e.g. 1 at the
        teacher's peaks; the result is the weighted mean over positions.

    Returns:
      A float32 scalar.

    Example:
      >>> float(l1_imitation(jnp.ones((1, 2, 2)), jnp.zeros((1, 2, 2))))
      2.0
    """
    del temperature
    _check_shapes(student, teacher, "l1_imitation")
    error = jnp.abs(
        jnp.asarray(student, jnp.float32) - jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
    )
    per_position = jnp.sum(error, axis=-1)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.ndim == error.ndim:
            weights = weights[..., 0]
    return _weighted_mean(per_position, weights)


def _standardize(features: jax.Array) -> jax.Array:
    """Zero mean, unit variance per channel over the batch and positions (PKD's norm)."""
    axes = tuple(range(features.ndim - 1))
    mean = jnp.mean(features, axis=axes, keepdims=True)
    std = jnp.std(features, axis=axes, keepdims=True)
    return (features - mean) / (std + _EPS)


def pkd(
    student: jax.Array,
    teacher: jax.Array,
    temperature: float = 1.0,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """PKD (Cao et al. 2022): MSE of per-channel standardized features, halved.

    Standardizing (each channel over batch and positions) makes the loss
    indifferent to the scale of either network's activations; it has no
    learnable parameters. Channels-last features, same shape (adapt first).

    Args:
      student: [B, ..., C] features.
      teacher: [B, ..., C] features.
      temperature: unused.
      weights: optional weights of the positions ([B, ..., 1]).

    Returns:
      A float32 scalar; 0 when the features are equal up to a per-channel affine map.

    Example:
      >>> x = jnp.arange(12.0).reshape(1, 2, 2, 3)
      >>> float(pkd(x, 3 * x + 1)) < 1e-6
      True
    """
    del temperature
    _check_shapes(student, teacher, "pkd")
    student = _standardize(jnp.asarray(student, jnp.float32))
    teacher = _standardize(jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32)))
    return 0.5 * _weighted_mean((student - teacher) ** 2, weights)


def cwd(
    student: jax.Array,
    teacher: jax.Array,
    temperature: float = 1.0,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Channel-wise distillation (Shu et al. 2021): each channel as a distribution over positions.

    `T^2 * sum_c KL(softmax_pos(teacher_c / T) || softmax_pos(student_c / T)) / (B * C)`,
    as mmrazor's ChannelWiseDivergence.

    Args:
      student: [B, ..., C] features (or dense predictions such as heatmap logits).
      teacher: the same shape.
      temperature: softens the spatial distributions; > 0.
      weights: not supported (each channel is already a distribution over positions);
        must be None.

    Returns:
      A float32 scalar, 0 when the features are equal.

    Example:
      >>> x = jnp.ones((2, 4, 4, 3))
      >>> float(cwd(x, x))
      0.0
    """
    check_temperature(temperature)
    _check_shapes(student, teacher, "cwd")
    if weights is not None:
        raise ValueError(
            "cwd normalizes each channel over the positions and takes no weights; "
            "use weighting 'none' for a cwd term"
        )
    batch, channels = student.shape[0], student.shape[-1]
    student = jnp.asarray(student, jnp.float32).reshape(batch, -1, channels) / temperature
    teacher = (
        jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32)).reshape(batch, -1, channels)
        / temperature
    )
    teacher_log = jax.nn.log_softmax(teacher, axis=1)
    student_log = jax.nn.log_softmax(student, axis=1)
    kl = jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log))
    return temperature**2 * kl / (batch * channels)


# The registry configs name losses from; a new loss is one function with the
# `DistillLoss` signature and one line here.
LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax_kl": soft_target_kl,
    "sigmoid_kl": sigmoid_soft_target,
    "l1": l1_imitation,
    "pkd": pkd,
    "cwd": cwd,
}


def get_loss(name: str) -> Callable[..., jax.Array]:
    """The registered loss called `name`, or a ValueError listing the registry."""
    if name not in LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]

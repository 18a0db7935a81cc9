"""CenterNet training loss: penalty-reduced focal loss on the heatmap, L1 on size and offset.

Everything reduces to sums over the whole batch divided by the batch's object
count, so the loss is the same whether the batch sits on one device or is
sharded over a ``data`` mesh axis under ``jax.jit`` (XLA inserts the
cross-device sums). Inputs may be bfloat16; the arithmetic is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# CenterNet's (CornerNet's) focal-loss exponents: alpha focuses on hard pixels,
# beta reduces the penalty on negatives close to a centre.
_ALPHA = 2.0
_BETA = 4  # an int: `x ** 4` is two multiplies, a float power an exp and a log per pixel


def focal_loss(
    heatmap_logits: jax.Array, heatmap_target: jax.Array, num_objects: jax.Array | float
) -> jax.Array:
    """Penalty-reduced pixel-wise focal loss of CenterNet (alpha=2, beta=4).

    Computed from ``log_sigmoid`` of the logits rather than from clipped
    probabilities, so it and its gradient stay finite for any finite logit.

    Args:
        heatmap_logits: [B, h, w, C] raw heatmap logits.
        heatmap_target: [B, h, w, C] Gaussian targets; cells equal to 1 are positives.
        num_objects: number of objects in the batch (the sum of ``target_mask``).

    Returns:
        Scalar float32: the summed loss divided by ``max(num_objects, 1)``.

    Example:
        >>> target = jnp.zeros((1, 4, 4, 2)).at[0, 1, 2, 0].set(1.0)
        >>> float(focal_loss(jnp.where(target == 1, 20.0, -20.0), target, 1.0)) < 1e-6
        True
    """
    logits = jnp.asarray(heatmap_logits, jnp.float32)
    target = jnp.asarray(heatmap_target, jnp.float32)
    log_prob = jax.nn.log_sigmoid(logits)
    log_not_prob = jax.nn.log_sigmoid(-logits)
    # (1 - p)^alpha and p^alpha as exponentials of log-probabilities: no 0 * -inf.
    positive_loss = -jnp.exp(_ALPHA * log_not_prob) * log_prob
    negative_loss = -((1.0 - target) ** _BETA) * jnp.exp(_ALPHA * log_prob) * log_not_prob
    loss = jnp.where(target >= 1.0, positive_loss, negative_loss)
    return jnp.sum(loss) / _object_count(num_objects)


def regression_l1(
    pred_map: jax.Array, center_index: jax.Array, target: jax.Array, target_mask: jax.Array
) -> jax.Array:
    """Masked L1 loss of a dense prediction map read at the objects' centre cells.

    Args:
        pred_map: [B, h, w, D] predictions (size or offset head).
        center_index: int [B, K], flat ``y * w + x`` of each object's centre cell.
        target: [B, K, D] regression targets.
        target_mask: [B, K], 1 for real objects and 0 for padding rows.

    Returns:
        Scalar float32: the L1 summed over objects and the D coordinates, divided
        by ``max(number of objects, 1)``.

    Example:
        >>> pred = jnp.ones((1, 2, 2, 2))
        >>> float(regression_l1(pred, jnp.array([[3, 0]]), jnp.zeros((1, 2, 2)),
        ...                     jnp.array([[1.0, 0.0]])))
        2.0
    """
    batch, height, width, depth = pred_map.shape
    flat = jnp.asarray(pred_map, jnp.float32).reshape(batch, height * width, depth)
    pred = jnp.take_along_axis(flat, center_index[..., None].astype(jnp.int32), axis=1)
    mask = jnp.asarray(target_mask, jnp.float32)
    error = jnp.abs(pred - jnp.asarray(target, jnp.float32)) * mask[..., None]
    return jnp.sum(error) / _object_count(jnp.sum(mask))


def detection_loss(
    outputs: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    *,
    heatmap_weight: float = 1.0,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CenterNet loss: weighted sum of heatmap focal loss, size L1 and offset L1.

    Args:
        outputs: model outputs ``heatmap`` [B, h, w, C] logits, ``size`` and
            ``offset`` [B, h, w, 2].
        batch: targets stacked over the batch: ``heatmap`` [B, h, w, C],
            ``center_index`` [B, K], ``size`` and ``offset`` [B, K, 2], ``target_mask`` [B, K].
        heatmap_weight: weight of the focal loss.
        size_weight: weight of the size L1 loss (CenterNet's 0.1).
        offset_weight: weight of the offset L1 loss.

    Returns:
        ``(total, terms)`` where ``terms`` holds the unweighted ``heatmap``,
        ``size`` and ``offset`` losses and the weighted ``total``, all scalars.

    Example:
        >>> total, terms = jax.jit(detection_loss)(outputs, batch)  # doctest: +SKIP
        >>> sorted(terms)  # doctest: +SKIP
        ['heatmap', 'offset', 'size', 'total']
    """
    missing = {"heatmap", "size", "offset"} - set(outputs)
    missing |= {"heatmap", "center_index", "size", "offset", "target_mask"} - set(batch)
    if missing:
        raise KeyError(
            f"detection_loss is missing {sorted(missing)}; outputs need heatmap/size/offset and "
            "batch needs the keys of jaxcomp.detection.targets.encode_targets"
        )
    num_objects = jnp.sum(jnp.asarray(batch["target_mask"], jnp.float32))
    terms = {
        "heatmap": focal_loss(outputs["heatmap"], batch["heatmap"], num_objects),
        "size": regression_l1(
            outputs["size"], batch["center_index"], batch["size"], batch["target_mask"]
        ),
        "offset": regression_l1(
            outputs["offset"], batch["center_index"], batch["offset"], batch["target_mask"]
        ),
    }
    total = (
        heatmap_weight * terms["heatmap"]
        + size_weight * terms["size"]
        + offset_weight * terms["offset"]
    )
    return total, {**terms, "total": total}


def _object_count(num_objects: jax.Array | float) -> jax.Array:
    """The normaliser: the object count, at least 1 so an empty batch gives 0, not nan."""
    return jnp.maximum(jnp.asarray(num_objects, jnp.float32), 1.0)

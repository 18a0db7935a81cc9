"""CenterNet decoding: heatmap peaks -> top-k boxes, with static shapes so it jits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcomp.detection.boxes import clip_boxes


def decode_detections(
    outputs: dict[str, jax.Array], *, k: int = 100, stride: int = 4
) -> dict[str, jax.Array]:
    """Turns CenterNet outputs into the k best boxes per image.

    A cell is a peak if its score equals the max of its 3x3 neighbourhood
    (CenterNet's max-pool replacement for NMS); the k best peaks over all cells
    and classes are kept. Negative predicted sizes (an untrained head) count as
    0 so that boxes are never inverted, and boxes are clipped to the input image.

    Args:
        outputs: ``heatmap`` [B, h, w, C] logits, ``size`` [B, h, w, 2] (height,
            width) and ``offset`` [B, h, w, 2] (dy, dx), both in output-grid units.
        k: detections per image; static, at most ``h * w * C``.
        stride: output stride of the detector; static.

    Returns:
        dict with ``boxes`` f32 [B, k, 4] pixel ``[ymin, xmin, ymax, xmax]`` in the
        ``h * stride x w * stride`` input image, ``scores`` f32 [B, k] in [0, 1]
        (descending) and ``classes`` int32 [B, k].

    Example:
        >>> decode = jax.jit(decode_detections, static_argnames=("k", "stride"))
        >>> outputs = {"heatmap": jnp.zeros((2, 8, 8, 3)), "size": jnp.ones((2, 8, 8, 2)),
        ...            "offset": jnp.zeros((2, 8, 8, 2))}
        >>> decode(outputs, k=5)["boxes"].shape
        (2, 5, 4)
    """
    heatmap = jax.nn.sigmoid(jnp.asarray(outputs["heatmap"], jnp.float32))
    batch, height, width, num_classes = heatmap.shape
    if not 0 < k <= height * width * num_classes:
        raise ValueError(
            f"k must be in [1, h*w*C={height * width * num_classes}], got k={k}; "
            "lower k or decode a larger output map"
        )
    neighbourhood_max = lax.reduce_window(
        heatmap, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"
    )
    peaks = jnp.where(heatmap == neighbourhood_max, heatmap, 0.0)
    scores, flat_index = lax.top_k(peaks.reshape(batch, -1), k)
    # The flat index runs over (y, x, class) in row-major order.
    pixel, classes = jnp.divmod(flat_index, num_classes)
    cell = jnp.stack(jnp.divmod(pixel, width), axis=-1).astype(jnp.float32)
    size = jnp.maximum(_gather_cells(outputs["size"], pixel), 0.0)
    centre = (cell + _gather_cells(outputs["offset"], pixel)) * stride
    half_size = size * (stride / 2)
    boxes = jnp.concatenate([centre - half_size, centre + half_size], axis=-1)
    return {
        "boxes": clip_boxes(boxes, (height * stride, width * stride)),
        "scores": scores,
        "classes": classes.astype(jnp.int32),
    }


def _gather_cells(dense: jax.Array, pixel: jax.Array) -> jax.Array:
    """Reads a [B, h, w, D] map at flat cell indices [B, k], giving [B, k, D] float32."""
    batch, height, width, depth = dense.shape
    flat = jnp.asarray(dense, jnp.float32).reshape(batch, height * width, depth)
    return jnp.take_along_axis(flat, pixel[..., None], axis=1)

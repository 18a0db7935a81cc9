"""Small box utilities shared by target encoding, decoding and evaluation.

Boxes are ``[ymin, xmin, ymax, xmax]`` in pixels throughout jaxcomp (the TFDS
convention, scaled to pixels); COCO wants ``[x, y, width, height]``, hence
:func:`yxyx_to_xywh`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of two sets of boxes.

    Args:
        boxes_a: float array [N, 4], ``[ymin, xmin, ymax, xmax]``.
        boxes_b: float array [M, 4], same layout.

    Returns:
        float64 array [N, M]; 0 where the union is empty (two degenerate boxes).

    Example:
        >>> iou(np.array([[0, 0, 2, 2]]), np.array([[0, 0, 2, 1], [5, 5, 6, 6]]))
        array([[0.5, 0. ]])
    """
    boxes_a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
    boxes_b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=-1)
    union = _area(boxes_a)[:, None] + _area(boxes_b)[None, :] - intersection
    # Two empty boxes have no overlap to speak of: report 0 rather than 0/0 = nan.
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Converts ``[ymin, xmin, ymax, xmax]`` boxes to COCO's ``[x, y, width, height]``.

    Args:
        boxes: array [..., 4].

    Returns:
        array [..., 4] of the same dtype.

    Example:
        >>> yxyx_to_xywh(np.array([1.0, 2.0, 5.0, 10.0]))
        array([2., 1., 8., 4.])
    """
    boxes = np.asarray(boxes)
    ymin, xmin, ymax, xmax = np.moveaxis(boxes, -1, 0)
    return np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=-1)


def clip_boxes(boxes: Any, size: int | tuple[int, int]) -> Any:
    """Clips ``[ymin, xmin, ymax, xmax]`` boxes to an image of the given size.

    Works on numpy arrays and on jax arrays (also under ``jax.jit``).

    Args:
        boxes: array [..., 4] in pixels.
        size: image side ``S`` for a square image, or ``(height, width)``.

    Returns:
        array like ``boxes`` with every coordinate in ``[0, height]`` / ``[0, width]``.

    Example:
        >>> clip_boxes(np.array([-3.0, 5.0, 40.0, 20.0]), 32)
        array([ 0.,  5., 32., 20.])
    """
    height, width = (size, size) if np.ndim(size) == 0 else size
    upper = np.array([height, width, height, width], dtype=np.float32)
    return boxes.clip(0, upper.astype(boxes.dtype))


def _area(boxes: np.ndarray) -> np.ndarray:
    """Area of [N, 4] boxes; negative extents count as empty."""
    extent = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)
    return extent[:, 0] * extent[:, 1]

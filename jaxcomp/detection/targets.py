"""CenterNet training targets ("Objects as Points", Zhou et al. 2019), in NumPy and in JAX.

`encode_targets` runs in data-loader workers, one image at a time, so it is
vectorised over objects and pixels: the only Python-level work is a handful of
array ops per image, whatever the number of objects. `encode_batch_targets`
computes the same fields from a padded batch of boxes in JAX (jit-able,
vmappable), so that a train step can build its targets on the device and the
host sends boxes, labels and a mask instead of dense heatmaps.

Coordinates: boxes come in as pixels ``[ymin, xmin, ymax, xmax]`` of the
``S x S`` input image; every target is in output-grid units (pixels / stride).
An object's centre ``c`` (grid units) lives in cell ``floor(c)``; the offset
target is ``c - floor(c)``, so :func:`jaxcomp.detection.decode.decode_detections`
recovers the centre as ``(cell + offset) * stride`` exactly.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.detection.boxes import clip_boxes

# CenterNet's IoU for the Gaussian radius of every heatmap peak.
_MIN_OVERLAP = 0.7


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's Gaussian radius for a box of the given size (output-grid units).

    CornerNet chooses the radius so that a box whose corners are off by up to
    the radius still overlaps the ground truth by ``min_overlap``, taking the
    smallest over three cases (both corners shifted the same way, shrunk inside,
    grown outside). As in the CenterNet/CornerNet reference implementation, each
    case's radius is ``(b + sqrt(b**2 - 4*a*c)) / 2`` for its quadratic
    ``a*r**2 + b*r + c`` rather than the exact root (which would be several times
    smaller): CenterNet's published hyper-parameters and accuracy were obtained
    with these radii, so we keep them.

    Args:
        height: box height in output-grid units.
        width: box width in output-grid units.
        min_overlap: IoU the radius must preserve, in (0, 1).

    Returns:
        The radius, a non-negative float (callers round it down to whole cells).

    Example:
        >>> round(gaussian_radius(10.0, 10.0), 3)
        2.733
    """
    if not 0.0 < min_overlap < 1.0:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    return float(_gaussian_radii(np.float64(height), np.float64(width), min_overlap))


def encode_targets(
    boxes: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    image_size: int,
    num_classes: int,
    stride: int = 4,
) -> dict[str, np.ndarray]:
    """Encodes one image's boxes as CenterNet heatmap, size and offset targets.

    Boxes are clipped to the image first; a box that is empty after clipping
    (zero height or width) gets no heatmap peak and ``target_mask`` 0, as in
    CenterNet, so augmentation that crops objects away needs no special care.

    Args:
        boxes: float [K, 4], pixel ``[ymin, xmin, ymax, xmax]`` in the S x S input image.
        labels: int [K], class ids in ``[0, num_classes)`` (padding rows may hold anything).
        mask: bool [K], False for padding rows.
        image_size: the input side S; must be a multiple of ``stride``.
        num_classes: number of heatmap channels C.
        stride: output stride of the detector.

    Returns:
        dict with
        ``heatmap`` f32 [S/stride, S/stride, C]: per-class max of Gaussians, 1.0 at centre cells;
        ``center_index`` int32 [K]: flat ``y * (S/stride) + x`` of the centre cell;
        ``size`` f32 [K, 2]: box (height, width) in output-grid units;
        ``offset`` f32 [K, 2]: centre / stride minus its integer cell, in [0, 1);
        ``target_mask`` f32 [K]: 1 for real objects, 0 for padding and empty boxes.
        All per-object entries are 0 on rows whose ``target_mask`` is 0.

    Example:
        >>> t = encode_targets(np.array([[8.0, 8.0, 24.0, 40.0]]), np.array([2]),
        ...                    np.array([True]), image_size=64, num_classes=3)
        >>> t["heatmap"].shape, t["center_index"].tolist(), t["size"].tolist()
        ((16, 16, 3), [70], [[4.0, 8.0]])
    """
    _check_image_size(image_size, stride)
    boxes = np.asarray(boxes, np.float32)
    labels = np.asarray(labels)
    mask = np.asarray(mask, bool)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [K, 4], got {boxes.shape}")
    if labels.shape != boxes.shape[:1] or mask.shape != boxes.shape[:1]:
        raise ValueError(
            f"labels and mask must have shape [K]={boxes.shape[:1]}, "
            f"got labels {labels.shape} and mask {mask.shape}"
        )

    grid = image_size // stride
    grid_boxes = clip_boxes(boxes, image_size) / np.float32(stride)
    size = grid_boxes[:, 2:] - grid_boxes[:, :2]
    valid = mask & (size[:, 0] > 0) & (size[:, 1] > 0)
    bad_labels = labels[valid][(labels[valid] < 0) | (labels[valid] >= num_classes)]
    if bad_labels.size:
        raise ValueError(
            f"labels must be in [0, num_classes={num_classes}), got {bad_labels[0]}; "
            "check num_classes against the dataset's label map"
        )

    centers = (grid_boxes[:, :2] + grid_boxes[:, 2:]) / 2
    # Clipped boxes have centres in [0, grid]; only an empty (dropped) box can sit on
    # the far edge, and it must still index a cell of the map.
    cells = np.clip(np.floor(centers), 0, grid - 1).astype(np.int32)
    offset = centers - cells

    valid_f = valid.astype(np.float32)
    return {
        "heatmap": _draw_heatmap(cells[valid], size[valid], labels[valid], grid, num_classes),
        "center_index": np.where(valid, cells[:, 0] * grid + cells[:, 1], 0).astype(np.int32),
        "size": (size * valid_f[:, None]).astype(np.float32),
        "offset": (offset * valid_f[:, None]).astype(np.float32),
        "target_mask": valid_f,
    }


def _check_image_size(image_size: int, stride: int) -> None:
    if image_size % stride != 0:
        raise ValueError(
            f"image_size must be a multiple of stride={stride}, got image_size={image_size}; "
            f"resize the input to a multiple of {stride}, e.g. {image_size // stride * stride}"
        )


def _gaussian_radii(
    heights: np.ndarray, widths: np.ndarray, min_overlap: float, xp: ModuleType = np
) -> np.ndarray:
    """Vectorised :func:`gaussian_radius` (same formulas) over arrays of box sizes.

    `xp` is `numpy` or `jax.numpy`: the same operations in the same order give the
    same float32 radii in both.
    """
    sum_hw, area = heights + widths, heights * widths
    # Case 1: both corners shifted the same way.
    b1, c1 = sum_hw, area * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + xp.sqrt(b1**2 - 4 * c1)) / 2
    # Case 2: predicted box inside the ground truth.
    b2, c2 = 2 * sum_hw, (1 - min_overlap) * area
    r2 = (b2 + xp.sqrt(b2**2 - 16 * c2)) / 2
    # Case 3: predicted box around the ground truth.
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * sum_hw, (min_overlap - 1) * area
    r3 = (b3 + xp.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return xp.minimum(xp.minimum(r1, r2), r3)


def _draw_heatmap(
    cells: np.ndarray, size: np.ndarray, labels: np.ndarray, grid: int, num_classes: int
) -> np.ndarray:
    """Per-class max of truncated Gaussians centred on ``cells`` ([n, 2] y, x)."""
    heatmap = np.zeros((grid, grid, num_classes), np.float32)
    if len(cells) == 0:
        return heatmap
    # CenterNet rounds box sizes up and the radius down to whole cells.
    radii = np.floor(_gaussian_radii(np.ceil(size[:, 0]), np.ceil(size[:, 1]), _MIN_OVERLAP))
    radii = np.maximum(radii, 0)
    sigma = (2 * radii + 1) / 6
    coords = np.arange(grid, dtype=np.float32)
    # The 2-D Gaussian is separable: exp(-(dy²+dx²)/2σ²) = exp(-dy²/2σ²)·exp(-dx²/2σ²).
    # Both factors are exactly 1 at distance 0, so the peak is exactly 1.0.
    profiles = []
    for axis in (0, 1):
        distance = coords[None, :] - cells[:, axis, None]
        profile = np.exp(-(distance**2) / (2 * sigma[:, None] ** 2)).astype(np.float32)
        profiles.append(np.where(np.abs(distance) <= radii[:, None], profile, 0.0))
    gaussians = profiles[0][:, :, None] * profiles[1][:, None, :]
    # Overlapping objects of one class combine by max (not sum), so every peak stays 1.
    # One max per class present (at most one per object): np.maximum.reduceat and
    # np.maximum.at do the same without a loop but are 15-40x slower here.
    per_class = np.empty((num_classes, grid, grid), np.float32)
    classes = np.unique(labels)
    for label in classes:
        np.max(gaussians[labels == label], axis=0, out=per_class[label])
    heatmap[:, :, classes] = per_class[classes].transpose(1, 2, 0)
    return heatmap


def encode_batch_targets(
    boxes: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    image_size: int,
    num_classes: int,
    stride: int = 4,
) -> dict[str, jax.Array]:
    """Encodes a padded batch of boxes as CenterNet targets in JAX, on the device.

    The fields of :func:`encode_targets`, image by image, stacked over the batch:
    the same clipping, dropped empty boxes, centre cells, offsets, sizes and
    Gaussian radii (bit for bit), and heatmaps equal to float32 rounding (NumPy
    evaluates the Gaussian's exponent in float64). Pure and shape-static, so it
    runs under ``jax.jit`` and ``jax.vmap`` and inside a train step. Labels are
    not checked (that would need the host): a valid row whose label is outside
    ``[0, num_classes)`` draws no heatmap peak, where :func:`encode_targets` raises.

    Per image it holds the ``[K, S/stride, S/stride]`` float32 Gaussians of its
    objects before the per-class max.

    Args:
        boxes: float [B, K, 4], pixel ``[ymin, xmin, ymax, xmax]`` in the S x S images.
        labels: int [B, K], class ids in ``[0, num_classes)`` on rows where ``mask`` is set.
        mask: bool [B, K], False for padding rows.
        image_size: the input side S; must be a multiple of ``stride``.
        num_classes: number of heatmap channels C.
        stride: output stride of the detector.

    Returns:
        dict with ``heatmap`` f32 [B, S/stride, S/stride, C], ``center_index`` int32
        [B, K], ``size`` and ``offset`` f32 [B, K, 2], ``target_mask`` f32 [B, K],
        as :func:`encode_targets` describes them.

    Example:
        >>> t = jax.jit(encode_batch_targets, static_argnames=("image_size", "num_classes"))(
        ...     jnp.array([[[8.0, 8.0, 24.0, 40.0]]]), jnp.array([[2]]), jnp.array([[True]]),
        ...     image_size=64, num_classes=3)
        >>> t["heatmap"].shape, t["center_index"].tolist(), t["size"].tolist()
        ((1, 16, 16, 3), [[70]], [[[4.0, 8.0]]])
    """
    _check_image_size(image_size, stride)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B, K, 4], got {boxes.shape}")
    if labels.shape != boxes.shape[:2] or mask.shape != boxes.shape[:2]:
        raise ValueError(
            f"labels and mask must have shape [B, K]={boxes.shape[:2]}, "
            f"got labels {labels.shape} and mask {mask.shape}"
        )
    encode_image = functools.partial(
        _encode_image, image_size=image_size, num_classes=num_classes, stride=stride
    )
    return jax.vmap(encode_image)(
        jnp.asarray(boxes, jnp.float32), jnp.asarray(labels, jnp.int32), jnp.asarray(mask, bool)
    )


def _encode_image(
    boxes: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    image_size: int,
    num_classes: int,
    stride: int,
) -> dict[str, jax.Array]:
    """One image of :func:`encode_batch_targets`: :func:`encode_targets`' steps in jnp."""
    grid = image_size // stride
    grid_boxes = clip_boxes(boxes, image_size) / np.float32(stride)
    size = grid_boxes[:, 2:] - grid_boxes[:, :2]
    valid = mask & (size[:, 0] > 0) & (size[:, 1] > 0)
    centers = (grid_boxes[:, :2] + grid_boxes[:, 2:]) / 2
    cells = jnp.clip(jnp.floor(centers), 0, grid - 1).astype(jnp.int32)
    # Exact in float32 (NumPy computes it in float64): c - floor(c) needs no rounding.
    offset = centers - cells
    valid_f = valid.astype(jnp.float32)
    return {
        "heatmap": _draw_heatmap_jax(cells, size, labels, valid, grid, num_classes),
        "center_index": jnp.where(valid, cells[:, 0] * grid + cells[:, 1], 0),
        "size": size * valid_f[:, None],
        "offset": offset * valid_f[:, None],
        "target_mask": valid_f,
    }


def _draw_heatmap_jax(
    cells: jax.Array,
    size: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    grid: int,
    num_classes: int,
) -> jax.Array:
    """:func:`_draw_heatmap` over all K rows, the invalid ones drawing nothing."""
    radii = jnp.floor(
        _gaussian_radii(jnp.ceil(size[:, 0]), jnp.ceil(size[:, 1]), _MIN_OVERLAP, xp=jnp)
    )
    radii = jnp.maximum(radii, 0)
    sigma = (2 * radii + 1) / 6
    coords = jnp.arange(grid, dtype=jnp.float32)
    profiles = []
    for axis in (0, 1):
        distance = coords[None, :] - cells[:, axis, None]
        profile = jnp.exp(-(distance**2) / (2 * sigma[:, None] ** 2))
        # `valid` also masks the NaN radii that padding rows' garbage sizes may give.
        inside = (jnp.abs(distance) <= radii[:, None]) & valid[:, None]
        profiles.append(jnp.where(inside, profile, 0.0))
    gaussians = profiles[0][:, :, None] * profiles[1][:, None, :]
    # Overlapping objects of one class combine by max, so every peak stays 1; classes
    # with no object get -inf from segment_max, and labels outside [0, C) are dropped.
    per_class = jax.ops.segment_max(gaussians, labels, num_segments=num_classes)
    return jnp.maximum(per_class, 0.0).transpose(1, 2, 0)

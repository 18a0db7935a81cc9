"""Tests for jaxcomp.detection.targets (NumPy and JAX encoders) and jaxcomp.detection.boxes."""

import functools
import math

import jax
import numpy as np
import pytest

from jaxcomp.detection.boxes import clip_boxes, iou, yxyx_to_xywh
from jaxcomp.detection.targets import encode_batch_targets, encode_targets, gaussian_radius

IMAGE_SIZE, NUM_CLASSES, STRIDE = 64, 3, 4
GRID = IMAGE_SIZE // STRIDE

# Two objects of different classes, one padding row (garbage values on purpose).
BOXES = np.array([[8.0, 10.0, 24.0, 42.0], [36.0, 40.0, 62.0, 58.0], [1.0, 2.0, 3.0, 4.0]])
LABELS = np.array([2, 0, 7])
MASK = np.array([True, True, False])


def _encode(boxes=BOXES, labels=LABELS, mask=MASK, **kwargs):
    return encode_targets(
        boxes, labels, mask, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES, **kwargs
    )


def test_shapes_and_dtypes():
    targets = _encode()
    expected = {
        "heatmap": ((GRID, GRID, NUM_CLASSES), np.float32),
        "center_index": ((3,), np.int32),
        "size": ((3, 2), np.float32),
        "offset": ((3, 2), np.float32),
        "target_mask": ((3,), np.float32),
    }
    assert {k: (v.shape, v.dtype) for k, v in targets.items()} == expected


def test_heatmap_peak_is_one_at_centre_cell_of_its_class_only():
    targets = _encode()
    heatmap = targets["heatmap"]
    for index, label in zip(targets["center_index"][:2], LABELS[:2], strict=True):
        y, x = divmod(int(index), GRID)
        assert heatmap[y, x, label] == 1.0
    # Exactly two cells hold 1.0, each in its object's class channel; class 1 is empty.
    peaks = np.argwhere(heatmap == 1.0)
    assert sorted(peaks[:, 2].tolist()) == [0, 2]
    assert not heatmap[..., 1].any()
    assert heatmap.min() >= 0.0 and heatmap.max() == 1.0


def test_heatmap_is_zero_far_from_objects():
    heatmap = _encode()["heatmap"]
    # Object 0 (class 2) is centred near cell (4, 6) with a small radius: the far corner is 0.
    assert heatmap[GRID - 1, GRID - 1, 2] == 0.0
    assert heatmap[0, GRID - 1, 0] == 0.0


def test_center_size_offset_reconstruct_boxes():
    targets = _encode()
    cells = np.stack(np.divmod(targets["center_index"][:2], GRID), axis=-1)
    centres = (cells + targets["offset"][:2]) * STRIDE
    sizes = targets["size"][:2] * STRIDE
    reconstructed = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1)
    np.testing.assert_allclose(reconstructed, BOXES[:2], atol=1e-5)
    assert np.all((targets["offset"] >= 0) & (targets["offset"] < 1))


def test_padding_rows_are_zero():
    targets = _encode()
    np.testing.assert_array_equal(targets["target_mask"], [1.0, 1.0, 0.0])
    assert targets["center_index"][2] == 0
    assert not targets["size"][2].any() and not targets["offset"][2].any()


def test_all_padding_gives_empty_targets():
    targets = _encode(mask=np.zeros(3, bool))
    assert not targets["heatmap"].any() and not targets["target_mask"].any()


def test_same_class_overlap_combines_by_max_not_sum():
    boxes = np.array([[16.0, 16.0, 48.0, 48.0], [16.0, 24.0, 48.0, 56.0]])
    both = _encode(boxes, np.array([1, 1]), np.array([True, True]))["heatmap"][..., 1]
    first = _encode(boxes[:1], np.array([1]), np.array([True]))["heatmap"][..., 1]
    second = _encode(boxes[1:], np.array([1]), np.array([True]))["heatmap"][..., 1]
    np.testing.assert_array_equal(both, np.maximum(first, second))
    assert both.max() == 1.0 and np.sum(both == 1.0) == 2


def test_boxes_are_clipped_and_empty_boxes_dropped():
    boxes = np.array([[-8.0, -8.0, 8.0, 8.0], [70.0, 70.0, 90.0, 90.0]])
    targets = _encode(boxes, np.array([0, 1]), np.array([True, True]))
    np.testing.assert_array_equal(targets["target_mask"], [1.0, 0.0])
    np.testing.assert_allclose(targets["size"][0], [2.0, 2.0])
    assert not targets["heatmap"][..., 1].any()


def test_bad_image_size_names_value():
    with pytest.raises(ValueError, match="got image_size=62"):
        encode_targets(BOXES, LABELS, MASK, image_size=62, num_classes=NUM_CLASSES)


def test_bad_label_names_value():
    with pytest.raises(ValueError, match="got 5"):
        _encode(labels=np.array([5, 0, 0]))


def test_gaussian_radius_matches_centernet_rule():
    # Reference values of CenterNet's rule; it grows with the box and shrinks with overlap.
    assert gaussian_radius(10.0, 10.0) == pytest.approx(2.7332, abs=1e-4)
    assert gaussian_radius(40.0, 20.0) > gaussian_radius(10.0, 10.0)
    assert gaussian_radius(10.0, 10.0, min_overlap=0.9) < gaussian_radius(10.0, 10.0)
    with pytest.raises(ValueError, match="got 1.5"):
        gaussian_radius(10.0, 10.0, min_overlap=1.5)


# CenterNet's target drawing (src/lib/utils/image.py and datasets/sample/ctdet.py),
# transcribed to NumPy as the reference for encode_targets and gaussian_radius.


def _centernet_gaussian_radius(det_size, min_overlap=0.7):
    height, width = det_size
    a1 = 1
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    sq1 = np.sqrt(b1**2 - 4 * a1 * c1)
    r1 = (b1 + sq1) / 2
    a2 = 4
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    sq2 = np.sqrt(b2**2 - 4 * a2 * c2)
    r2 = (b2 + sq2) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    sq3 = np.sqrt(b3**2 - 4 * a3 * c3)
    r3 = (b3 + sq3) / 2
    return min(r1, r2, r3)


def _centernet_gaussian2d(shape, sigma=1):
    m, n = [(ss - 1.0) / 2.0 for ss in shape]
    y, x = np.ogrid[-m : m + 1, -n : n + 1]
    h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h


def _centernet_draw_gaussian(heatmap, center, radius):
    diameter = 2 * radius + 1
    gaussian = _centernet_gaussian2d((diameter, diameter), sigma=diameter / 6)
    x, y = int(center[0]), int(center[1])
    height, width = heatmap.shape[0:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    masked_heatmap = heatmap[y - top : y + bottom, x - left : x + right]
    masked_gaussian = gaussian[radius - top : radius + bottom, radius - left : radius + right]
    if min(masked_gaussian.shape) > 0 and min(masked_heatmap.shape) > 0:
        np.maximum(masked_heatmap, masked_gaussian, out=masked_heatmap)
    return heatmap


def _centernet_heatmap(boxes, labels):
    """ctdet's heatmap of pixel [ymin, xmin, ymax, xmax] boxes (inside the image)."""
    heatmap = np.zeros((NUM_CLASSES, GRID, GRID))
    for box, label in zip(boxes, labels, strict=True):
        # ctdet's bbox is [x1, y1, x2, y2] in output-grid units.
        bbox = np.array([box[1], box[0], box[3], box[2]]) / STRIDE
        h, w = bbox[3] - bbox[1], bbox[2] - bbox[0]
        radius = max(0, int(_centernet_gaussian_radius((math.ceil(h), math.ceil(w)))))
        ct = np.array([(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2], dtype=np.float32)
        _centernet_draw_gaussian(heatmap[label], ct.astype(np.int32), radius)
    return heatmap.transpose(1, 2, 0)


@pytest.mark.parametrize(
    "height, width", [(1, 1), (2, 3), (4, 4), (7.5, 3.2), (10, 10), (16, 40), (60, 25), (128, 128)]
)
@pytest.mark.parametrize("min_overlap", [0.3, 0.7, 0.9])
def test_gaussian_radius_equals_centernet_function(height, width, min_overlap):
    expected = _centernet_gaussian_radius((height, width), min_overlap)
    assert gaussian_radius(height, width, min_overlap) == pytest.approx(expected, rel=1e-12)


def test_heatmap_equals_centernet_drawing():
    # Radii 0 to 4; boxes on every edge (the Gaussian window is cut there); boxes of one
    # class that overlap (combined by max); sizes that are not whole cells (rounded up:
    # the last box, 7.1 cells, gets radius 2 rather than the 1.94 of its exact size).
    boxes = np.array(
        [
            [0.0, 0.0, 4.0, 4.0],
            [0.0, 20.0, 10.0, 46.0],
            [30.0, 0.0, 64.0, 14.0],
            [0.0, 0.0, 64.0, 64.0],
            [4.0, 20.0, 52.0, 64.0],
            [24.0, 22.0, 55.0, 53.0],
            [5.0, 9.0, 13.0, 19.0],
            [2.0, 50.0, 9.0, 62.6],
            [34.0, 2.0, 62.4, 30.4],
        ]
    )
    labels = np.array([0, 1, 2, 2, 1, 1, 0, 2, 0])
    heatmap = _encode(boxes, labels, np.ones(len(boxes), bool))["heatmap"]
    expected = _centernet_heatmap(boxes, labels)
    radii = [
        max(0, int(_centernet_gaussian_radius((math.ceil(h), math.ceil(w)))))
        for h, w in (boxes[:, 2:] - boxes[:, :2]) / STRIDE
    ]
    assert sorted(set(radii)) == [0, 1, 2, 3, 4]
    # Off-peak values matter here: most cells of every window are neither 0 nor 1.
    assert np.sum((expected > 0) & (expected < 1)) > 100
    np.testing.assert_allclose(heatmap, expected, rtol=1e-6, atol=1e-7)


def test_box_utilities():
    a = np.array([[0.0, 0.0, 2.0, 2.0]])
    b = np.array([[0.0, 0.0, 2.0, 1.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(iou(a, b), [[0.5, 0.0, 0.0]])
    np.testing.assert_allclose(iou(b[2:], b[2:]), [[0.0]])
    np.testing.assert_array_equal(yxyx_to_xywh(np.array([1.0, 2.0, 5.0, 10.0])), [2, 1, 8, 4])
    np.testing.assert_array_equal(
        clip_boxes(np.array([[-3.0, 5.0, 40.0, 20.0]]), (32, 16)), [[0, 5, 32, 16]]
    )


def _random_batch(seed: int, batch: int = 4, rows: int = 12):
    """Boxes of every kind: overlapping, at and across the border, tiny, empty, padding."""
    rng = np.random.default_rng(seed)
    corners = rng.uniform(-16.0, IMAGE_SIZE + 16.0, (batch, rows, 2, 2))
    boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1)
    # Few classes, so that same-class Gaussians overlap.
    labels = rng.integers(0, NUM_CLASSES, (batch, rows)).astype(np.int32)
    mask = rng.random((batch, rows)) < 0.8
    boxes[0, :3] = [[0.0, 0.0, IMAGE_SIZE, IMAGE_SIZE], [0, 0, 4, 4], [60, 60, 64, 64]]
    boxes[0, 3] = [10.0, 10.0, 10.0, 30.0]  # zero height: dropped
    boxes[0, 4] = [70.0, 70.0, 90.0, 90.0]  # outside: empty after clipping
    boxes[0, 5] = [30.0, 30.0, 30.5, 30.5]  # smaller than a cell: radius 0
    mask[0, :6] = True
    labels[1, mask[1]] = 1  # one class only: every Gaussian overlaps another
    # Padding rows hold garbage, out-of-range labels included.
    labels[~mask] = rng.integers(-5, 50, int((~mask).sum()))
    boxes[2, ~mask[2]] = rng.uniform(-1e3, 1e3, (int((~mask[2]).sum()), 4))
    mask[3] = False  # all padding
    return boxes.astype(np.float32), labels, mask


def _numpy_batch(boxes, labels, mask):
    # The NumPy encoder checks labels on valid rows only: padding rows' garbage passes.
    per_image = [
        encode_targets(
            image_boxes, image_labels, image_mask, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES
        )
        for image_boxes, image_labels, image_mask in zip(boxes, labels, mask, strict=True)
    ]
    return {key: np.stack([t[key] for t in per_image]) for key in per_image[0]}


def _assert_same_targets(actual, expected):
    assert {k: (v.shape, v.dtype) for k, v in actual.items()} == {
        k: (v.shape, v.dtype) for k, v in expected.items()
    }
    for key in ("center_index", "size", "offset", "target_mask"):
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    heatmap, expected_heatmap = np.asarray(actual["heatmap"]), expected["heatmap"]
    # Same support, same peaks (radii and cells bit for bit); values to a few float32
    # ulps (16 at most over 20 random batches), as NumPy evaluates the exponent in float64.
    np.testing.assert_array_equal(heatmap > 0, expected_heatmap > 0)
    np.testing.assert_array_equal(heatmap == 1.0, expected_heatmap == 1.0)
    np.testing.assert_allclose(heatmap, expected_heatmap, rtol=1e-5, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_batch_encoder_matches_numpy_encoder(seed):
    boxes, labels, mask = _random_batch(seed)
    encode = jax.jit(encode_batch_targets, static_argnames=("image_size", "num_classes"))
    actual = encode(boxes, labels, mask, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    _assert_same_targets(actual, _numpy_batch(boxes, labels, mask))


def test_batch_encoder_edge_cases_match_numpy():
    boxes, labels, mask = _random_batch(0)
    expected = _numpy_batch(boxes, labels, mask)
    actual = encode_batch_targets(
        boxes, labels, mask, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES
    )
    _assert_same_targets(actual, expected)
    np.testing.assert_array_equal(actual["target_mask"][0, :6], [1, 1, 1, 0, 0, 1])
    assert not np.asarray(actual["heatmap"][3]).any() and not actual["target_mask"][3].any()
    # Overlapping same-class Gaussians take the max: every object keeps a peak of 1.
    peaks = np.asarray(actual["heatmap"][1, ..., 1]) == 1.0
    objects = np.asarray(actual["target_mask"][1]) > 0
    assert objects.sum() > 1
    assert peaks.sum() == len(set(np.asarray(actual["center_index"][1])[objects].tolist()))


def test_batch_encoder_vmaps_over_an_outer_axis():
    boxes, labels, mask = _random_batch(1)
    groups = [np.stack([a[:2], a[2:]]) for a in (boxes, labels, mask)]
    encode = functools.partial(encode_batch_targets, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    mapped = jax.jit(jax.vmap(encode))(*groups)
    flat = encode(boxes, labels, mask)
    for key in flat:
        np.testing.assert_array_equal(
            np.asarray(mapped[key]).reshape(flat[key].shape), flat[key], err_msg=key
        )


def test_batch_encoder_bad_inputs_are_clear_errors():
    boxes, labels, mask = _random_batch(0)
    with pytest.raises(ValueError, match="got image_size=62"):
        encode_batch_targets(boxes, labels, mask, image_size=62, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"boxes must have shape \[B, K, 4\]"):
        encode_batch_targets(boxes[0], labels, mask, image_size=64, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="labels and mask must have shape"):
        encode_batch_targets(boxes, labels[:, :3], mask, image_size=64, num_classes=NUM_CLASSES)

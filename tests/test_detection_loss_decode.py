"""Tests for jaxcomp.detection.loss and jaxcomp.detection.decode (tiny shapes, shared jits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxcomp.detection.decode import decode_detections
from jaxcomp.detection.loss import detection_loss, focal_loss, regression_l1
from jaxcomp.detection.targets import encode_targets

IMAGE_SIZE, NUM_CLASSES, STRIDE, TOP_K = 64, 3, 4, 6
GRID = IMAGE_SIZE // STRIDE

# Two images of up to three objects each; the last row of image 1 is padding.
BOXES = np.array(
    [
        [[4.0, 6.0, 20.0, 30.0], [30.0, 33.0, 50.0, 61.0], [40.0, 2.0, 63.0, 19.0]],
        [[10.0, 10.0, 30.0, 26.0], [35.0, 36.0, 47.0, 60.0], [0.0, 0.0, 9.0, 9.0]],
    ],
    np.float32,
)
LABELS = np.array([[0, 2, 2], [1, 0, 2]], np.int32)
MASK = np.array([[True, True, True], [True, True, False]])

decode = jax.jit(decode_detections, static_argnames=("k", "stride"))
jit_loss = jax.jit(detection_loss)
jit_focal = jax.jit(focal_loss)
focal_grad = jax.jit(jax.grad(focal_loss))


def _batch() -> dict[str, np.ndarray]:
    per_image = [
        encode_targets(b, lab, m, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
        for b, lab, m in zip(BOXES, LABELS, MASK, strict=True)
    ]
    return {key: np.stack([t[key] for t in per_image]) for key in per_image[0]}


BATCH = _batch()


def _perfect_outputs(batch: dict[str, np.ndarray], logit: float = 30.0) -> dict[str, np.ndarray]:
    """Outputs a perfect model would give: confident peaks, exact size/offset at centres."""
    dense = {"size": np.zeros((2, GRID * GRID, 2), np.float32)}
    dense["offset"] = np.zeros_like(dense["size"])
    for image, row in zip(*np.nonzero(batch["target_mask"]), strict=True):
        cell = batch["center_index"][image, row]
        for key in dense:
            dense[key][image, cell] = batch[key][image, row]
    heatmap = np.where(batch["heatmap"] == 1.0, logit, -logit).astype(np.float32)
    return {"heatmap": heatmap, **{k: v.reshape(2, GRID, GRID, 2) for k, v in dense.items()}}


def _sorted_rows(array: np.ndarray) -> np.ndarray:
    return array[np.lexsort(array.T[::-1])]


def test_decode_round_trips_encoded_boxes():
    detections = decode(_perfect_outputs(BATCH), k=TOP_K, stride=STRIDE)
    assert detections["boxes"].shape == (2, TOP_K, 4)
    assert detections["scores"].dtype == jnp.float32
    assert detections["classes"].dtype == jnp.int32
    for image in range(2):
        count = int(MASK[image].sum())
        scores = np.asarray(detections["scores"][image])
        assert np.all(scores[:count] > 0.99) and np.all(scores[count:] < 1e-6)
        decoded = np.concatenate(
            [detections["classes"][image, :count, None], detections["boxes"][image, :count]], -1
        )
        expected = np.concatenate([LABELS[image, :count, None], BOXES[image, :count]], -1)
        np.testing.assert_allclose(_sorted_rows(decoded), _sorted_rows(expected), atol=1e-4)


def test_decode_does_not_recompile_and_keeps_static_shapes():
    outputs = jax.tree.map(jnp.asarray, _perfect_outputs(BATCH))
    decode(outputs, k=TOP_K, stride=STRIDE)
    size_before = decode._cache_size()
    shifted = {**outputs, "heatmap": outputs["heatmap"] - 1.0}
    detections = decode(shifted, k=TOP_K, stride=STRIDE)
    assert decode._cache_size() == size_before
    assert {k: v.shape for k, v in detections.items()} == {
        "boxes": (2, TOP_K, 4),
        "scores": (2, TOP_K),
        "classes": (2, TOP_K),
    }


def test_decode_suppresses_non_peaks_and_clips_boxes():
    heatmap = np.full((1, 4, 4, 1), -10.0, np.float32)
    heatmap[0, 1, 1, 0], heatmap[0, 1, 2, 0] = 5.0, 4.0  # (1, 2) is a neighbour, not a peak
    outputs = {
        "heatmap": heatmap,
        "size": np.full((1, 4, 4, 2), 100.0, np.float32),
        "offset": np.full((1, 4, 4, 2), 0.5, np.float32),
    }
    detections = decode(outputs, k=2, stride=STRIDE)
    assert float(detections["scores"][0, 0]) == pytest.approx(jax.nn.sigmoid(5.0))
    assert float(detections["scores"][0, 1]) < jax.nn.sigmoid(-9.0)
    np.testing.assert_allclose(detections["boxes"][0, 0], [0.0, 0.0, 16.0, 16.0])


def test_decode_rejects_k_larger_than_map():
    outputs = {"heatmap": np.zeros((1, 2, 2, 1)), "size": np.zeros((1, 2, 2, 2))}
    outputs["offset"] = outputs["size"]
    with pytest.raises(ValueError, match="got k=5"):
        decode_detections(outputs, k=5)


def _centernet_focal_loss(logits: np.ndarray, target: np.ndarray) -> float:
    """CenterNet's `_neg_loss` (src/lib/models/losses.py), transcribed to float64 NumPy.

    `pred` is CenterNet's clamped sigmoid; the logits below stay inside its clamp.
    """
    pred = np.clip(1.0 / (1.0 + np.exp(-np.float64(logits))), 1e-4, 1 - 1e-4)
    gt = np.float64(target)
    pos_inds = (gt == 1).astype(np.float64)
    neg_inds = (gt < 1).astype(np.float64)
    neg_weights = (1 - gt) ** 4
    pos_loss = (np.log(pred) * (1 - pred) ** 2 * pos_inds).sum()
    neg_loss = (np.log(1 - pred) * pred**2 * neg_weights * neg_inds).sum()
    num_pos = pos_inds.sum()
    if num_pos == 0:
        return -neg_loss
    return -(pos_loss + neg_loss) / num_pos


def _random_heatmaps(seed: int, peaks: int):
    """Logits in CenterNet's clamp range; targets in [0, 1) with `peaks` cells exactly 1."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-6.0, 6.0, (2, 8, 8, 3)).astype(np.float32)
    target = (rng.uniform(0.0, 1.0, logits.shape) ** 3).astype(np.float32)
    target[target >= 1.0] = 0.5  # a value float32 rounds up to 1 would be an extra peak
    flat = target.reshape(-1)
    flat[rng.choice(flat.size, peaks, replace=False)] = 1.0
    return logits, target


@pytest.mark.parametrize("seed, peaks", [(0, 1), (1, 5), (2, 17)])
def test_focal_loss_equals_centernet_formula(seed, peaks):
    logits, target = _random_heatmaps(seed, peaks)
    # One object per peak, as encode_targets gives distinct objects distinct centre cells.
    loss = float(jit_focal(logits, target, np.float32(peaks)))
    np.testing.assert_allclose(loss, _centernet_focal_loss(logits, target), rtol=1e-5)


def test_focal_loss_without_objects_equals_centernet_formula():
    logits, target = _random_heatmaps(3, peaks=0)
    loss = float(jit_focal(logits, target, np.float32(0)))
    np.testing.assert_allclose(loss, _centernet_focal_loss(logits, target), rtol=1e-5)


def test_detection_loss_heatmap_term_is_normalised_by_the_object_count():
    logits = np.random.default_rng(4).uniform(-6.0, 6.0, BATCH["heatmap"].shape)
    outputs = {**_perfect_outputs(BATCH), "heatmap": logits.astype(np.float32)}
    _, terms = jit_loss(outputs, BATCH)
    assert BATCH["target_mask"].sum() == np.sum(BATCH["heatmap"] == 1.0) == 5
    expected = _centernet_focal_loss(logits, BATCH["heatmap"])
    np.testing.assert_allclose(float(terms["heatmap"]), expected, rtol=1e-5)


def test_focal_loss_near_zero_when_perfect_and_larger_when_wrong():
    num_objects = BATCH["target_mask"].sum()
    perfect = _perfect_outputs(BATCH)["heatmap"]
    assert float(jit_focal(perfect, BATCH["heatmap"], num_objects)) < 1e-6
    uncertain = float(jit_focal(np.zeros_like(perfect), BATCH["heatmap"], num_objects))
    wrong = float(jit_focal(-perfect, BATCH["heatmap"], num_objects))
    assert 1e-3 < uncertain < wrong


@pytest.mark.parametrize("logit", [1e4, -1e4])
def test_focal_loss_and_gradient_finite_for_extreme_logits(logit):
    logits = np.where(BATCH["heatmap"] == 1.0, logit, -logit).astype(np.float32)
    assert np.isfinite(float(jit_focal(logits, BATCH["heatmap"], 5.0)))
    assert np.all(np.isfinite(focal_grad(logits, BATCH["heatmap"], 5.0)))


def test_focal_loss_empty_batch_is_zero_not_nan():
    target = np.zeros((1, 4, 4, 2), np.float32)
    assert float(jit_focal(np.full_like(target, -30.0), target, 0.0)) < 1e-10


def test_regression_l1_gathers_at_centres_and_masks_padding():
    pred = np.zeros((1, 2, 2, 2), np.float32)
    pred[0, 1, 0] = [3.0, -1.0]  # flat cell 2
    center_index = np.array([[2, 0]])
    target = np.array([[[1.0, 1.0], [1e6, -1e6]]], np.float32)  # padding row is garbage
    loss = regression_l1(pred, center_index, target, np.array([[1.0, 0.0]]))
    assert float(loss) == pytest.approx(4.0)  # |3 - 1| + |-1 - 1|, one object


def test_detection_loss_under_jit():
    total, terms = jit_loss(_perfect_outputs(BATCH), BATCH)
    assert sorted(terms) == ["heatmap", "offset", "size", "total"]
    assert float(total) < 1e-5 and float(terms["total"]) == float(total)
    noisy = jax.tree.map(lambda x: x + 0.5, _perfect_outputs(BATCH))
    total, terms = jit_loss(noisy, BATCH)
    # Every real object's size and offset are off by 0.5 in both coordinates.
    assert float(terms["size"]) == pytest.approx(1.0, rel=1e-5)
    assert float(terms["offset"]) == pytest.approx(1.0, rel=1e-5)
    expected = float(terms["heatmap"]) + 0.1 * 1.0 + 1.0
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_detection_loss_names_missing_keys():
    with pytest.raises(KeyError, match="offset"):
        detection_loss({"heatmap": 0, "size": 0}, BATCH)


@settings(max_examples=25, deadline=None)
@given(
    logits=hnp.arrays(np.float32, (1, 4, 4, 2), elements=st.floats(-1e4, 1e4, width=32)),
    target=hnp.arrays(
        np.float32, (1, 4, 4, 2), elements=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])
    ),
    num_objects=st.integers(0, 5),
)
def test_focal_loss_is_finite_and_non_negative(logits, target, num_objects):
    loss = float(jit_focal(logits, target, np.float32(num_objects)))
    assert np.isfinite(loss) and loss >= 0.0
    assert np.all(np.isfinite(focal_grad(logits, target, np.float32(num_objects))))

"""Tests for jaxcomp.evaluation (tiny in-memory COCO sets)."""

import contextlib
import functools
import io
import logging
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxcomp import training  # evaluate, eval_step, make_mesh, TrainState
from jaxcomp.evaluation import METRIC_NAMES, coco_metrics, format_metrics_table

NUM_CLASSES = 3
CLASS_NAMES = ["cat", "dog", "bird"]

# Three images, up to three objects each: medium and large boxes, one small one.
# Row 2 of image 0 and row 1-2 of image 2 are padding (garbage boxes on purpose).
GT_BOXES = np.array(
    [
        [[10.0, 10.0, 60.0, 70.0], [80.0, 20.0, 200.0, 180.0], [1.0, 1.0, 500.0, 500.0]],
        [[30.0, 40.0, 50.0, 55.0], [100.0, 100.0, 160.0, 150.0], [5.0, 120.0, 120.0, 250.0]],
        [[40.0, 40.0, 90.0, 120.0], [0.0, 0.0, 9.0, 9.0], [7.0, 7.0, 8.0, 8.0]],
    ]
)
GT_LABELS = np.array([[0, 1, 2], [2, 0, 1], [1, 0, 0]])
GT_MASK = np.array([[True, True, False], [True, True, True], [True, False, False]])
IMAGE_IDS = np.array([11, 12, 13])
# Detections: the ground truth in the same slots, scores descending; padding slots score 0.
PERFECT = {
    "det_boxes": GT_BOXES,
    "det_scores": np.where(GT_MASK, [0.9, 0.8, 0.7], 0.0),
    "det_classes": GT_LABELS,
}


def _metrics(**overrides) -> dict[str, float]:
    arguments = {
        "gt_boxes": GT_BOXES,
        "gt_labels": GT_LABELS,
        "gt_mask": GT_MASK,
        "image_ids": IMAGE_IDS,
        "class_names": CLASS_NAMES,
        **PERFECT,
        **overrides,
    }
    return coco_metrics(**arguments)


def test_perfect_detections_score_one_and_quietly(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="jaxcomp.evaluation"):
        metrics = _metrics()
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == 1.0 and metrics["AP50"] == 1.0 and metrics["AP75"] == 1.0
    assert metrics["AP_small"] == 1.0 and metrics["AP_large"] == 1.0
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text


def test_shifted_detections_score_lower():
    shifted = _metrics(det_boxes=GT_BOXES + np.array([6.0, 6.0, 6.0, 6.0]))
    assert 0.0 < shifted["AP"] < 1.0
    assert shifted["AP50"] >= shifted["AP75"]


def test_wrong_classes_score_zero():
    metrics = _metrics(det_classes=(GT_LABELS + 1) % NUM_CLASSES)
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


@pytest.mark.parametrize("slots", [0, 3])
def test_empty_detections_score_zero(slots):
    metrics = _metrics(
        det_boxes=np.zeros((3, slots, 4)),
        det_scores=np.zeros((3, slots)),
        det_classes=np.zeros((3, slots), int),
    )
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0


def test_padding_images_are_ignored():
    # A fourth image whose ground truth is unmatched and whose id repeats: only valid rows count.
    pad = {
        "gt_boxes": np.concatenate([GT_BOXES, GT_BOXES[:1]]),
        "gt_labels": np.concatenate([GT_LABELS, GT_LABELS[:1]]),
        "gt_mask": np.concatenate([GT_MASK, np.ones((1, 3), bool)]),
        "det_boxes": np.concatenate([GT_BOXES, np.zeros((1, 3, 4))]),
        "det_scores": np.concatenate([PERFECT["det_scores"], np.full((1, 3), 0.95)]),
        "det_classes": np.concatenate([GT_LABELS, GT_LABELS[:1]]),
        "image_ids": np.append(IMAGE_IDS, IMAGE_IDS[0]),
    }
    assert _metrics(**pad, valid=np.array([True, True, True, False]))["AP"] == 1.0
    with pytest.raises(ValueError, match="got 11 2 times"):
        _metrics(**pad)


def test_images_without_ground_truth():
    no_gt = np.array([[True, True, False], [True, True, True], [False, False, False]])
    # Image 2 keeps its detection, now a false positive that outranks one true positive.
    scores = PERFECT["det_scores"].copy()
    scores[2, 0] = 0.85
    metrics = _metrics(gt_mask=no_gt, det_scores=scores)
    assert 0.0 < metrics["AP"] < 1.0
    # Without the detection the image is harmless.
    scores[2, 0] = 0.0
    assert _metrics(gt_mask=no_gt, det_scores=scores)["AP"] == 1.0


def test_missing_size_range_is_nan_and_no_ground_truth_at_all_is_nan():
    no_small = GT_MASK & (GT_BOXES[..., 2] - GT_BOXES[..., 0] > 30)
    assert math.isnan(_metrics(gt_mask=no_small)["AP_small"])
    assert all(math.isnan(v) for v in _metrics(gt_mask=np.zeros_like(GT_MASK)).values())


def test_score_threshold_drops_low_scores():
    metrics = _metrics(score_threshold=0.75)  # drops the 0.7 detection on image 1
    assert metrics["AP"] < 1.0


def test_class_ids_outside_class_names_are_rejected():
    with pytest.raises(ValueError, match="class id 5"):
        _metrics(det_classes=np.full_like(GT_LABELS, 5))


def test_default_class_names_cover_detected_classes():
    # Class 4 only occurs in detections: it must still be a category, i.e. a false positive.
    classes = GT_LABELS.copy()
    classes[1, 1] = 4
    metrics = coco_metrics(
        gt_boxes=GT_BOXES,
        gt_labels=GT_LABELS,
        gt_mask=GT_MASK,
        det_boxes=GT_BOXES,
        det_scores=PERFECT["det_scores"],
        det_classes=classes,
        image_ids=IMAGE_IDS,
    )
    assert metrics["AP"] < 1.0


def test_shape_mismatch_names_the_array():
    with pytest.raises(ValueError, match="det_scores"):
        _metrics(det_scores=np.zeros((2, 3)))


def test_format_metrics_table():
    table = format_metrics_table(
        {"teacher": {name: 0.5 for name in METRIC_NAMES}, "student": {"AP": 0.3012, "AP50": 0.5}}
    )
    lines = table.splitlines()
    assert lines[0] == "| model | AP | AP50 | AP75 | AP_small | AP_medium | AP_large |"
    assert lines[2] == "| teacher | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |"
    assert lines[3] == "| student | 30.1 | 50.0 | n/a | n/a | n/a | n/a |"


# `evaluate` and `eval_step` end to end on planted model outputs, against pycocotools fed
# directly. Images are 64x64 (a 16x16 output grid at stride 4), three classes.
STRIDE, GRID, TOP_K = 4, 16, 4

# Per image: ground truth (box, class) and detections (box, class, score); boxes are
# pixel [ymin, xmin, ymax, xmax]. Matches at IoUs 0.68, 0.71, 0.84, 0.855, 0.875 and 1
# (none on one of COCO's thresholds 0.5, 0.55, ..., 0.95), misses and false positives
# put AP well inside (0, 1).
PLANTED = {
    101: {
        "gt": [([8, 8, 40, 32], 0), ([36, 30, 60, 62], 1)],
        "det": [([8, 8, 40, 32], 0, 0.9), ([40, 34, 62, 62], 1, 0.8), ([4, 44, 20, 60], 2, 0.85)],
    },
    102: {
        "gt": [([10, 40, 30, 60], 2), ([40, 4, 62, 28], 0)],
        "det": [([12, 41, 30, 60], 2, 0.7), ([4, 4, 20, 20], 0, 0.6)],
    },
    103: {
        "gt": [([4, 4, 28, 28], 1), ([36, 36, 60, 60], 1), ([40, 4, 56, 20], 2)],
        "det": [([6, 6, 28, 28], 1, 0.95), ([36, 40, 60, 64], 1, 0.5), ([42, 4, 56, 20], 2, 0.3)],
    },
}


class _PlantedOutputs(nn.Module):
    """A detector whose outputs are its input: heatmap logits, then size, then offset."""

    @nn.compact
    def __call__(self, images, train=False):
        return {
            "heatmap": images[..., :NUM_CLASSES],
            "size": images[..., NUM_CLASSES : NUM_CLASSES + 2],
            "offset": images[..., NUM_CLASSES + 2 :],
        }


def _planted_outputs(detections) -> np.ndarray:
    """The [GRID, GRID, C + 4] outputs that decode to `detections` (one per cell, all peaks)."""
    outputs = np.zeros((GRID, GRID, NUM_CLASSES + 4), np.float32)
    outputs[..., :NUM_CLASSES] = -1e4  # a score of exactly 0: no detection
    for box, label, score in detections:
        box = np.asarray(box, np.float64) / STRIDE
        centre = (box[:2] + box[2:]) / 2
        y, x = np.floor(centre).astype(int)
        outputs[y, x, label] = np.log(score / (1 - score))
        outputs[y, x, NUM_CLASSES : NUM_CLASSES + 2] = box[2:] - box[:2]
        outputs[y, x, NUM_CLASSES + 2 :] = centre - (y, x)
    return outputs


def _planted_batches() -> list[dict[str, np.ndarray]]:
    """Two eval batches of two images; the last is padding that would add a false positive."""
    ids = [*PLANTED, 104]
    detections = [PLANTED[image_id]["det"] for image_id in PLANTED] + [PLANTED[101]["det"]]
    batch = {
        "image": np.stack([_planted_outputs(rows) for rows in detections]),
        "boxes": np.zeros((4, 3, 4), np.float32),
        "labels": np.zeros((4, 3), np.int32),
        "box_mask": np.zeros((4, 3), bool),
        "image_id": np.array(ids),
        "valid": np.array([True, True, True, False]),
    }
    for row, image_id in enumerate(PLANTED):
        for index, (box, label) in enumerate(PLANTED[image_id]["gt"]):
            batch["boxes"][row, index], batch["labels"][row, index] = box, label
            batch["box_mask"][row, index] = True
    return [
        {name: value[:2] for name, value in batch.items()},
        {name: value[2:] for name, value in batch.items()},
    ]


def _pycocotools_metrics() -> dict[str, float]:
    """COCO AP of PLANTED by pycocotools itself, from COCO-format records built here."""

    def xywh(box):
        return [box[1], box[0], box[3] - box[1], box[2] - box[0]]

    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": image_id} for image_id in PLANTED],
        "categories": [{"id": label + 1} for label in range(NUM_CLASSES)],
        "annotations": [
            {"image_id": image_id, "category_id": label + 1, "bbox": xywh(box), "iscrowd": 0}
            for image_id, planted in PLANTED.items()
            for box, label in planted["gt"]
        ],
    }
    for number, annotation in enumerate(ground_truth.dataset["annotations"], start=1):
        annotation.update(id=number, area=annotation["bbox"][2] * annotation["bbox"][3])
    results = [
        {"image_id": image_id, "category_id": label + 1, "bbox": xywh(box), "score": score}
        for image_id, planted in PLANTED.items()
        for box, label, score in planted["det"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(METRIC_NAMES, coco_eval.stats, strict=False))


def test_evaluate_of_eval_step_on_planted_outputs_equals_pycocotools():
    expected = _pycocotools_metrics()
    assert 0.2 < expected["AP"] < 0.8 and 0.2 < expected["AP75"] < expected["AP50"] < 0.8, expected
    state = training.TrainState(step=0, params={}, batch_stats={}, opt_state=None)
    eval_fn = jax.jit(functools.partial(training.eval_step, model=_PlantedOutputs(), top_k=TOP_K))
    metrics = training.evaluate(
        eval_fn, state, _planted_batches(), training.make_mesh(), CLASS_NAMES
    )
    for name in ("AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-9), name

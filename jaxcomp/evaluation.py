"""COCO-style box mAP through pycocotools, entirely in memory.

Ground truth and detections arrive as padded numpy arrays stacked over images
(what a jitted eval step returns) and are turned into pycocotools' in-memory
``COCO`` objects directly: no JSON files, and no ``COCO.loadRes`` (which fails
on an empty detection list and would hide empty-model results behind a crash).

Box areas are those of the boxes in the input image's pixels, so
``AP_small/medium/large`` use COCO's 32² and 96² thresholds on the resized
image, not the original one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxcomp.detection.boxes import yxyx_to_xywh

# The first six entries of COCOeval.stats, in order (all at maxDets=100).
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")

_logger = logging.getLogger(__name__)


def coco_metrics(
    *,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_mask: np.ndarray,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_classes: np.ndarray,
    image_ids: np.ndarray,
    class_names: Sequence[str] | None = None,
    valid: np.ndarray | None = None,
    score_threshold: float = 0.0,
) -> dict[str, float]:
    """COCO box AP of padded detections against padded ground truth.

    pycocotools' printed summary is captured and logged at INFO level on this
    module's logger. COCO counts at most 100 detections per image (the best by
    score); images without ground truth still count, their detections as false
    positives.

    Args:
        gt_boxes: [N, K, 4] pixel ``[ymin, xmin, ymax, xmax]`` ground-truth boxes.
        gt_labels: int [N, K] class ids.
        gt_mask: bool [N, K], False on padding rows.
        det_boxes: [N, k, 4] pixel ``[ymin, xmin, ymax, xmax]`` detections.
        det_scores: [N, k] detection scores.
        det_classes: int [N, k] detection class ids.
        image_ids: [N] image identifiers; must be unique among valid images.
        class_names: names of all classes (their count fixes the class ids'
            range); by default ids run up to the largest id seen.
        valid: bool [N], False for padding images (a partial last batch); all True by default.
        score_threshold: detections scoring at or below it are dropped (so the
            default drops only exact zeros, i.e. suppressed or padded slots).

    Returns:
        ``{'AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large'}`` as floats
        in [0, 1]; nan where there is no ground truth to score (pycocotools' -1).

    Example:
        >>> boxes = np.array([[[10.0, 10.0, 50.0, 60.0]]])
        >>> metrics = coco_metrics(gt_boxes=boxes, gt_labels=np.array([[0]]),
        ...     gt_mask=np.array([[True]]), det_boxes=boxes, det_scores=np.array([[0.9]]),
        ...     det_classes=np.array([[0]]), image_ids=np.array([7]))
        >>> metrics["AP"], metrics["AP50"]
        (1.0, 1.0)
    """
    gt_boxes, det_boxes = np.asarray(gt_boxes, np.float64), np.asarray(det_boxes, np.float64)
    gt_labels, det_classes = np.asarray(gt_labels), np.asarray(det_classes)
    det_scores = np.asarray(det_scores, np.float64)
    num_images = len(gt_boxes)
    valid = np.ones(num_images, bool) if valid is None else np.asarray(valid, bool)
    _check_shapes(
        gt_boxes=(gt_boxes, 3),
        gt_labels=(gt_labels, 2),
        gt_mask=(np.asarray(gt_mask), 2),
        det_boxes=(det_boxes, 3),
        det_scores=(det_scores, 2),
        det_classes=(det_classes, 2),
        image_ids=(np.asarray(image_ids), 1),
        valid=(valid, 1),
    )
    _check_unique_ids(np.asarray(image_ids)[valid])

    gt_keep = valid[:, None] & np.asarray(gt_mask, bool)
    det_keep = valid[:, None] & (det_scores > score_threshold)
    num_classes = _num_classes(class_names, gt_labels[gt_keep], det_classes[det_keep])

    # COCOeval records a match as the partner's annotation id with 0 meaning "unmatched",
    # so an annotation with id 0 could never be a true positive: ids start at 1 (images
    # and categories too, for uniformity).
    images = [{"id": int(index) + 1} for index in np.flatnonzero(valid)]
    categories = [
        {"id": label + 1, "name": class_names[label] if class_names is not None else str(label)}
        for label in range(num_classes)
    ]
    ground_truth = _annotations(gt_boxes, gt_labels, gt_keep)
    detections = _annotations(det_boxes, det_classes, det_keep, scores=det_scores)

    # pycocotools reports progress and results with print(): silence the progress and
    # keep the summary table for the log.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(
            _coco(images, ground_truth, categories), _coco(images, detections, categories), "bbox"
        )
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        coco_eval.summarize()
    _logger.info("COCO evaluation of %d images:\n%s", len(images), summary.getvalue())
    return {
        name: _metric_value(value)
        for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)], strict=True)
    }


def format_metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Formats COCO metrics of several models as a markdown table (AP in percent).

    Args:
        rows: model name -> metrics as returned by :func:`coco_metrics`; other
            keys are ignored, and missing or nan values show as ``n/a``.

    Returns:
        A markdown table, one row per model in the given order, one column per AP metric.

    Example:
        >>> print(format_metrics_table({"student": {"AP": 0.3012, "AP50": 0.5}}))
        | model | AP | AP50 | AP75 | AP_small | AP_medium | AP_large |
        |---|---:|---:|---:|---:|---:|---:|
        | student | 30.1 | 50.0 | n/a | n/a | n/a | n/a |
    """
    lines = [
        "| model | " + " | ".join(METRIC_NAMES) + " |",
        "|---|" + "---:|" * len(METRIC_NAMES),
    ]
    for model, metrics in rows.items():
        cells = [_percent(metrics.get(name, math.nan)) for name in METRIC_NAMES]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_value(value: float) -> float:
    """A COCOeval stat as a float: -1 ("no such objects") becomes nan."""
    if value < 0:
        return math.nan
    # AP averages 1010 precisions; rounding removes the 1e-16 summation noise so that a
    # perfect model reads exactly 1.0 (no metric means anything at 1e-12).
    return round(float(value), 12)


def _percent(value: float) -> str:
    """A metric in [0, 1] as a percentage with one decimal, or n/a for nan."""
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _check_shapes(**arrays: tuple[np.ndarray, int]) -> None:
    """Raises unless every array has its rank and all share the leading image axis."""
    num_images = len(arrays["gt_boxes"][0])
    for name, (array, rank) in arrays.items():
        if array.ndim != rank or len(array) != num_images:
            raise ValueError(
                f"{name} must have rank {rank} and {num_images} images (the length of "
                f"gt_boxes), got shape {array.shape}"
            )
    for name in ("gt_boxes", "det_boxes"):
        if arrays[name][0].shape[-1] != 4:
            raise ValueError(f"{name} must end in 4 coordinates, got shape {arrays[name][0].shape}")


def _check_unique_ids(image_ids: np.ndarray) -> None:
    """Raises if an image appears twice (e.g. an eval dataset that was repeated)."""
    unique, counts = np.unique(image_ids, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(
            f"image_ids must be unique among valid images, got {unique[counts > 1].tolist()[0]!r} "
            f"{counts.max()} times; evaluate each image once (no .repeat() on the eval split)"
        )


def _num_classes(
    class_names: Sequence[str] | None, gt_labels: np.ndarray, det_classes: np.ndarray
) -> int:
    """Number of categories; every id in use must fall inside it, or COCOeval drops it silently."""
    used = np.concatenate([gt_labels.ravel(), det_classes.ravel()]).astype(np.int64)
    if used.size and used.min() < 0:
        raise ValueError(f"class ids must be non-negative, got {used.min()}")
    if class_names is None:
        return int(used.max()) + 1 if used.size else 1
    if used.size and used.max() >= len(class_names):
        raise ValueError(
            f"class id {used.max()} is out of range for {len(class_names)} class_names; "
            "pass the dataset's full list of class names"
        )
    return len(class_names)


def _annotations(
    boxes: np.ndarray, labels: np.ndarray, keep: np.ndarray, scores: np.ndarray | None = None
) -> list[dict]:
    """COCO annotation dicts (ids from 1) for the kept rows of padded [N, K, ...] arrays."""
    image_index, row = np.nonzero(keep)
    columns = {
        "image_id": (image_index + 1).tolist(),
        "category_id": (labels[image_index, row].astype(np.int64) + 1).tolist(),
        "bbox": yxyx_to_xywh(boxes[image_index, row]).tolist(),
    }
    if scores is not None:
        columns["score"] = scores[image_index, row].tolist()
    rows = zip(*columns.values(), strict=True)
    annotations = [dict(zip(columns, values, strict=True)) for values in rows]
    for number, annotation in enumerate(annotations):
        # COCOeval needs 'area' (for the size ranges) and 'iscrowd' on every annotation.
        width, height = annotation["bbox"][2:]
        annotation.update(id=number + 1, area=width * height, iscrowd=0)
    return annotations


def _coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    """An indexed in-memory COCO object (createIndex prints, so call under redirect_stdout)."""
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco

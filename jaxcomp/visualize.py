"""Pictures for notebooks: detections drawn on images, and per-layer weight error.

Functions return matplotlib figures (the notebook displays them, a script saves
them) instead of writing files as `jaxcomp.report` does for training jobs.
Boxes are pixel `[ymin, xmin, ymax, xmax]`, as the input pipeline and
`jaxcomp.detection.decode_detections` give them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure

from jaxcomp.paths import leaf_names

# One colour per class, cycled: labels stay readable without a legend.
_COLORS = matplotlib.colormaps["tab10"].colors


def draw_detections(
    image: Any,
    boxes: Any,
    labels: Any,
    scores: Any = None,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.3,
    max_boxes: int = 20,
    title: str = "",
    axis: Any = None,
) -> Figure:
    """Draws boxes with their class names (and scores) on an image.

    Args:
      image: [H, W, 3] uint8 (or float in [0, 1]) image.
      boxes: [N, 4] pixel boxes `[ymin, xmin, ymax, xmax]`.
      labels: [N] integer class indices.
      scores: [N] detection scores, or None for ground truth (every box is drawn).
      class_names: names indexed by label; None writes the label number.
      score_threshold: boxes scoring below it are not drawn.
      max_boxes: at most this many boxes, best scores first.
      title: the axis title.
      axis: a matplotlib axis to draw on; None makes a new figure of one axis.

    Returns:
      The figure holding the axis.

    Example:
      >>> figure = draw_detections(images[0], det["boxes"][0], det["classes"][0],
      ...                          det["scores"][0], class_names)
    """
    image = np.asarray(image)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
    if len(labels) != len(boxes):
        raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels; pass one per box")
    if scores is not None:
        scores = np.asarray(scores, np.float32).reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"got {len(boxes)} boxes but {len(scores)} scores; pass one per box")
    if max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0, got {max_boxes}")
    if axis is None:
        figure = Figure(figsize=(4, 4))
        axis = figure.add_subplot()
    axis.imshow(image)
    axis.set_axis_off()
    axis.set_title(title, fontsize=9)
    for index in _boxes_to_draw(scores, len(boxes), score_threshold, max_boxes):
        ymin, xmin, ymax, xmax = boxes[index]
        label = int(labels[index])
        color = _COLORS[label % len(_COLORS)]
        axis.add_patch(
            patches.Rectangle(
                (xmin, ymin), xmax - xmin, ymax - ymin, fill=False, edgecolor=color, linewidth=1.5
            )
        )
        text = class_names[label] if class_names is not None else str(label)
        if scores is not None:
            text = f"{text} {scores[index]:.2f}"
        axis.text(
            xmin,
            ymin,
            text,
            fontsize=7,
            color="white",
            verticalalignment="bottom",
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1, "alpha": 0.8},
        )
    return axis.figure


def _boxes_to_draw(scores, count: int, threshold: float, max_boxes: int) -> list[int]:
    """Indices of the boxes to draw: all ground truth, else the best scores above threshold."""
    if scores is None:
        return list(range(min(count, max_boxes)))
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if scores[i] >= threshold][:max_boxes]


def detection_grid(
    images: Any,
    panels: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.3,
    max_boxes: int = 20,
    panel_size: float = 2.5,
) -> Figure:
    """One row per model (or ground truth), one column per image: detections side by side.

    Args:
      images: [B, H, W, 3] images.
      panels: row title -> {'boxes' [B, N, 4], 'classes' (or 'labels') [B, N] and,
        for detections, 'scores' [B, N]; ground truth may add 'box_mask' [B, N]}, e.g.
        {'ground truth': batch, 'student': student_detections, 'compressed': ...}.
        A panel may hold more rows than `images` (a whole eval batch): the first B are drawn.
      class_names: names indexed by label.
      score_threshold: detections scoring below it are not drawn.
      max_boxes: at most this many boxes per image.
      panel_size: inches per image.

    Returns:
      The figure.
    """
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"images must be a non-empty [B, H, W, 3] batch, got shape {images.shape}")
    if not panels:
        raise ValueError("panels is empty; pass e.g. {'ground truth': batch, 'model': detections}")
    figure = Figure(figsize=(panel_size * len(images), panel_size * len(panels)))
    grid = figure.subplots(len(panels), len(images), squeeze=False)
    for row, (name, panel) in enumerate(panels.items()):
        labels = panel["classes"] if "classes" in panel else panel.get("labels")
        if labels is None:
            raise ValueError(f"panel {name!r} needs 'classes' or 'labels', has {sorted(panel)}")
        for column in range(len(images)):
            boxes, row_labels = np.asarray(panel["boxes"][column]), np.asarray(labels[column])
            scores = None if "scores" not in panel else np.asarray(panel["scores"][column])
            if "box_mask" in panel:
                keep = np.asarray(panel["box_mask"][column], bool)
                boxes, row_labels = boxes[keep], row_labels[keep]
                scores = None if scores is None else scores[keep]
            draw_detections(
                images[column],
                boxes,
                row_labels,
                scores,
                class_names,
                score_threshold=score_threshold,
                max_boxes=max_boxes,
                title=name if column == 0 else "",
                axis=grid[row, column],
            )
    figure.tight_layout()
    return figure


def layer_errors(reference: Any, approximation: Any) -> list[dict[str, Any]]:
    """Per-kernel error of an approximated params tree (fake-quantized, pruned) against the float.

    Args:
      reference: the float params pytree.
      approximation: a pytree of the same structure, e.g.
        `jaxcomp.quant.fake_quant_weights(reference, rules, bits=4)`.

    Returns:
      One row per leaf of rank >= 2 (conv/dense kernels), in flattening order:
      {name, shape, relative_error: ||a - r|| / ||r||, sqnr_db: 20 log10 ||r|| / ||a - r||
      (inf where they are equal), changed: whether any entry differs}.

    Example:
      >>> rows = layer_errors(params, quant.fake_quant_weights(params, [(r".*kernel", True)]))
    """
    names = leaf_names(reference)
    reference_leaves, treedef = jax.tree.flatten(reference)
    try:
        approximation_leaves = treedef.flatten_up_to(approximation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"approximation must have the structure of reference (leaves {names[:3]}...): {error}"
        ) from None
    rows = []
    for name, ref, approx in zip(names, reference_leaves, approximation_leaves, strict=True):
        ref, approx = np.asarray(ref, np.float64), np.asarray(approx, np.float64)
        if ref.ndim < 2:
            continue
        if ref.shape != approx.shape:
            raise ValueError(f"{name}: approximation shape {approx.shape} != {ref.shape}")
        error_norm = float(np.linalg.norm(approx - ref))
        ref_norm = float(np.linalg.norm(ref))
        rows.append(
            {
                "name": name,
                "shape": tuple(ref.shape),
                "relative_error": error_norm / ref_norm if ref_norm else float(error_norm > 0),
                "sqnr_db": 20 * np.log10(ref_norm / error_norm) if error_norm else float("inf"),
                "changed": bool(error_norm > 0),
            }
        )
    return rows


def plot_layer_errors(
    rows: Mapping[str, list[dict[str, Any]]] | list[dict[str, Any]], title: str = ""
) -> Figure:
    """A horizontal bar per kernel: its relative error, one bar colour per series.

    Args:
      rows: `layer_errors` rows, or series name -> rows (e.g. {'int8': ..., 'int4': ...})
        with the same kernels in the same order.
      title: the figure title.

    Returns:
      The figure (relative error on a log axis; layers left untouched have no bar).
    """
    series = {"": rows} if isinstance(rows, list) else dict(rows)
    if not series or not all(series.values()):
        raise ValueError("no rows to plot; pass layer_errors(reference, approximation)")
    if not any(row["changed"] for series_rows in series.values() for row in series_rows):
        raise ValueError("no layer differs from the reference: there is no error to plot")
    names = [row["name"] for row in next(iter(series.values()))]
    for label, series_rows in series.items():
        if [row["name"] for row in series_rows] != names:
            raise ValueError(f"series {label!r} has other layers than the first series")
    height = max(3.0, 0.16 * len(names) * max(1, len(series)) ** 0.5 + 1.0)
    figure = Figure(figsize=(8, height))
    axis = figure.add_subplot()
    bar_height = 0.8 / len(series)
    for offset, (label, series_rows) in enumerate(series.items()):
        positions = np.arange(len(names)) + (offset - (len(series) - 1) / 2) * bar_height
        errors = [row["relative_error"] if row["changed"] else np.nan for row in series_rows]
        axis.barh(positions, errors, height=bar_height, label=label or None)
    axis.set_yticks(range(len(names)), [name.removesuffix("/kernel") for name in names], fontsize=6)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("relative error ||w' - w|| / ||w|| (log scale; no bar: left unchanged)")
    axis.set_title(title or "per-layer weight error", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure

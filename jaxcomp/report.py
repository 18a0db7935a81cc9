"""Plots of what compression did, for people who would rather look than read.

Each plot is a `matplotlib.figure.Figure` saved to a file, without pyplot, so it
works on machines without a display and leaves a notebook's backend alone.
"""

import math
from typing import Any


def plot_layer_sparsity(report: dict[str, Any], path: str, title: str = "") -> None:
    """A horizontal bar per conv/dense kernel: its sparsity, pruned leaves highlighted.

    Args:
      report: `jaxcomp.prune.sparsity_report(params, masks)`.
      path: where to write the image (the extension picks the format, e.g. .png).
      title: the figure title.
    """
    rows = [row for row in report["leaves"] if len(row["shape"]) >= 2]
    if not rows:
        raise ValueError("the report has no kernel (rank >= 2) leaves to plot")
    height = max(3.0, 0.16 * len(rows) + 1.0)
    figure = _figure(figsize=(8, height))
    axis = figure.subplots()
    positions = range(len(rows))
    colors = ["tab:red" if row.get("pruned") else "tab:gray" for row in rows]
    axis.barh(positions, [100 * row["sparsity"] for row in rows], color=colors)
    axis.set_yticks(positions, [row["name"].removesuffix("/kernel") for row in rows], fontsize=6)
    axis.invert_yaxis()
    axis.set_xlim(0, 100)
    axis.set_xlabel("sparsity (% of weights that are zero); red: pruned by the masks")
    total = report.get("pruned", report["total"])
    axis.set_title(title or f"per-layer sparsity (overall {100 * total['sparsity']:.1f}%)")
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and accuracy (higher), by size.

    Example:
      >>> pareto_front([(1, 0.2), (2, 0.1), (3, 0.5)])
      [(1, 0.2), (3, 0.5)]
    """
    front, best = [], float("-inf")
    for size, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((size, accuracy))
            best = accuracy
    return front


_COSTS = {
    "bytes_on_disk": ("KiB on disk, packed (log scale)", 1 / 1024, "size on disk"),
    "flops": ("forward MFLOPs counting non-zeros (log scale)", 1e-6, "forward FLOPs"),
}


def _kind(row: dict[str, Any]) -> str:
    """How a row's model came about: dense alone, dense distilled, or compressed."""
    if row["prune"] != "none" or row["quant"] != "none":
        return "compressed"
    return "dense, distilled" if row.get("distilled") else "dense, trained alone"


def plot_pareto(rows: list[dict[str, Any]], path: str, cost: str = "bytes_on_disk") -> None:
    """AP against a cost, one labelled point per stage, dense and compressed told apart.

    Error bars are one standard deviation over seeds where a row has several
    (`AP_std`, as `jaxcomp.recipe.aggregate_rows` gives); the Pareto front over all
    points is drawn, so a compressed model below the front of the dense models of
    other widths is beaten by simply training a smaller one.

    Args:
      rows: `jaxcomp.recipe.result_row` or `aggregate_rows` dicts (stage, AP, prune,
        quant, distilled and the cost).
      path: where to write the image.
      cost: 'bytes_on_disk' or 'flops'.
    """
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {sorted(_COSTS)}, got {cost!r}")
    label, scale, title = _COSTS[cost]
    figure = _figure(figsize=(7.5, 5))
    axis = figure.subplots()
    points = [(row[cost] * scale, 100 * row["AP"]) for row in rows]
    styles = {
        "dense, trained alone": ("s", "tab:gray"),
        "dense, distilled": ("D", "tab:green"),
        "compressed": ("o", "tab:blue"),
    }
    for kind, (marker, color) in styles.items():
        chosen = [i for i, row in enumerate(rows) if _kind(row) == kind]
        if not chosen:
            continue
        errors = [100 * rows[i].get("AP_std", float("nan")) for i in chosen]
        axis.errorbar(
            [points[i][0] for i in chosen],
            [points[i][1] for i in chosen],
            yerr=[0.0 if math.isnan(error) else error for error in errors],
            fmt=marker,
            color=color,
            capsize=3,
            label=kind,
            zorder=3,
        )
    # Labels alternate above and below in order of cost, so neighbours do not overlap.
    by_cost = sorted(range(len(rows)), key=lambda i: points[i][0])
    for rank, i in enumerate(by_cost):
        above = rank % 2 == 0
        axis.annotate(
            rows[i]["stage"],
            points[i],
            fontsize=7,
            xytext=(4, 3 if above else -3),
            textcoords="offset points",
            va="bottom" if above else "top",
        )
    front = pareto_front(points)
    axis.step(
        *zip(*front, strict=True), where="post", color="tab:orange", alpha=0.7, label="Pareto front"
    )
    axis.set_xscale("log")
    # Room for the labels of the outermost points.
    axis.margins(x=0.12, y=0.08)
    axis.set_xlabel(label)
    axis.set_ylabel("AP (%), mean ± std over seeds")
    axis.set_title(f"accuracy against {title}")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_accuracy_vs_sparsity(rows: list[dict[str, Any]], path: str) -> None:
    """AP against the fraction of zero weights, one series per pruning method.

    Rows of the pruned models' architecture without pruning are drawn at their own
    (near-zero) sparsity as the dense reference.
    """
    pruned_models = {row["model"] for row in rows if row["prune"] != "none"}
    figure = _figure(figsize=(6, 4))
    axis = figure.subplots()
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["model"] in pruned_models or not pruned_models:
            label = "dense" if row["prune"] == "none" else row["prune"]
            series.setdefault(label, []).append((100 * row["sparsity"], 100 * row["AP"]))
    for label, points in sorted(series.items()):
        points.sort()
        axis.plot(
            *zip(*points, strict=True),
            marker="o",
            linestyle="-" if len(points) > 1 else "none",
            label=label,
        )
    axis.set_xlabel("sparsity (% of all parameters that are zero)")
    axis.set_ylabel("AP (%)")
    axis.set_title("accuracy against sparsity")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_training_curves(curves: dict[str, dict[str, list]], path: str) -> None:
    """Detection loss and eval AP50 against the train step, one line per run.

    The left panel is the detection part of the loss only, so runs with and without
    distillation terms compare like for like.

    Args:
      curves: run name -> {'loss': [(step, detection loss)], 'AP50': [(step, AP50 in
        [0, 1])]}; either list may be empty.
      path: where to write the image.
    """
    figure = _figure(figsize=(10, 4))
    loss_axis, ap_axis = figure.subplots(1, 2)
    for name, curve in sorted(curves.items()):
        if curve["loss"]:
            loss_axis.plot(*zip(*curve["loss"], strict=True), label=name, linewidth=1)
        if curve["AP50"]:
            steps, values = zip(*curve["AP50"], strict=True)
            ap_axis.plot(steps, [100 * value for value in values], marker="o", label=name)
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("train step")
    loss_axis.set_ylabel("detection loss (train batches)")
    ap_axis.set_xlabel("train step")
    ap_axis.set_ylabel("eval AP50 (%)")
    for axis in (loss_axis, ap_axis):
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=8)
    figure.suptitle("training curves")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _figure(figsize: tuple[float, float]):
    # matplotlib is imported on first use: it adds a quarter second to every start.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)

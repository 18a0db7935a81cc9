"""Plots of what compression did, for people who would rather look than read.

Matplotlib with the non-interactive Agg backend, so plots are written from
training jobs and tests on machines without a display.
"""

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


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
    figure, axis = plt.subplots(figsize=(8, height))
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
    plt.close(figure)

"""How sparse a params tree is: per-leaf and global counts, as a dict and a markdown table."""

from typing import Any

import jax
import numpy as np

from jaxcomp.paths import leaf_names
from jaxcomp.prune.masks import check_masks


def _totals(rows: list[dict]) -> dict:
    size = sum(row["size"] for row in rows)
    nonzeros = sum(row["nonzeros"] for row in rows)
    return {"size": size, "nonzeros": nonzeros, "sparsity": 1.0 - nonzeros / size if size else 0.0}


def sparsity_report(params: Any, masks: Any = None) -> dict:
    """Counts the non-zero entries of every array leaf of `params`.

    Args:
      params: a pytree of arrays.
      masks: optional mask tree; leaves whose mask is a full array (not a
        0-d True) count as pruned leaves.

    Returns:
      `{"leaves": [{name, shape, size, nonzeros, sparsity[, pruned]}, ...],
      "total": {size, nonzeros, sparsity}}` and, with masks, `"pruned"`: the
      same totals over the pruned leaves only.

    Example:
      >>> sparsity_report({"kernel": np.array([[0.0, 1.0]])})["total"]["sparsity"]
      0.5
    """
    if masks is not None:
        check_masks(params, masks)
    mask_leaves = [None] * len(jax.tree.leaves(params)) if masks is None else jax.tree.leaves(masks)
    rows = []
    for name, leaf, mask in zip(
        leaf_names(params), jax.tree.leaves(params), mask_leaves, strict=True
    ):
        if not hasattr(leaf, "shape"):
            continue
        array = np.asarray(leaf)
        nonzeros = int(np.count_nonzero(array))
        row = {
            "name": name,
            "shape": tuple(array.shape),
            "size": int(array.size),
            "nonzeros": nonzeros,
            "sparsity": 1.0 - nonzeros / array.size if array.size else 0.0,
        }
        if masks is not None:
            row["pruned"] = np.ndim(mask) > 0
        rows.append(row)
    report = {"leaves": rows, "total": _totals(rows)}
    if masks is not None:
        report["pruned"] = _totals([row for row in rows if row["pruned"]])
    return report


def format_sparsity_table(report: dict) -> str:
    """Formats a `sparsity_report` as a markdown table, the global row last.

    Args:
      report: the output of `sparsity_report`.

    Returns:
      The table, one line per leaf, then the pruned leaves' totals (if any) and
      the global totals.
    """
    lines = [
        "| leaf | shape | size | non-zeros | sparsity |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in report["leaves"]:
        shape = "x".join(str(dim) for dim in row["shape"]) or "scalar"
        lines.append(
            f"| {row['name']} | {shape} | {row['size']} | {row['nonzeros']} | "
            f"{row['sparsity']:.2%} |"
        )
    if "pruned" in report:
        pruned = report["pruned"]
        lines.append(
            f"| **pruned leaves** | | {pruned['size']} | {pruned['nonzeros']} | "
            f"{pruned['sparsity']:.2%} |"
        )
    total = report["total"]
    lines.append(
        f"| **all leaves** | | {total['size']} | {total['nonzeros']} | {total['sparsity']:.2%} |"
    )
    return "\n".join(lines)

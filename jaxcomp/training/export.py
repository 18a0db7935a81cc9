"""What a trained model costs and buys: exports, non-zeros, FLOPs, bytes on disk, mAP.

Every run ends with `compression_summary`: the model saved dense and sparse, and
each form the methods export (`Transform.export`: an int8 tree, a shrunk model)
saved, measured and evaluated, all written to `compression.json`.
"""

import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxcomp import flops, prune, report, transforms
from jaxcomp.training.experiment import Experiment, evaluate_experiment
from jaxcomp.training.state import TrainState
from jaxcomp.training.steps import jit_eval_step


def model_flops(model: nn.Module, variables: Any, image_size: int) -> dict[str, float]:
    """Forward FLOPs for one image: dense, and counting only non-zero kernel entries."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.uint8)
    positions = flops.kernel_output_positions(model, variables, images, train=False)
    params = variables["params"]
    return {
        "flops": flops.count_flops(params, positions)["total"],
        "flops_nonzero": flops.count_flops(params, positions, nonzero_only=True)["total"],
    }


def save_and_measure(tree: Any, directory: str) -> dict[str, int]:
    """Saves `tree` with orbax dense and sparse under `directory`; bytes of each and raw.

    Orbax compresses checkpoints (zstd), so runs of zeros already shrink the dense
    checkpoint; the sparse form (bitmask + non-zero values) wins at high sparsity.
    `bytes_raw` is the arrays' uncompressed size: about what an unpruned float32
    model takes on disk, as trained weights do not compress. `bytes_zstd` and
    `bytes_gzip` are the sparse form's content entropy-coded whole
    (`prune.entropy_coded_bytes`).
    """
    tree = jax.device_get(tree)
    dense_dir, sparse_dir = os.path.join(directory, "dense"), os.path.join(directory, "sparse")
    # An export is derived from the checkpoint: re-evaluating a finished run rewrites it.
    for path in (dense_dir, sparse_dir):
        if os.path.isdir(path):
            shutil.rmtree(path)
    prune.save_dense(dense_dir, tree)
    prune.save_sparse(sparse_dir, tree)
    return {
        "bytes_raw": int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))),
        "bytes_dense": prune.directory_bytes(dense_dir),
        "bytes_sparse": prune.directory_bytes(sparse_dir),
        **prune.entropy_coded_bytes(tree),
    }


def export_report(
    model: nn.Module, variables: Any, image_size: int, directory: str
) -> dict[str, float]:
    """Saves a float model's `variables` under `directory` and measures what it costs.

    Returns:
      parameters, non-zeros, sparsity, forward FLOPs (dense and non-zero only) and
      the bytes of `save_and_measure`.
    """
    variables = jax.device_get(variables)
    sparsity = prune.sparsity_report(variables["params"])
    return {
        "parameters": sparsity["total"]["size"],
        "nonzeros": sparsity["total"]["nonzeros"],
        "sparsity": sparsity["total"]["sparsity"],
        **model_flops(model, variables, image_size),
        **save_and_measure(variables, directory),
    }


def _masks(opt_state: Any) -> Any:
    """The pruning masks in `opt_state`, or None when nothing prunes."""
    try:
        return prune.masks_of(opt_state)
    except ValueError:
        return None


def compression_summary(
    experiment: Experiment, state: TrainState, workdir: str, metrics: dict[str, float]
) -> dict[str, Any]:
    """What the trained model costs, and each form the methods export.

    Exports the model dense and sparse (`workdir/export/{dense,sparse}`), then every
    form of every method's `export` (`workdir/export/<form>`), each evaluated on the
    eval split. Everything goes to `workdir/compression.json`, the per-layer sparsity
    also to `sparsity.md` and `sparsity.png` (process 0 writes them).

    Returns:
      {'model': row, 'layers': per-layer sparsity, <form>: row, ...}; a row holds AP,
      AP50, parameters, non-zeros, sparsity, FLOPs and bytes.
    """
    config = experiment.config
    # Leaves split by `config.mesh.rules` may live on other hosts; every process gathers
    # the whole state before reading it.
    state = multihost_utils.process_allgather(state, tiled=True)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    export_dir = os.path.join(os.path.abspath(workdir), "export")
    size = config.data.image_size
    exported = export_report(experiment.model, variables, size, export_dir)
    summary: dict[str, Any] = {
        "model": {**exported, "AP": metrics["AP"], "AP50": metrics["AP50"]},
        "layers": prune.sparsity_report(
            variables["params"], jax.device_get(_masks(state.opt_state))
        ),
    }
    views = transforms.views(
        experiment.methods,
        jax.device_get(state.methods or {}),
        jax.device_get(state.method_params or {}),
        int(state.step),
        training=False,
    )
    inputs = transforms.ExportInputs(variables, state.opt_state)
    for name, transform in experiment.methods:
        for form, export in transform.export(views[name], inputs).items():
            directory = os.path.join(export_dir, form)
            if export.model is None:
                row = {**summary["model"], **save_and_measure(export.tree, directory)}
            else:
                row = export_report(export.model, export.tree, size, directory)
            eval_step = jit_eval_step(
                None,
                config.eval.top_k,
                experiment.mesh,
                apply=export.apply,
                batch_axes=experiment.batch_axes,
            )
            replicated = NamedSharding(experiment.mesh, PartitionSpec())
            form_metrics = evaluate_experiment(
                experiment, jax.device_put(export.tree, replicated), eval_step
            )
            summary[form] = {
                **row,
                "AP": form_metrics["AP"],
                "AP50": form_metrics["AP50"],
                **export.info,
            }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "compression.json"), "w") as f:
            json.dump(summary, f, indent=2, default=_json_default)
        with open(os.path.join(workdir, "sparsity.md"), "w") as f:
            f.write(prune.format_sparsity_table(summary["layers"]) + "\n")
        report.plot_layer_sparsity(summary["layers"], os.path.join(workdir, "sparsity.png"))
        print(format_compression_table(summary), flush=True)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_compression_table(summary: dict[str, Any]) -> str:
    """Markdown table of `compression_summary`: the model and each exported form."""
    lines = [
        "| model | AP | AP50 | parameters | non-zeros | sparsity | MFLOPs | MFLOPs non-zero "
        "| KiB raw arrays | KiB on disk, dense | KiB on disk, sparse |",
        "|---|" + "---:|" * 10,
    ]
    for name, row in summary.items():
        if name == "layers":
            continue
        lines.append(
            f"| {name} | {100 * row['AP']:.1f} | {100 * row['AP50']:.1f} | {row['parameters']:,} "
            f"| {row['nonzeros']:,} | {100 * row['sparsity']:.1f}% | {row['flops'] / 1e6:.1f} "
            f"| {row['flops_nonzero'] / 1e6:.1f} | {row['bytes_raw'] / 1024:.0f} "
            f"| {row['bytes_dense'] / 1024:.0f} "
            f"| {row['bytes_sparse'] / 1024:.0f} |"
        )
    return "\n".join(lines)

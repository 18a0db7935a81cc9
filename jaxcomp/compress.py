"""The detector's compression stages, built from a config: the glue between `prune/` and training.

`prune/` knows nothing of detectors; this module supplies what it needs (default
rules that keep the first conv and the heatmap's last conv dense, the model's
channel groups) and measures what a compressed model buys: non-zeros, FLOPs,
bytes on disk and, for channel pruning, a physically smaller model.
"""

import dataclasses
import os
import re
import shutil
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from jaxcomp import flops, paths, prune, quant
from jaxcomp.config import prune_end_step
from jaxcomp.detection.distill import DistillSpec
from jaxcomp.models import centernet, create_model


def default_prune_rules(
    method: str, sparsity: float, names: list[str]
) -> tuple[tuple[str, Any], ...]:
    """Which leaves (or channel groups) a detector prunes by default, and how much.

    Conv kernels only (not biases or norms). The first conv (3 input channels)
    and the heatmap head's last conv stay dense, as detector pruning recipes do,
    and so do the 3x3 depthwise kernels: they hold ~7% of the student's weights,
    but 9 weights per channel do not survive unstructured pruning (the student
    pruned to 80% over 1000 fine-tuning steps: AP50 12.5 with them, 22.9 without)
    and have a single input channel, so no N:M groups. For 'channel' the rules
    name channel groups (`centernet.channel_groups`).

    Args:
      method: 'unstructured', 'nm' or 'channel'.
      sparsity: the target of every selected leaf (or group).
      names: the leaf (or group) names, so that exclusions a model does not have
        (the tiny model has no stem group) are left out instead of reported.
    """
    if method == "channel":
        exclusions = [r"backbone/stem"]
        everything = r".*"
    else:
        exclusions = [
            r"backbone/stem/conv/kernel",
            r"heatmap/out/kernel",
            r".*(depthwise|_dw)/.*kernel",
        ]
        everything = r".*kernel"
    present = [rule for rule in exclusions if any(re.fullmatch(rule, name) for name in names)]
    return (*((rule, None) for rule in present), (everything, sparsity))


def prune_rules(config: ml_collections.ConfigDict, names: list[str]) -> tuple[tuple[str, Any], ...]:
    """`config.prune.rules`, or the detector defaults when it is None."""
    if config.prune.rules is not None:
        return tuple(tuple(rule) for rule in config.prune.rules)
    return default_prune_rules(config.prune.method, config.prune.sparsity, names)


def make_schedule(config: ml_collections.ConfigDict) -> prune.Schedule:
    """The sparsity schedule `config.prune.schedule` over [begin_step, end_step]."""
    prune_config = config.prune
    begin, end = prune_config.begin_step, prune_end_step(config)
    if prune_config.schedule == "one_shot":
        return prune.one_shot_schedule(prune_config.sparsity, begin)
    if prune_config.schedule == "iterative":
        return prune.iterative_schedule(prune_config.sparsity, begin, end, prune_config.num_prunes)
    return prune.polynomial_schedule(prune_config.sparsity, begin, end, prune_config.frequency)


def make_pruner(config: ml_collections.ConfigDict, variables: Any) -> prune.Pruner | None:
    """The pruner a config asks for (None for `config.prune.method == 'none'`).

    Args:
      config: the experiment config.
      variables: the model's (abstract) variables, for the channel groups.
    """
    if config.prune.method == "none":
        return None
    groups = None
    names = paths.leaf_names(variables["params"])
    if config.prune.method == "channel":
        groups = prune.subtree_groups(centernet.channel_groups(variables), "params/")
        names = list(groups)
    return prune.make_pruner(
        prune_rules(config, names),
        make_schedule(config),
        method=config.prune.method,
        score=config.prune.score,
        scope=config.prune.scope,
        n=config.prune.n,
        m=config.prune.m,
        norm=config.prune.norm,
        channel_groups=groups,
    )


def wrap_optimizer(
    optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict, variables: Any
) -> optax.GradientTransformation:
    """Adds the config's pruner to `optimizer`, so its state carries the masks."""
    pruner = make_pruner(config, variables)
    if pruner is None:
        return optimizer
    # Every score gets a key (scores other than 'random' ignore it), so a newly
    # registered score that samples has one.
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return prune.pruned_optimizer(optimizer, pruner, key=key)


def make_distill_spec(config: ml_collections.ConfigDict) -> DistillSpec:
    """The distillation terms of `config.distill` (raises ValueError on bad names or values)."""
    fields = {field.name for field in dataclasses.fields(DistillSpec)}
    return DistillSpec(**{name: config.distill[name] for name in sorted(fields)})


def default_quant_rules() -> tuple[tuple[str, Any], ...]:
    """Layers a detector quantizes by default: all but the first conv and the heatmap output.

    The first conv sees raw pixels and the heatmap's last conv sets the scores, so
    int8 detector recipes keep both in float.
    """
    return ((r"backbone/stem/conv", None), (r"heatmap/out", None), (r".*", True))


def make_quant_config(config: ml_collections.ConfigDict) -> quant.QuantConfig | None:
    """The `QuantConfig` of `config.quant` (None for mode 'none')."""
    if config.quant.mode == "none":
        return None
    rules = config.quant.rules
    return quant.QuantConfig(
        weight_bits=config.quant.weight_bits,
        activation_bits=config.quant.activation_bits,
        activation_symmetric=config.quant.activation_symmetric,
        observer=config.quant.observer,
        momentum=config.quant.momentum,
        freeze_observers_step=config.quant.freeze_observers_step,
        rules=default_quant_rules() if rules is None else tuple(tuple(rule) for rule in rules),
    )


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
    model takes on disk, as trained weights do not compress.
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
    report = prune.sparsity_report(variables["params"])
    return {
        "parameters": report["total"]["size"],
        "nonzeros": report["total"]["nonzeros"],
        "sparsity": report["total"]["sparsity"],
        **model_flops(model, variables, image_size),
        **save_and_measure(variables, directory),
    }


def shrink_channels(
    variables: Any, config: ml_collections.ConfigDict, num_classes: int
) -> tuple[nn.Module, Any, dict[str, int]]:
    """Builds the physically smaller model of a channel-masked one.

    Args:
      variables: {'params', 'batch_stats'} whose pruned channels are zero.
      config: the experiment config (model name and depthwise implementation).
      num_classes: heatmap channels.

    Returns:
      (model, variables, widths): the shrunk model, its sliced variables and the
      new width of every channel group (`config.model.channels` to rebuild it).
    """
    groups = centernet.channel_groups(variables)
    keep = prune.channel_keep_indices(variables, groups)
    widths = prune.group_widths(keep)
    model = create_model(
        config.model.name,
        num_classes=num_classes,
        depthwise_impl=config.model.depthwise_impl,
        channels=widths,
    )
    return model, prune.shrink_tree(variables, groups, keep), widths


def format_compression_table(summary: dict[str, Any]) -> str:
    """Markdown table of `train.compression_summary`: the model, shrunk and int8 forms."""
    lines = [
        "| model | AP | AP50 | parameters | non-zeros | sparsity | MFLOPs | MFLOPs non-zero "
        "| KiB raw arrays | KiB on disk, dense | KiB on disk, sparse |",
        "|---|" + "---:|" * 10,
    ]
    for name in ("model", "shrunk", "int8"):
        if name not in summary:
            continue
        row = summary[name]
        lines.append(
            f"| {name} | {100 * row['AP']:.1f} | {100 * row['AP50']:.1f} | {row['parameters']:,} "
            f"| {row['nonzeros']:,} | {100 * row['sparsity']:.1f}% | {row['flops'] / 1e6:.1f} "
            f"| {row['flops_nonzero'] / 1e6:.1f} | {row['bytes_raw'] / 1024:.0f} "
            f"| {row['bytes_dense'] / 1024:.0f} "
            f"| {row['bytes_sparse'] / 1024:.0f} |"
        )
    return "\n".join(lines)

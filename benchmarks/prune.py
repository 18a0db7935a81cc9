r"""What pruning costs in a train step and what channel shrinking buys, measured side by side.

Run:
  make bench     # runs this after benchmarks/efficiency.py
  python benchmarks/prune.py --repeats=5 --channel_fraction=0.5

For the student (batch 16, 128x128, this backend's default depthwise conv):
- the masked train step (`prune.pruned_optimizer`, 80% unstructured, steps between
  mask updates) over the dense one, the two timed alternately so that machine
  noise hits both alike (target: at most 1.03);
- the one-off cost of computing the masks of the whole detector (jitted, after
  its compile), layer-wise and global;
- a channel-pruned student shrunk to a smaller model: parameters, FLOPs, train
  step and forward time against the dense model.
Prints a table and writes benchmarks/prune.json.
"""

import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from common import NUM_CLASSES, alternate, median_ms, paired_ratio, seconds, synthetic_batch

from jaxcomp import flops, huge_pages, methods, prune, training
from jaxcomp.config import default_config
from jaxcomp.models import channel_groups, create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "centernet_student", "Model variant.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 9, "Timed steps per measurement (medians are reported).")
flags.DEFINE_float("sparsity", 0.8, "Unstructured sparsity of the masked step.")
flags.DEFINE_float("channel_fraction", 0.5, "Fraction of each channel group removed.")
flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "prune.json"), "JSON results."
)


def _step_runner(model, optimizer, mesh, batch, variables=None):
    """A closure that runs one train step on its own state and returns the seconds."""
    config = default_config()
    state = training.init_state(model, optimizer, FLAGS.image_size, 0, mesh, variables)
    step = training.jit_train_step(model, optimizer, dict(config.loss), mesh)
    holder = {"state": state}

    def run() -> float:
        start = time.perf_counter()
        holder["state"], metrics = step(holder["state"], batch, {})
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    return run


def masked_step_overhead(mesh, batch) -> dict:
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    dense_optimizer = training.make_optimizer(default_config().optim, 1000)
    schedule = prune.polynomial_schedule(FLAGS.sparsity, 0, 1000, 100)
    masked_optimizer = prune.pruned_optimizer(
        dense_optimizer, prune.make_pruner(FLAGS.sparsity, schedule)
    )
    # The untimed first call compiles and runs the pruner's first (mask-computing) update.
    times = alternate(
        {
            "dense": _step_runner(model, dense_optimizer, mesh, batch),
            "masked": _step_runner(model, masked_optimizer, mesh, batch),
        },
        FLAGS.repeats,
    )
    return {
        "unmasked_step_ms": median_ms(times["dense"]),
        "masked_step_ms": median_ms(times["masked"]),
        "masked_over_dense": paired_ratio(times["masked"], times["dense"]),
    }


def mask_computation_cost(variables) -> dict:
    params = variables["params"]
    rows = {}
    for scope in ("layer", "global"):
        make = jax.jit(lambda p, scope=scope: prune.magnitude_masks(p, FLAGS.sparsity, scope=scope))
        compile_seconds = seconds(make, params)
        rows[f"masks_{scope}_ms"] = median_ms([seconds(make, params) for _ in range(FLAGS.repeats)])
        rows[f"masks_{scope}_compile_s"] = compile_seconds
    return rows


def shrunk_model(mesh, batch, variables) -> dict:
    dense_model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    groups = channel_groups(variables)
    masks = prune.channel_group_masks(
        variables["params"],
        prune.subtree_groups(groups, "params/"),
        methods.default_prune_rules("channel", FLAGS.channel_fraction, list(groups)),
    )
    masked = {**variables, "params": prune.apply_masks(variables["params"], masks)}
    keep = prune.channel_keep_indices(masked, groups)
    small_variables = jax.device_get(prune.shrink_tree(masked, groups, keep))
    small_model = create_model(
        FLAGS.model, num_classes=NUM_CLASSES, channels=prune.group_widths(keep)
    )
    optimizer = training.make_optimizer(default_config().optim, 1000)
    models = {"dense": (dense_model, variables), "shrunk": (small_model, small_variables)}
    runners = {
        f"{name}_step": _step_runner(model, optimizer, mesh, batch, model_variables)
        for name, (model, model_variables) in models.items()
    }
    for name, (model, model_variables) in models.items():
        forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        runners[f"{name}_forward"] = functools.partial(
            seconds, forward, model_variables, batch["image"]
        )
    times = alternate(runners, FLAGS.repeats)
    rows = {}
    images = jax.ShapeDtypeStruct((1, FLAGS.image_size, FLAGS.image_size, 3), np.uint8)
    for name, (model, model_variables) in models.items():
        positions = flops.kernel_output_positions(model, model_variables, images, train=False)
        rows[f"{name}_parameters"] = int(
            sum(np.size(x) for x in jax.tree.leaves(model_variables["params"]))
        )
        rows[f"{name}_mflops"] = (
            flops.count_flops(model_variables["params"], positions)["total"] / 1e6
        )
        for kind in ("step", "forward"):
            rows[f"{name}_{kind}_ms"] = median_ms(times[f"{name}_{kind}"])
    for kind in ("step", "forward"):
        rows[f"shrunk_over_dense_{kind}"] = paired_ratio(
            times[f"shrunk_{kind}"], times[f"dense_{kind}"]
        )
    return rows


def main(argv):
    del argv
    # Measured as the command line trains: with huge pages for XLA's temporaries.
    huge_pages.restart_with_huge_pages()
    mesh = training.make_mesh()
    batch = training.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, training.TRAIN_FIELDS
    )
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    optimizer = training.make_optimizer(default_config().optim, 1000)
    state = training.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    results = {
        **masked_step_overhead(mesh, batch),
        **mask_computation_cost(variables),
        **shrunk_model(mesh, batch, variables),
    }
    print(
        f"\nbackend={jax.default_backend()} model={FLAGS.model} batch={FLAGS.batch_size} "
        f"image={FLAGS.image_size} repeats={FLAGS.repeats}"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print("| measurement | value |\n|---|---:|")
    print(f"| dense train step, ms (median) | {results['unmasked_step_ms']:.0f} |")
    print(
        f"| masked train step ({FLAGS.sparsity:.0%} unstructured), ms | "
        f"{results['masked_step_ms']:.0f} |"
    )
    print(f"| masked / dense step (median of paired ratios) | {results['masked_over_dense']:.3f} |")
    for scope in ("layer", "global"):
        print(
            f"| masks of the whole detector, {scope} ranking, ms (compile s) | "
            f"{results[f'masks_{scope}_ms']:.1f} ({results[f'masks_{scope}_compile_s']:.1f}) |"
        )
    print(
        f"| parameters dense / shrunk ({FLAGS.channel_fraction:.0%} of free channels) | "
        f"{results['dense_parameters']:,} / {results['shrunk_parameters']:,} |"
    )
    print(
        f"| MFLOPs per image dense / shrunk | {results['dense_mflops']:.1f} / "
        f"{results['shrunk_mflops']:.1f} |"
    )
    print(
        f"| train step ms dense / shrunk (ratio) | {results['dense_step_ms']:.0f} / "
        f"{results['shrunk_step_ms']:.0f} ({results['shrunk_over_dense_step']:.2f}) |"
    )
    print(
        f"| forward ms dense / shrunk (ratio) | {results['dense_forward_ms']:.1f} / "
        f"{results['shrunk_forward_ms']:.1f} ({results['shrunk_over_dense_forward']:.2f}) |"
    )
    with open(FLAGS.output, "w") as f:
        json.dump({"backend": jax.default_backend(), "model": FLAGS.model, **results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

r"""What pruning costs in a train step and what channel shrinking buys, measured side by side.

Run:
  make bench     # runs this after benchmarks/train_step.py
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

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags
from common import NUM_CLASSES, synthetic_batch

from jaxcomp import compress, flops, prune, train
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


def _timed(fn: Callable, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def _step_runner(model, optimizer, mesh, batch, variables=None):
    """A closure that runs one train step on its own state and returns the seconds."""
    config = default_config()
    state = train.init_state(model, optimizer, FLAGS.image_size, 0, mesh, variables)
    step = train.jit_train_step(model, optimizer, dict(config.loss), mesh)
    holder = {"state": state}

    def run() -> float:
        seconds, (holder["state"], _) = _timed(step, holder["state"], batch)
        return seconds

    run()  # compile, and the pruner's first (mask-computing) update
    return run


def masked_step_overhead(mesh, batch) -> dict:
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    dense_optimizer = train.make_optimizer(default_config().optim, 1000)
    schedule = prune.polynomial_schedule(FLAGS.sparsity, 0, 1000, 100)
    masked_optimizer = prune.pruned_optimizer(
        dense_optimizer, prune.make_pruner(FLAGS.sparsity, schedule)
    )
    dense = _step_runner(model, dense_optimizer, mesh, batch)
    masked = _step_runner(model, masked_optimizer, mesh, batch)
    dense_times, masked_times = [], []
    for _ in range(FLAGS.repeats):  # alternate, so that noise hits both alike
        dense_times.append(dense())
        masked_times.append(masked())
    ratios = np.array(masked_times) / np.array(dense_times)
    return {
        "unmasked_step_ms": 1000 * float(np.median(dense_times)),
        "masked_step_ms": 1000 * float(np.median(masked_times)),
        "masked_over_dense": float(np.median(ratios)),
    }


def mask_computation_cost(variables) -> dict:
    params = variables["params"]
    rows = {}
    for scope in ("layer", "global"):
        make = jax.jit(lambda p, scope=scope: prune.magnitude_masks(p, FLAGS.sparsity, scope=scope))
        compile_seconds, _ = _timed(make, params)
        times = [_timed(make, params)[0] for _ in range(FLAGS.repeats)]
        rows[f"masks_{scope}_ms"] = 1000 * float(np.median(times))
        rows[f"masks_{scope}_compile_s"] = compile_seconds
    return rows


def shrunk_model(mesh, batch, variables) -> dict:
    dense_model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    groups = channel_groups(variables)
    masks = prune.channel_group_masks(
        variables["params"],
        prune.subtree_groups(groups, "params/"),
        compress.default_prune_rules("channel", FLAGS.channel_fraction, list(groups)),
    )
    masked = {**variables, "params": prune.apply_masks(variables["params"], masks)}
    keep = prune.channel_keep_indices(masked, groups)
    small_variables = jax.device_get(prune.shrink_tree(masked, groups, keep))
    small_model = create_model(
        FLAGS.model, num_classes=NUM_CLASSES, channels=prune.group_widths(keep)
    )
    optimizer = train.make_optimizer(default_config().optim, 1000)
    rows = {}
    runners = {
        "dense": _step_runner(dense_model, optimizer, mesh, batch, variables),
        "shrunk": _step_runner(small_model, optimizer, mesh, batch, small_variables),
    }
    forwards = {
        "dense": (dense_model, variables),
        "shrunk": (small_model, small_variables),
    }
    step_times = {name: [] for name in runners}
    forward_times = {name: [] for name in runners}
    forward_fns = {
        name: jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
        for name, (model, _) in forwards.items()
    }
    for name, fn in forward_fns.items():
        _timed(fn, forwards[name][1], batch["image"])
    for _ in range(FLAGS.repeats):
        for name in runners:
            step_times[name].append(runners[name]())
            forward_times[name].append(
                _timed(forward_fns[name], forwards[name][1], batch["image"])[0]
            )
    images = jax.ShapeDtypeStruct((1, FLAGS.image_size, FLAGS.image_size, 3), np.uint8)
    for name, (model, model_variables) in forwards.items():
        positions = flops.kernel_output_positions(model, model_variables, images, train=False)
        rows[f"{name}_parameters"] = int(
            sum(np.size(x) for x in jax.tree.leaves(model_variables["params"]))
        )
        rows[f"{name}_mflops"] = (
            flops.count_flops(model_variables["params"], positions)["total"] / 1e6
        )
        rows[f"{name}_step_ms"] = 1000 * float(np.median(step_times[name]))
        rows[f"{name}_forward_ms"] = 1000 * float(np.median(forward_times[name]))
    rows["shrunk_over_dense_step"] = float(
        np.median(np.array(step_times["shrunk"]) / np.array(step_times["dense"]))
    )
    rows["shrunk_over_dense_forward"] = float(
        np.median(np.array(forward_times["shrunk"]) / np.array(forward_times["dense"]))
    )
    return rows


def main(argv):
    del argv
    mesh = train.make_mesh()
    batch = train.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, train.TRAIN_FIELDS
    )
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    optimizer = train.make_optimizer(default_config().optim, 1000)
    state = train.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    results = {
        **masked_step_overhead(mesh, batch),
        **mask_computation_cost(variables),
        **shrunk_model(mesh, batch, variables),
    }
    print(
        f"\nbackend={jax.default_backend()} model={FLAGS.model} batch={FLAGS.batch_size} "
        f"image={FLAGS.image_size} repeats={FLAGS.repeats}"
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

r"""Train-step throughput of teacher and student, and the depthwise implementations side by side.

Run:
  make bench     # = python benchmarks/train_step.py
  python benchmarks/train_step.py --models=centernet_student --impls=shifted --repeats=5

Prints a table (median step time over `--repeats` timed steps after one
compile step, images/s, compile seconds, and the speed-up of each depthwise
implementation over XLA's grouped conv) and writes benchmarks/train_step.json.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from common import NUM_CLASSES, synthetic_batch

from jaxcomp import train
from jaxcomp.config import default_config
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["centernet_student", "centernet_teacher"], "Model variants.")
flags.DEFINE_list("impls", ["shifted", "grouped"], "Depthwise implementations to compare.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 7, "Timed steps per measurement (the median is reported).")
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(__file__), "train_step.json"),
    "Where to write the JSON results.",
)


def measure(model_name: str, impl: str) -> dict:
    config = default_config()
    model = create_model(model_name, num_classes=NUM_CLASSES, depthwise_impl=impl)
    optimizer = train.make_optimizer(config.optim, 1000)
    mesh = train.make_mesh()
    state = train.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    step = train.jit_train_step(model, optimizer, dict(config.loss), mesh)
    batch = train.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, train.TRAIN_FIELDS
    )
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {
        "model": model_name,
        "impl": impl,
        "step_ms": 1000 * median,
        "images_per_second": FLAGS.batch_size / median,
        "first_step_seconds": compile_seconds,
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
    }


def main(argv):
    del argv
    rows = [measure(model, impl) for model in FLAGS.models for impl in FLAGS.impls]
    grouped = {row["model"]: row["step_ms"] for row in rows if row["impl"] == "grouped"}
    print(
        f"\nbackend={jax.default_backend()} devices={jax.device_count()} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size}"
    )
    print(
        "| model | depthwise | params | step ms (median) | images/s | first step s "
        "| speed-up vs grouped |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = grouped.get(row["model"], float("nan")) / row["step_ms"]
        row["speedup_vs_grouped"] = ratio
        print(
            f"| {row['model']} | {row['impl']} | {row['parameters']:,} | {row['step_ms']:.0f} "
            f"| {row['images_per_second']:.1f} | {row['first_step_seconds']:.1f} "
            f"| {ratio:.2f}x |"
        )
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "backend": jax.default_backend(),
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)

r"""The train step with and without glibc's huge pages for large allocations.

Run:
  python benchmarks/huge_pages.py
  python benchmarks/huge_pages.py --model=centernet_teacher --pairs=2

XLA:CPU allocates a program's temporaries afresh at every execution, and glibc maps
a block that large from the kernel and unmaps it when freed, so each step faults
it in again (`jaxcomp/huge_pages.py`). This runs the jitted train step back to back,
as training does, in child processes with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
and `=0`, alternated pair by pair, and reports per step: the median time, the
minor page faults and the user and kernel CPU time, with the paired time ratio.
Prints a markdown table and writes benchmarks/huge_pages.json.
"""

import json
import os
import resource
import time

import jax
import numpy as np
from absl import app, flags
from common import NUM_CLASSES, paired_ratio, run_json_child, synthetic_batch

from jaxcomp import huge_pages, training
from jaxcomp.config import default_config
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "centernet_student", "Model variant.")
flags.DEFINE_integer("steps", 25, "Timed train steps per process.")
flags.DEFINE_integer("pairs", 4, "Process pairs (with, without), alternated.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_bool("child", False, "Internal: time the step in this process, print JSON.")
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(__file__), "huge_pages.json"),
    "Where to write the JSON results.",
)

_MODES = {"huge pages": "1", "4 KB pages": "0"}


def time_steps() -> dict:
    """Per-step figures of `FLAGS.steps` back-to-back train steps in this process."""
    config = default_config()
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES, depthwise_impl="auto")
    optimizer = training.make_optimizer(config.optim, 1000)
    mesh = training.make_mesh()
    state = training.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    batch = training.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, training.TRAIN_FIELDS
    )
    step = training.jit_train_step(model, optimizer, dict(config.loss), mesh)
    compiled = step.lower(state, batch, {}).compile()
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_ms": float(np.median(seconds) * 1e3),
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / FLAGS.steps,
        "user_ms_per_step": (after.ru_utime - before.ru_utime) * 1e3 / FLAGS.steps,
        "kernel_ms_per_step": (after.ru_stime - before.ru_stime) * 1e3 / FLAGS.steps,
        "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
    }


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(time_steps()))
        return
    runs = {mode: [] for mode in _MODES}
    for _ in range(FLAGS.pairs):
        for mode, hugetlb in _MODES.items():
            runs[mode].append(
                run_json_child(__file__, "--child", huge_pages.with_hugetlb(os.environ, hugetlb))
            )
    print(
        f"\n{FLAGS.model}, batch {FLAGS.batch_size} at {FLAGS.image_size}, {FLAGS.steps} steps "
        f"per process, {FLAGS.pairs} alternated pairs; THP mode "
        f"{huge_pages.transparent_huge_pages_mode()}; temporaries "
        f"{runs['huge pages'][0]['temp_mb']:.0f} MB per step"
    )
    print("| pages | step ms (median) | page faults / step | user ms / step | kernel ms / step |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for mode, figures in runs.items():
        summary[mode] = {key: float(np.median([run[key] for run in figures])) for key in figures[0]}
        row = summary[mode]
        print(
            f"| {mode} | {row['step_ms']:.0f} | {row['faults_per_step']:.0f} | "
            f"{row['user_ms_per_step']:.0f} | {row['kernel_ms_per_step']:.0f} |"
        )
    ratio = paired_ratio(
        [run["step_ms"] for run in runs["huge pages"]],
        [run["step_ms"] for run in runs["4 KB pages"]],
    )
    print(f"step time, huge pages over 4 KB pages (median of paired ratios): {ratio:.2f}")
    with open(FLAGS.output, "w") as f:
        json.dump(
            {"model": FLAGS.model, "runs": runs, "summary": summary, "ratio": ratio}, f, indent=2
        )


if __name__ == "__main__":
    app.run(main)

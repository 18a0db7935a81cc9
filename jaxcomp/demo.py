r"""`make demo`: train teacher and student briefly, prune the student, print a table.

Example:
  python -m jaxcomp.demo --workdir=workdirs/demo

Each run resumes from its checkpoints in `workdir/<name>`, so an interrupted
demo picks up where it stopped, and a finished one is only re-evaluated.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from jaxcomp import train
from jaxcomp.config import load_config_file

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/demo", "Directory for the runs and demo.json.")
flags.DEFINE_string(
    "config", "configs/demo.py", "Config file taking 'teacher', 'student' or 'pruned'."
)
flags.DEFINE_integer("steps", None, "Override config.train.steps of every stage.")
flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/jaxcomp/xla",
    "Persistent XLA compilation cache ('' disables it); a second start skips the compiles.",
)

# Stages in order; each later one starts from the one before (`config.init_from`).
RUNS = ("teacher", "student", "pruned")
STARTS_FROM = {"pruned": "student"}
COLUMNS = ("AP", "AP50", "AP75", "AP_small", "AP_medium")


def format_demo_table(rows: dict[str, dict]) -> str:
    """Markdown table: AP columns in percent, then size, cost, throughput and wall time."""
    header = (
        "| model | " + " | ".join(COLUMNS) + " | params | non-zeros | KiB on disk (sparse) "
        "| MFLOPs (non-zero) | train images/s (mean) | minutes |"
    )
    lines = [header, "|---|" + "---:|" * (len(COLUMNS) + 6)]
    for name, row in rows.items():
        aps = " | ".join(
            "n/a" if np.isnan(row[column]) else f"{100 * row[column]:.1f}" for column in COLUMNS
        )
        lines.append(
            f"| {name} | {aps} | {row['params']:,} | {row['nonzeros']:,} "
            f"| {row['bytes_sparse'] / 1024:.0f} | {row['flops_nonzero'] / 1e6:.0f} "
            f"| {row['images_per_second']:.1f} | {row['minutes']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
    train.enable_compilation_cache(FLAGS.compilation_cache_dir)
    rows = {}
    for name in RUNS:
        config = load_config_file(f"{FLAGS.config}:{name}")
        if name in STARTS_FROM:
            config.init_from = os.path.join(FLAGS.workdir, STARTS_FROM[name])
        if FLAGS.steps:
            config.train.steps = FLAGS.steps
            config.optim.warmup_steps = min(config.optim.warmup_steps, FLAGS.steps // 4)
            if config.prune.end_step is not None:
                config.prune.end_step = max(1, min(config.prune.end_step, 2 * FLAGS.steps // 3))
                config.prune.frequency = max(1, min(config.prune.frequency, FLAGS.steps // 4))
        print(f"== {name}: {config.model.name}, {config.train.steps} steps ==", flush=True)
        start = time.perf_counter()
        result = train.train_and_evaluate(config, os.path.join(FLAGS.workdir, name))
        if result["preempted"]:
            print("Stopped; run `make demo` again to resume.")
            return
        rows[f"{name} ({config.model.name})"] = {
            **result["metrics"],
            **result["compression"]["model"],
            "params": result["params"],
            "images_per_second": result["images_per_second"],
            "minutes": (time.perf_counter() - start) / 60,
        }
    if jax.process_index() == 0:
        print(format_demo_table(rows))
        with open(os.path.join(FLAGS.workdir, "demo.json"), "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)

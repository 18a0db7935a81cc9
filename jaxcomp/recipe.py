r"""Runs a compression recipe: a chain of runs sharing a workdir, then one results table.

A recipe is a config file whose module declares the stages:

  STAGES = ("teacher", "student", "distilled", "pruned", "int8")
  INIT_FROM = {"pruned": "distilled", "int8": "pruned"}   # start from that stage's params
  TEACHER = {"distilled": "teacher", "pruned": "teacher", "int8": "teacher"}

and whose `get_config(stage)` returns each stage's config. Each stage trains in
`workdir/<stage>`; `config.init_from` and `config.distill.teacher` are pointed at
the sibling stages. A stage resumes from its checkpoints if interrupted, and a
finished one is only re-evaluated, so running the same command again continues
an interrupted recipe.

Examples:
  make demo      # = python -m jaxcomp.recipe --config=configs/demo.py --workdir=workdirs/demo
  make results   # = python -m jaxcomp.recipe --config=configs/compress.py \
                 #       --workdir=workdirs/compress --results_dir=results
"""

import importlib.util
import json
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from jaxcomp import cluster, huge_pages, report, training
from jaxcomp.config import load_config_file

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program, so that importing this module next to
    # jaxcomp.main (which owns --config too) does not clash.
    flags.DEFINE_string("config", "configs/demo.py", "Recipe config file (declares STAGES).")
    flags.DEFINE_string("workdir", "workdirs/demo", "One subdirectory per stage, and recipe.json.")
    flags.DEFINE_list("stages", None, "Run only these stages (default: all, in order).")
    flags.DEFINE_string(
        "results_dir", None, "Also write the table (markdown, JSON) and the plots here."
    )
    cluster.define_flags()
    flags.DEFINE_string(
        "compilation_cache_dir",
        "~/.cache/jaxcomp/xla",
        "Persistent XLA compilation cache ('' disables it); a second start skips the compiles.",
    )


def load_recipe(path: str) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """The STAGES, INIT_FROM and TEACHER a recipe config file declares.

    Raises:
      ValueError: the file declares no STAGES, or a dependency names an unknown or a
        later stage.
    """
    spec = importlib.util.spec_from_file_location("_jaxcomp_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stages = tuple(getattr(module, "STAGES", ()))
    if not stages:
        raise ValueError(f"{path} declares no STAGES; a recipe config lists its stages in order")
    init_from = dict(getattr(module, "INIT_FROM", {}))
    teacher = dict(getattr(module, "TEACHER", {}))
    for table_name, table in (("INIT_FROM", init_from), ("TEACHER", teacher)):
        for stage, source in table.items():
            if stage not in stages or source not in stages[: stages.index(stage)]:
                raise ValueError(
                    f"{path}: {table_name}[{stage!r}] = {source!r} must name a stage listed "
                    f"before {stage!r} in STAGES {stages}"
                )
    return stages, init_from, teacher


def stage_config(config_file: str, stage: str, workdir: str, init_from: dict, teacher: dict):
    """The config of `stage`, wired to its sibling stages under `workdir`."""
    config = load_config_file(f"{config_file}:{stage}")
    if stage in init_from:
        config.init_from = os.path.join(workdir, init_from[stage])
    if stage in teacher:
        config.distill.teacher = os.path.join(workdir, teacher[stage])
    return config


def result_row(stage: str, config, result: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One table row: accuracy, size and cost of the model a stage ends with.

    An int8 stage reports its int8 serving path and int8 export; a channel-pruned
    stage its shrunk model. The train step time is the median over the run's logged
    throughput (`metrics.jsonl`), so a finished stage that was only re-evaluated
    still reports how fast it trained.
    """
    compression = result["compression"]
    final = compression.get("int8") or compression.get("shrunk") or compression["model"]
    return {
        "stage": stage,
        "model": config.model.name,
        "AP": final["AP"],
        "AP50": final["AP50"],
        "parameters": final["parameters"],
        "nonzeros": final["nonzeros"],
        "sparsity": final["sparsity"],
        "bytes_on_disk": min(final["bytes_dense"], final["bytes_sparse"]),
        "flops": final["flops_nonzero"],
        "train_step_ms": _median_step_ms(run_dir, config.train.batch_size),
        "distilled": bool(config.distill.teacher),
        "prune": config.prune.method,
        "quant": config.quant.mode,
        "steps": result["step"],
    }


def _median_step_ms(run_dir: str, batch_size: int) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [json.loads(line).get("images_per_second") for line in f]
    rates = [rate for rate in rates if rate]
    return 1000 * batch_size / float(np.median(rates)) if rates else float("nan")


def format_recipe_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per stage; AP in percent, KiB on disk, MFLOPs counting non-zeros.

    The train step time is at the stage's batch size (configs set it; the demo's is 8).
    """
    lines = [
        "| stage | model | AP | AP50 | parameters | non-zeros | KiB on disk | MFLOPs "
        "| train step ms |",
        "|---|---|" + "---:|" * 7,
    ]
    for row in rows:
        lines.append(
            f"| {row['stage']} | {row['model']} | {100 * row['AP']:.1f} "
            f"| {100 * row['AP50']:.1f} | {row['parameters']:,} | {row['nonzeros']:,} "
            f"| {row['bytes_on_disk'] / 1024:.0f} | {row['flops'] / 1e6:.1f} "
            f"| {row['train_step_ms']:.0f} |"
        )
    return "\n".join(lines)


def run_recipe(
    config_file: str,
    workdir: str,
    stages: list[str] | None = None,
    results_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Runs (or resumes, or re-evaluates) each stage in order; returns their table rows.

    After each finished stage the table goes to `workdir/recipe.json` (and, with
    `results_dir`, the table and plots), so a recipe stopped after hours still has
    its results up to there. The table keeps the rows of stages finished by earlier
    calls, in the recipe's order, so stages can be run a few at a time.

    Args:
      config_file: the recipe config.
      workdir: stage workdirs go under it.
      stages: a subset to run, e.g. to redo one stage; stages they depend on must
        have finished already.
      results_dir: where `write_results` puts the table and plots, if anywhere.

    Returns:
      The rows of the stages that finished (an interrupted stage stops the recipe).
    """
    all_stages, init_from, teacher = load_recipe(config_file)
    unknown = sorted(set(stages or ()) - set(all_stages))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; {config_file} has {all_stages}")
    table_file = os.path.join(workdir, "recipe.json")
    # Rows of stages not run now (an earlier `--stages` run's) stay in the table.
    table = _read_rows(table_file)
    rows = []
    for stage in stages or all_stages:
        config = stage_config(config_file, stage, workdir, init_from, teacher)
        print(f"== {stage}: {config.model.name}, {config.train.steps} steps ==", flush=True)
        run_dir = os.path.join(workdir, stage)
        result = training.train_and_evaluate(config, run_dir)
        if result["preempted"]:
            print("Stopped; run the same command again to resume.", flush=True)
            break
        rows.append(result_row(stage, config, result, run_dir))
        table[stage] = rows[-1]
        if jax.process_index() == 0:
            ordered = [table[name] for name in all_stages if name in table]
            with open(table_file, "w") as f:
                json.dump(ordered, f, indent=2)
            if results_dir:
                write_results(ordered, workdir, results_dir)
    return rows


def _read_rows(table_file: str) -> dict[str, dict[str, Any]]:
    if not os.path.exists(table_file):
        return {}
    with open(table_file) as f:
        return {row["stage"]: row for row in json.load(f)}


def write_results(rows: list[dict[str, Any]], workdir: str, results_dir: str) -> None:
    """The table as markdown and JSON, and the plots, in `results_dir`."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(format_recipe_table(rows) + "\n")
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    report.plot_accuracy_vs_size(rows, os.path.join(results_dir, "ap_vs_bytes.png"))
    report.plot_accuracy_vs_sparsity(rows, os.path.join(results_dir, "ap_vs_sparsity.png"))
    curves = {
        row["stage"]: _training_curve(os.path.join(workdir, row["stage"]))
        for row in rows
        if row["prune"] == "none" and row["quant"] == "none" and row["stage"] != "teacher"
    }
    report.plot_training_curves(curves, os.path.join(results_dir, "training_curves.png"))


def _training_curve(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """(step, detection loss) and (step, eval AP50) pairs from a run's metrics.jsonl."""
    curve: dict[str, list[tuple[int, float]]] = {"loss": [], "AP50": []}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            # Distillation runs log the detection part separately from their total.
            loss = record.get("detection", record.get("total"))
            if loss is not None:
                curve["loss"].append((record["step"], loss))
            if np.isfinite(record.get("eval/AP50", np.nan)):
                curve["AP50"].append((record["step"], record["eval/AP50"]))
    return curve


def main(argv):
    del argv
    # Before anything else, as jaxcomp.main does (jaxcomp/huge_pages.py).
    huge_pages.restart_with_huge_pages()
    cluster.check_flags(FLAGS)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
    training.enable_compilation_cache(FLAGS.compilation_cache_dir)
    cluster.initialize(FLAGS)
    rows = run_recipe(FLAGS.config, FLAGS.workdir, FLAGS.stages, FLAGS.results_dir)
    if jax.process_index() != 0 or not rows:
        return
    print(format_recipe_table(rows))
    if FLAGS.results_dir:
        print(f"Wrote the table and plots to {FLAGS.results_dir}/")


if __name__ == "__main__":
    _define_flags()
    app.run(main)

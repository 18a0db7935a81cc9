r"""Runs a compression recipe: a chain of runs sharing a workdir, then one results table.

A recipe is a config file whose module declares the stages:

  STAGES = ("teacher", "student", "distilled", "pruned", "int8")
  INIT_FROM = {"pruned": "distilled", "int8": "pruned"}   # start from that stage's params
  TEACHER = {"distilled": "teacher", "pruned": "teacher", "int8": "teacher"}

  SEEDS = 3                                       # optional (default 1): runs per
  SEEDED_STAGES = ("teacher", "student", ...)     # stage listed here, seeds 0..SEEDS-1

and whose `get_config(stage)` returns each stage's config. Seed 0 of a stage trains
in `workdir/<stage>`, seed k > 0 in `workdir/<stage>_seed<k>` with `config.seed`
raised by k (another initialisation, data order and augmentation);
`config.init_from` and `config.distill.teacher` are pointed at the sibling stages'
runs of the same seed (seed 0 of a stage that is not repeated). All stages' seed 0
run first, so a complete one-seed table comes early. A run resumes from its
checkpoints if interrupted, and a finished one is only re-evaluated, so running the
same command again continues an interrupted recipe. With `--latency`, the finished
stages' models are then timed side by side in this process (`measure_latency`).

Examples:
  make demo      # = python -m jaxcomp.recipe --config=configs/demo.py --workdir=workdirs/demo
  make results   # = python -m jaxcomp.recipe --config=configs/compress.py \
                 #       --workdir=workdirs/compress --results_dir=results --latency
"""

import importlib.util
import json
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags, logging

from jaxcomp import cluster, huge_pages, latency, report, training
from jaxcomp.config import load_config_file
from jaxcomp.export import run as export_run

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
    flags.DEFINE_bool(
        "latency", False, "Then time every finished stage's model side by side (minutes)."
    )
    cluster.define_flags()
    flags.DEFINE_string(
        "compilation_cache_dir",
        "~/.cache/jaxcomp/xla",
        "Persistent XLA compilation cache ('' disables it); a second start skips the compiles.",
    )


class Recipe(NamedTuple):
    """What a recipe config file declares (see the module docstring)."""

    stages: tuple[str, ...]
    init_from: dict[str, str]
    teacher: dict[str, str]
    seeds: int = 1
    seeded_stages: tuple[str, ...] = ()

    def seeds_of(self, stage: str) -> int:
        """How many seeds of `stage` the recipe runs."""
        return self.seeds if stage in self.seeded_stages else 1


def load_recipe(path: str) -> Recipe:
    """The STAGES, INIT_FROM, TEACHER, SEEDS and SEEDED_STAGES a recipe config file declares.

    Raises:
      ValueError: the file declares no STAGES, a dependency names an unknown or a
        later stage, SEEDS is below 1, or SEEDED_STAGES names an unknown stage.
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
    seeds = getattr(module, "SEEDS", 1)
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"{path}: SEEDS must be an int >= 1, got {seeds!r}")
    seeded = tuple(getattr(module, "SEEDED_STAGES", ()))
    unknown = sorted(set(seeded) - set(stages))
    if unknown:
        raise ValueError(f"{path}: SEEDED_STAGES has {unknown}, which are not in STAGES {stages}")
    return Recipe(stages, init_from, teacher, seeds, seeded)


def run_dir(workdir: str, stage: str, seed: int = 0) -> str:
    """The workdir of one run: `workdir/<stage>` for seed 0, `workdir/<stage>_seed<k>` else."""
    return os.path.join(workdir, stage if seed == 0 else f"{stage}_seed{seed}")


def stage_config(config_file: str, stage: str, workdir: str, recipe: Recipe, seed: int = 0):
    """The config of seed `seed` of `stage`, wired to its sibling stages' runs under `workdir`.

    The seed shifts `config.seed`; a dependency repeated over seeds is taken at the same
    seed, one that is not at its only run.
    """
    config = load_config_file(f"{config_file}:{stage}")
    config.seed += seed

    def source(name: str) -> str:
        return run_dir(workdir, name, seed if seed < recipe.seeds_of(name) else 0)

    if stage in recipe.init_from:
        config.init_from = source(recipe.init_from[stage])
    if stage in recipe.teacher:
        config.distill.teacher = source(recipe.teacher[stage])
    return config


def result_row(
    stage: str,
    config,
    result: dict[str, Any],
    run_dir: str,
    seed: int = 0,
    starts_from: str | None = None,
) -> dict[str, Any]:
    """One run's row: accuracy, size three ways, cost and training budget of its final model.

    An int8 stage reports its int8 serving path and int8 export; a channel-pruned
    stage its shrunk model. Sizes: `bytes_on_disk` the packed export (the smaller of
    orbax dense and bitmask + non-zeros), `bytes_zstd`/`bytes_gzip` the packed content
    after an entropy coder, `bytes_orbax_dense` the model as a plain orbax checkpoint.
    The train step time is the median over the run's logged throughput
    (`metrics.jsonl`), so a finished stage that was only re-evaluated still reports
    how fast it trained.

    Args:
      stage: the row's name.
      config: the run's config.
      result: what `training.train_and_evaluate` returned.
      run_dir: the run's workdir.
      seed: which of the stage's seeds this run is.
      starts_from: the stage whose model it fine-tuned (default: the last part of
        `config.init_from`; '' for a run from scratch).
    """
    compression = result["compression"]
    final = compression.get("int8") or compression.get("shrunk") or compression["model"]
    if starts_from is None:
        starts_from = (
            os.path.basename(os.path.normpath(config.init_from)) if config.init_from else ""
        )
    return {
        "stage": stage,
        "seed": seed,
        "model": config.model.name,
        "AP": final["AP"],
        "AP50": final["AP50"],
        "parameters": final["parameters"],
        "nonzeros": final["nonzeros"],
        "sparsity": final["sparsity"],
        "bytes_on_disk": min(final["bytes_dense"], final["bytes_sparse"]),
        "bytes_zstd": final["bytes_zstd"],
        "bytes_gzip": final["bytes_gzip"],
        "bytes_orbax_dense": final["bytes_dense"],
        "flops": final["flops_nonzero"],
        "train_step_ms": _median_step_ms(run_dir, config.train.batch_size),
        "distilled": bool(config.distill.teacher),
        "prune": config.prune.method,
        "quant": config.quant.mode,
        "steps": result["step"],
        "starts_from": starts_from,
    }


def _median_step_ms(run_dir: str, batch_size: int) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rates = [json.loads(line).get("images_per_second") for line in f]
    rates = [rate for rate in rates if rate]
    return 1000 * batch_size / float(np.median(rates)) if rates else float("nan")


def aggregate_rows(
    rows: list[dict[str, Any]], seeds_wanted: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """One row per stage, in the order stages first appear: AP and AP50 over its seeds.

    AP and AP50 become the mean over the stage's runs, with `AP_std`/`AP50_std` their
    sample standard deviation (NaN for one run); the other fields (sizes, FLOPs,
    budget: the same for every seed up to a few bytes of coding) are its lowest seed's.

    Args:
      rows: per-run rows (`result_row`), any number per stage.
      seeds_wanted: stage -> the seeds the recipe asks for (default: as many as found).

    Returns:
      Rows with also 'seeds' (runs found) and 'seeds_wanted'.

    Example:
      >>> rows = [{"stage": "a", "seed": s, "AP": ap, "AP50": 0.5} for s, ap in
      ...         enumerate([0.2, 0.3])]
      >>> row, = aggregate_rows(rows, {"a": 3})
      >>> round(row["AP"], 3), round(row["AP_std"], 4), row["seeds"], row["seeds_wanted"]
      (0.25, 0.0707, 2, 3)
    """
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    aggregated = []
    for stage, runs in by_stage.items():
        runs = sorted(runs, key=lambda run: run.get("seed", 0))
        row = {**runs[0], "seeds": len(runs)}
        row["seeds_wanted"] = (seeds_wanted or {}).get(stage, len(runs))
        for metric in ("AP", "AP50"):
            values = np.array([run[metric] for run in runs], np.float64)
            row[metric] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        row.pop("seed", None)
        aggregated.append(row)
    return aggregated


def _percent(row: dict[str, Any], metric: str) -> str:
    std = row.get(f"{metric}_std", float("nan"))
    text = f"{100 * row[metric]:.1f}"
    return text if np.isnan(std) else f"{text} ± {100 * std:.1f}"


def _kib(row: dict[str, Any], key: str) -> str:
    # Rows written before a column existed (kept from earlier calls) show a dash.
    return f"{row[key] / 1024:.0f}" if key in row else "–"


def _budget(row: dict[str, Any]) -> str:
    if "starts_from" not in row:
        return f"{row['steps']}"
    return f"{row['steps']} from {row['starts_from'] or 'scratch'}"


def _seeds(row: dict[str, Any]) -> str:
    found, wanted = row["seeds"], row["seeds_wanted"]
    return f"{found}" if found >= wanted else f"{found} of {wanted}"


def format_recipe_table(
    rows: list[dict[str, Any]],
    seeds_wanted: dict[str, int] | None = None,
    timings: dict[str, dict[str, float]] | None = None,
) -> str:
    """Markdown: one row per stage, AP and AP50 as mean ± std over its seeds.

    Columns: seeds (`k of n` where fewer ran than the recipe asks for), budget (train
    steps, and the stage they start from), AP and AP50 in percent, parameters and
    non-zeros, KiB three ways (packed; packed then zstd -19 and gzip -9; plain orbax
    dense), MFLOPs counting non-zeros, the train step time at the stage's batch size
    and, with `timings`, inference milliseconds at batch 1 and 16 with the ratio to the
    reference stage's (`latency_reference`) in brackets.

    Args:
      rows: per-run rows (`result_row`); several runs of a stage are aggregated
        (`aggregate_rows`).
      seeds_wanted: stage -> the seeds the recipe asks for.
      timings: stage -> `latency.compare_latency` entry, for the stages timed.
    """
    header = (
        "| stage | model | seeds | budget (steps) | AP | AP50 | parameters | non-zeros "
        "| KiB packed | KiB zstd | KiB gzip | KiB orbax dense | MFLOPs | train step ms |"
    )
    stage_rows = aggregate_rows(rows, seeds_wanted)
    if timings:
        reference = latency_reference([row["stage"] for row in stage_rows])
        header += "".join(f" batch {batch} ms (x {reference}) |" for batch in (1, 16))
    lines = [header, "|---|---|" + "---:|" * (header.count("|") - 3)]
    for row in stage_rows:
        line = (
            f"| {row['stage']} | {row['model']} | {_seeds(row)} | {_budget(row)} "
            f"| {_percent(row, 'AP')} | {_percent(row, 'AP50')} | {row['parameters']:,} "
            f"| {row['nonzeros']:,} | {_kib(row, 'bytes_on_disk')} | {_kib(row, 'bytes_zstd')} "
            f"| {_kib(row, 'bytes_gzip')} | {_kib(row, 'bytes_orbax_dense')} "
            f"| {row['flops'] / 1e6:.1f} | {row['train_step_ms']:.0f} |"
        )
        if timings:
            timed = timings.get(row["stage"])
            for batch in (1, 16):
                line += (
                    f" {timed[f'ms_batch{batch}']:.1f} ({timed[f'ratio_batch{batch}']:.2f}) |"
                    if timed
                    else " – |"
                )
        lines.append(line)
    return "\n".join(lines)


def latency_reference(stages: list[str]) -> str:
    """The stage latencies are divided by: the float student if the recipe has one."""
    return "student" if "student" in stages else stages[0]


def measure_latency(
    workdir: str, stages: list[str], batch_sizes: tuple[int, ...] = (1, 16), repeats: int = 9
) -> dict[str, dict[str, float]]:
    """Times the served model of each stage's seed-0 run, all alternated in this process.

    Writes `workdir/latency.json` (the table, the reference stage, the date).

    Returns:
      stage -> `latency.compare_latency` entry, ratios to `latency_reference(stages)`.
    """
    runs = {stage: export_run.load_run(run_dir(workdir, stage)) for stage in stages}
    sizes = {int(run.config.data.image_size) for run in runs.values()}
    if len(sizes) != 1:
        raise ValueError(f"the stages' image sizes differ ({sorted(sizes)}); time them apart")
    reference = latency_reference(stages)
    table = latency.compare_latency(
        {stage: latency.serving_forward(run) for stage, run in runs.items()},
        reference,
        sizes.pop(),
        batch_sizes,
        repeats,
    )
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "latency.json"), "w") as f:
            record = {"reference": reference, "date": time.strftime("%Y-%m-%d"), "stages": table}
            json.dump(record, f, indent=2)
    return table


def _read_latency(workdir: str) -> dict[str, dict[str, float]] | None:
    path = os.path.join(workdir, "latency.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["stages"]


def run_recipe(
    config_file: str,
    workdir: str,
    stages: list[str] | None = None,
    results_dir: str | None = None,
    measure: bool = False,
) -> list[dict[str, Any]]:
    """Runs (or resumes, or re-evaluates) each stage's seeds in order; returns their rows.

    Seed 0 of every stage runs first, then seed 1 of the repeated ones, and so on.
    After each finished run the per-run rows go to `workdir/recipe.json` (and, with
    `results_dir`, the table and plots), so a recipe stopped after hours still has
    its results up to there. The table keeps the rows of runs finished by earlier
    calls, in the recipe's order, so stages can be run a few at a time.

    Args:
      config_file: the recipe config.
      workdir: run workdirs go under it (`run_dir`).
      stages: a subset to run, e.g. to redo one stage; stages they depend on must
        have finished already.
      results_dir: where `write_results` puts the table and plots, if anywhere.
      measure: once every run has finished, time the models of all finished stages
        side by side (`measure_latency`); else the table shows the latencies of an
        earlier call's `workdir/latency.json`, if any.

    Returns:
      The rows of the runs that finished (an interrupted run stops the recipe).
    """
    recipe = load_recipe(config_file)
    unknown = sorted(set(stages or ()) - set(recipe.stages))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; {config_file} has {recipe.stages}")
    table_file = os.path.join(workdir, "recipe.json")
    # Rows of runs not made now (an earlier `--stages` call's) stay in the table.
    table = _read_rows(table_file)
    timed = _read_latency(workdir)
    wanted = {stage: recipe.seeds_of(stage) for stage in recipe.stages}
    runs = [
        (stage, seed)
        for seed in range(recipe.seeds)
        for stage in stages or recipe.stages
        if seed < wanted[stage]
    ]
    rows, preempted = [], False
    for stage, seed in runs:
        config = stage_config(config_file, stage, workdir, recipe, seed)
        print(
            f"== {stage}, seed {seed}: {config.model.name}, {config.train.steps} steps ==",
            flush=True,
        )
        result = training.train_and_evaluate(config, run_dir(workdir, stage, seed))
        if result["preempted"]:
            print("Stopped; run the same command again to resume.", flush=True)
            preempted = True
            break
        row = result_row(
            stage,
            config,
            result,
            run_dir(workdir, stage, seed),
            seed,
            starts_from=recipe.init_from.get(stage, ""),
        )
        rows.append(row)
        table[stage, seed] = row
        if jax.process_index() == 0:
            _write_rows(table_file, table, recipe.stages)
            if results_dir:
                write_results(_ordered(table, recipe.stages), workdir, results_dir, wanted, timed)
    if measure and not preempted:
        finished = list(dict.fromkeys(row["stage"] for row in _ordered(table, recipe.stages)))
        timed = measure_latency(workdir, finished)
        if jax.process_index() == 0 and results_dir:
            write_results(_ordered(table, recipe.stages), workdir, results_dir, wanted, timed)
    return rows


def _read_rows(table_file: str) -> dict[tuple[str, int], dict[str, Any]]:
    if not os.path.exists(table_file):
        return {}
    with open(table_file) as f:
        return {(row["stage"], row.get("seed", 0)): row for row in json.load(f)}


def _ordered(table: dict[tuple[str, int], dict], stages: tuple[str, ...]) -> list[dict]:
    # A row of a stage the recipe no longer has is left out.
    keys = [key for key in table if key[0] in stages]
    return [table[key] for key in sorted(keys, key=lambda key: (stages.index(key[0]), key[1]))]


def _write_rows(table_file: str, table: dict, stages: tuple[str, ...]) -> None:
    with open(table_file, "w") as f:
        json.dump(_ordered(table, stages), f, indent=2)


def write_results(
    rows: list[dict[str, Any]],
    workdir: str,
    results_dir: str,
    seeds_wanted: dict[str, int] | None = None,
    timings: dict[str, dict[str, float]] | None = None,
) -> None:
    """The table as markdown and JSON (per run and per stage), and the plots, in `results_dir`.

    `results.json` holds {'runs': per-run rows, 'stages': `aggregate_rows` with the
    latency entries merged in}.
    """
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(format_recipe_table(rows, seeds_wanted, timings) + "\n")
    stages = [
        {**row, **((timings or {}).get(row["stage"]) or {})}
        for row in aggregate_rows(rows, seeds_wanted)
    ]
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump({"runs": rows, "stages": stages}, f, indent=2)
    report.plot_pareto(stages, os.path.join(results_dir, "ap_vs_bytes.png"), "bytes_on_disk")
    report.plot_pareto(stages, os.path.join(results_dir, "ap_vs_flops.png"), "flops")
    report.plot_accuracy_vs_sparsity(stages, os.path.join(results_dir, "ap_vs_sparsity.png"))
    curves = {
        row["stage"]: _training_curve(os.path.join(workdir, row["stage"]))
        for row in stages
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
    cluster.initialize(FLAGS)
    training.enable_compilation_cache(FLAGS.compilation_cache_dir)
    rows = run_recipe(
        FLAGS.config, FLAGS.workdir, FLAGS.stages, FLAGS.results_dir, measure=FLAGS.latency
    )
    if jax.process_index() != 0 or not rows:
        return
    print(format_recipe_table(rows))
    if FLAGS.results_dir:
        print(f"Wrote the table and plots to {FLAGS.results_dir}/")


if __name__ == "__main__":
    _define_flags()
    app.run(main)

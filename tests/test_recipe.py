"""The recipe runner (teacher -> distilled -> pruned + int8) on the tiny model, and its plots."""

import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcomp import latency, recipe, report
from jaxcomp.config import load_config_file
from jaxcomp.training.export import save_and_measure

RECIPE = """
from jaxcomp.config import default_config

STAGES = ("teacher", "int8")
TEACHER = {{"int8": "teacher"}}
SEEDS = 2
SEEDED_STAGES = ("int8",)


def get_config(stage):
    config = default_config()
    config.data.name = "jaxcomp_embedded/tiny"
    config.data.data_dir = {data_dir!r}
    config.data.image_size = 64
    config.data.max_objects = 8
    config.data.num_workers = 0
    config.model.name = "centernet_tiny"
    # A narrower teacher head, so the feature term needs the 1x1 adapter.
    config.distill.teacher_model = "centernet_tiny"
    config.distill.teacher_channels = (("heatmap/hidden", 8),)
    config.distill.feature_layers = (("heatmap/conv", 1.0),)
    config.train.steps = 2
    config.train.batch_size = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 1
    config.eval.batch_size = 16
    config.eval.top_k = 20
    if stage == "teacher":
        config.model.channels = config.distill.teacher_channels
    if stage == "int8":
        config.prune.method = "unstructured"
        config.prune.sparsity = 0.5
        config.prune.schedule = "one_shot"
        config.prune.end_step = 1
        config.quant.mode = "qat"
    return config
"""


# Two stages (the second over two seeds) with distillation, pruning, QAT, int8
# conversion, a re-evaluation and the latency pass: minutes of compiling on 2 cores,
# so `make test-all` runs it.
@pytest.mark.slow
def test_recipe_chains_stages_and_writes_table_and_plots(tiny_data_dir, tmp_path):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(RECIPE.format(data_dir=tiny_data_dir))
    workdir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    rows = recipe.run_recipe(str(config_file), workdir, results_dir=results, measure=True)
    assert [(row["stage"], row["seed"]) for row in rows] == [
        ("teacher", 0),
        ("int8", 0),
        ("int8", 1),
    ]
    # Seed 1 of int8 is its own run with its own seed, taught by the teacher's only run.
    saved = json.load(open(os.path.join(workdir, "int8_seed1", "config.json")))
    assert saved["seed"] == 1 and saved["distill"]["teacher"] == os.path.join(workdir, "teacher")
    int8 = rows[1]
    assert int8["starts_from"] == "" and int8["steps"] == 2
    assert 0 < int8["bytes_zstd"] < int8["bytes_on_disk"] <= int8["bytes_orbax_dense"]
    assert int8["distilled"] and int8["quant"] == "qat" and int8["prune"] == "unstructured"
    # The int8 row reports the int8 export, smaller than the float teacher's.
    assert int8["bytes_on_disk"] < rows[0]["bytes_on_disk"] / 2
    assert int8["nonzeros"] < int8["parameters"]
    saved = json.load(open(os.path.join(workdir, "int8", "config.json")))
    assert saved["distill"]["teacher"] == os.path.join(workdir, "teacher")
    lines = [json.loads(line) for line in open(os.path.join(workdir, "int8", "metrics.jsonl"))]
    assert lines[0]["distill_feature"] > 0 and "detection" in lines[0]
    # The adapter is checkpointed with the student as the distillation method's parameter,
    # nested by the layer it projects; the student's params hold none of it (the same tree
    # as the teacher's, which differs only in widths).
    saved = {}
    for stage in ("teacher", "int8"):
        with ocp.CheckpointManager(os.path.join(workdir, stage, "checkpoints")) as manager:
            saved[stage] = manager.restore(2, args=ocp.args.StandardRestore())
    adapter = saved["int8"]["method_params"]["distill"]["heatmap"]["conv"]
    assert adapter["kernel"].shape == (16, 8) and adapter["bias"].shape == (8,)
    assert jax.tree.structure(saved["int8"]["params"]) == jax.tree.structure(
        saved["teacher"]["params"]
    )

    assert json.load(open(os.path.join(workdir, "recipe.json"))) == json.loads(json.dumps(rows))
    assert rows[0]["train_step_ms"] > 0
    table = open(os.path.join(results, "results.md")).read()
    assert table.count("\n") == 2 + 2 and "| int8 | centernet_tiny | 2 | 2 from scratch |" in table
    assert "batch 16 ms (x teacher)" in table
    written = json.load(open(os.path.join(results, "results.json")))
    assert written["runs"] == json.loads(json.dumps(rows))
    int8_stage = written["stages"][1]
    assert int8_stage["seeds"] == 2 and int8_stage["ms_batch16"] > int8_stage["ms_batch1"] > 0
    assert written["stages"][0]["ratio_batch1"] == 1.0
    for plot in ("ap_vs_bytes.png", "ap_vs_flops.png", "ap_vs_sparsity.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(results, plot)) > 5000, plot
    # Run again, a finished stage is re-evaluated (and re-exported), not trained again: the
    # same pruned weights (AP, ~0 after 2 steps, could not tell a fresh model apart).
    again = recipe.run_recipe(str(config_file), workdir, stages=["int8"])
    assert again[0]["steps"] == 2 and again[0]["nonzeros"] == int8["nonzeros"]
    # The teacher's row, not run this time, stays in the table.
    table = json.load(open(os.path.join(workdir, "recipe.json")))
    assert [(row["stage"], row["seed"]) for row in table] == [
        ("teacher", 0),
        ("int8", 0),
        ("int8", 1),
    ]


def test_recipe_declarations_are_checked(tmp_path):
    config_file = tmp_path / "bad.py"
    config_file.write_text('STAGES = ("a", "b")\nTEACHER = {"a": "b"}\n')
    with pytest.raises(ValueError, match=r"TEACHER\['a'\] = 'b' must name a stage listed before"):
        recipe.load_recipe(str(config_file))
    config_file.write_text("X = 1\n")
    with pytest.raises(ValueError, match="declares no STAGES"):
        recipe.load_recipe(str(config_file))
    config_file.write_text('STAGES = ("a",)\nSEEDED_STAGES = ("b",)\n')
    with pytest.raises(ValueError, match=r"SEEDED_STAGES has \['b'\]"):
        recipe.load_recipe(str(config_file))
    config_file.write_text('STAGES = ("a",)\nSEEDS = 0\n')
    with pytest.raises(ValueError, match="SEEDS must be an int >= 1, got 0"):
        recipe.load_recipe(str(config_file))
    compress = recipe.load_recipe("configs/compress.py")
    assert compress.stages[:5] == ("teacher", "student", "distilled", "finetuned", "pruned")
    assert compress.init_from["int8"] == "distilled" and compress.teacher["int8"] == "teacher"
    assert compress.seeds_of("distilled_w025") == 3 and compress.seeds_of("pruned_50") == 1
    assert recipe.load_recipe("configs/demo.py").seeds_of("distilled") == 1


def test_compressed_stages_and_their_dense_control_share_one_budget_from_the_distilled_student():
    compress = recipe.load_recipe("configs/compress.py")
    budgets = {}
    for stage in compress.stages:
        config = recipe.stage_config("configs/compress.py", stage, "runs", compress)
        if stage in compress.init_from:
            budgets[stage] = (config.train.steps, config.init_from, config.optim.learning_rate)
    assert set(budgets) >= {"finetuned", "pruned", "int8", "int8_90", "int8_channels"}
    assert set(budgets.values()) == {(2000, os.path.join("runs", "distilled"), 2e-3)}


def test_recipe_without_a_teacher_compresses_the_student_alone_on_the_same_budget():
    alone = recipe.load_recipe("configs/compress_alone.py")
    assert alone.teacher == {} and set(alone.seeded_stages) == set(alone.stages)
    for stage in alone.init_from:
        config = recipe.stage_config("configs/compress_alone.py", stage, "runs", alone, seed=1)
        same_stage = load_config_file(f"configs/compress.py:{stage}")
        assert config.init_from == os.path.join("runs", "student_seed1")
        assert config.distill.teacher == "" and config.seed == same_stage.seed + 1
        for field in ("train", "optim", "prune", "quant"):
            assert config[field].to_dict() == same_stage[field].to_dict(), field


def test_seed_k_runs_from_the_seed_k_runs_it_depends_on(tmp_path):
    config_file = tmp_path / "seeds.py"
    config_file.write_text(
        "from jaxcomp.config import default_config\n"
        'STAGES = ("teacher", "once", "student")\n'
        'INIT_FROM = {"student": "once"}\n'
        'TEACHER = {"student": "teacher"}\n'
        "SEEDS = 3\n"
        'SEEDED_STAGES = ("teacher", "student")\n'
        "def get_config(stage):\n"
        "    return default_config()\n"
    )
    declared = recipe.load_recipe(str(config_file))
    config = recipe.stage_config(str(config_file), "student", "runs", declared, seed=2)
    assert config.seed == 2
    # A seeded dependency at the same seed, one run only once at its only run.
    assert config.distill.teacher == os.path.join("runs", "teacher_seed2")
    assert config.init_from == os.path.join("runs", "once")
    assert recipe.run_dir("runs", "student", 0) == os.path.join("runs", "student")


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.30), (50, 0.25), (60, 0.20), (10, 0.05), (200, 0.29)]
    assert report.pareto_front(points) == [(10, 0.05), (50, 0.25), (100, 0.30)]


def _row(stage, seed, ap, **fields):
    return {
        "stage": stage,
        "seed": seed,
        "model": "centernet_student",
        "AP": ap,
        "AP50": ap + 0.15,
        "parameters": 526_354,
        "nonzeros": 149_113,
        "sparsity": 0.72,
        "bytes_on_disk": 302_080,
        "bytes_zstd": 251_904,
        "bytes_gzip": 262_144,
        "bytes_orbax_dense": 1_163_264,
        "flops": 34.8e6,
        "train_step_ms": 190.0,
        "distilled": True,
        "prune": "unstructured",
        "quant": "qat",
        "steps": 2000,
        "starts_from": "distilled",
        **fields,
    }


ROWS = [
    _row("student", 0, 0.19, prune="none", quant="none", distilled=False, steps=3000,
         starts_from="", nonzeros=526_354, bytes_on_disk=2_078_720, bytes_zstd=1_921_000,
         bytes_gzip=1_937_000, bytes_orbax_dense=2_078_720, flops=103.0e6),
    _row("student", 1, 0.20, prune="none", quant="none", distilled=False, steps=3000,
         starts_from="", nonzeros=526_354, bytes_on_disk=2_078_720, bytes_zstd=1_921_000,
         bytes_gzip=1_937_000, bytes_orbax_dense=2_078_720, flops=103.0e6),
    _row("student", 2, 0.18, prune="none", quant="none", distilled=False, steps=3000,
         starts_from="", nonzeros=526_354, bytes_on_disk=2_078_720, bytes_zstd=1_921_000,
         bytes_gzip=1_937_000, bytes_orbax_dense=2_078_720, flops=103.0e6),
    _row("int8", 0, 0.17),
    _row("int8", 1, 0.16),
]  # fmt: skip


def test_aggregate_rows_mean_and_std_over_seeds_and_count_missing_ones():
    student, int8 = recipe.aggregate_rows(ROWS, {"student": 3, "int8": 3})
    assert student["stage"] == "student" and "seed" not in student
    assert student["AP"] == pytest.approx(0.19) and student["AP_std"] == pytest.approx(0.01)
    assert student["AP50"] == pytest.approx(0.34) and student["AP50_std"] == pytest.approx(0.01)
    assert (student["seeds"], student["seeds_wanted"]) == (3, 3)
    assert int8["AP"] == pytest.approx(0.165) and int8["AP_std"] == pytest.approx(0.00707, 1e-3)
    assert (int8["seeds"], int8["seeds_wanted"]) == (2, 3)
    # One run: no spread to report.
    (single,) = recipe.aggregate_rows(ROWS[3:4])
    assert math.isnan(single["AP_std"]) and single["seeds"] == single["seeds_wanted"] == 1


def test_table_shows_spread_seeds_budget_bytes_and_latency():
    timings = {
        "student": {
            "ms_batch1": 8.2,
            "ratio_batch1": 1.0,
            "ms_batch16": 61.0,
            "ratio_batch16": 1.0,
        },
        "int8": {"ms_batch1": 11.5, "ratio_batch1": 1.4, "ms_batch16": 92.3, "ratio_batch16": 1.51},
    }
    table = recipe.format_recipe_table(ROWS, {"student": 3, "int8": 3}, timings)
    print(table)
    header, rule, student, int8 = table.splitlines()
    assert header.count("|") == rule.count("|") == student.count("|") == int8.count("|")
    assert "KiB packed | KiB zstd | KiB gzip | KiB orbax dense" in header
    assert "batch 1 ms (x student) | batch 16 ms (x student) |" in header
    assert student.startswith("| student | centernet_student | 3 | 3000 from scratch | 19.0 ± 1.0 ")
    assert int8.startswith(
        "| int8 | centernet_student | 2 of 3 | 2000 from distilled | 16.5 ± 0.7 "
    )
    assert "| 295 | 246 | 256 | 1136 | 34.8 | 190 | 11.5 (1.40) | 92.3 (1.51) |" in int8
    assert "| 2030 | 1876 | 1892 | 2030 | 103.0 |" in student
    # Without timings there are no latency columns; a row from before the byte columns
    # existed shows dashes, one run no spread.
    old = {key: value for key, value in ROWS[3].items() if key != "bytes_zstd"}
    (line,) = recipe.format_recipe_table([old]).splitlines()[2:]
    assert "| 1 | 2000 from distilled | 17.0 | 32.0 |" in line and "| – |" in line
    assert line.endswith("| 190 |")


def test_entropy_coding_shrinks_the_packed_bytes_of_a_sparse_model(tmp_path):
    rng = np.random.default_rng(0)
    kernel = rng.integers(-127, 128, (3, 3, 64, 128), dtype=np.int8)
    kernel[rng.random(kernel.shape) < 0.8] = 0
    measured = save_and_measure({"conv": {"kernel": kernel}}, str(tmp_path))
    packed = min(measured["bytes_dense"], measured["bytes_sparse"])
    assert 0 < measured["bytes_zstd"] < packed < measured["bytes_dense"]
    assert 0 < measured["bytes_gzip"] < packed
    print({key: value for key, value in measured.items()})


def test_compare_latency_alternates_and_divides_by_the_reference():
    small = jax.jit(lambda w, x: x.astype(np.float32) * w)
    big = jax.jit(lambda w, x: jax.numpy.tile(x.astype(np.float32), (1, 4, 4, 1)).sum() * w)
    table = latency.compare_latency(
        {"small": (small, 2.0), "big": (big, 3.0)}, "small", 64, (1, 4), 3
    )
    assert set(table["big"]) == {"ms_batch1", "ratio_batch1", "ms_batch4", "ratio_batch4"}
    assert table["small"]["ratio_batch4"] == 1.0 and table["big"]["ms_batch4"] > 0
    with pytest.raises(ValueError, match="reference 'other' is not one of"):
        latency.compare_latency({"small": (small, 2.0)}, "other", 64)


def test_pareto_plots_take_seed_spread_and_dense_baselines(tmp_path):
    stages = recipe.aggregate_rows(ROWS, {"student": 3, "int8": 3})
    for cost in ("bytes_on_disk", "flops"):
        path = str(tmp_path / f"{cost}.png")
        report.plot_pareto(stages, path, cost)
        assert os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="cost must be one of"):
        report.plot_pareto(stages, str(tmp_path / "x.png"), "latency")

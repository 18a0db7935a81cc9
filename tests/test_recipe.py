"""The recipe runner (teacher -> distilled -> pruned + int8) on the tiny model, and its plots."""

import json
import os

import jax
import orbax.checkpoint as ocp
import pytest

from jaxcomp import recipe, report

RECIPE = """
from jaxcomp.config import default_config

STAGES = ("teacher", "int8")
TEACHER = {{"int8": "teacher"}}


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


# Two stages with distillation, pruning, QAT, int8 conversion and a re-evaluation:
# about 2.5 minutes of compiling on 2 cores, so `make test-all` runs it.
@pytest.mark.slow
def test_recipe_chains_stages_and_writes_table_and_plots(tiny_data_dir, tmp_path):
    config_file = tmp_path / "recipe.py"
    config_file.write_text(RECIPE.format(data_dir=tiny_data_dir))
    workdir, results = str(tmp_path / "runs"), str(tmp_path / "results")
    rows = recipe.run_recipe(str(config_file), workdir, results_dir=results)
    assert [row["stage"] for row in rows] == ["teacher", "int8"]
    int8 = rows[-1]
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
    assert table.count("\n") == 2 + len(rows) and "| int8 | centernet_tiny |" in table
    assert json.load(open(os.path.join(results, "results.json"))) == json.loads(json.dumps(rows))
    for plot in ("ap_vs_bytes.png", "ap_vs_sparsity.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(results, plot)) > 5000, plot
    # Run again, a finished stage is re-evaluated (and re-exported), not trained again: the
    # same pruned weights (AP, ~0 after 2 steps, could not tell a fresh model apart).
    again = recipe.run_recipe(str(config_file), workdir, stages=["int8"])
    assert again[0]["steps"] == 2 and again[0]["nonzeros"] == int8["nonzeros"]
    # The teacher's row, not run this time, stays in the table.
    table = json.load(open(os.path.join(workdir, "recipe.json")))
    assert [row["stage"] for row in table] == ["teacher", "int8"]


def test_recipe_declarations_are_checked(tmp_path):
    config_file = tmp_path / "bad.py"
    config_file.write_text('STAGES = ("a", "b")\nTEACHER = {"a": "b"}\n')
    with pytest.raises(ValueError, match=r"TEACHER\['a'\] = 'b' must name a stage listed before"):
        recipe.load_recipe(str(config_file))
    config_file.write_text("X = 1\n")
    with pytest.raises(ValueError, match="declares no STAGES"):
        recipe.load_recipe(str(config_file))
    stages, init_from, teacher = recipe.load_recipe("configs/compress.py")
    assert stages[:5] == ("teacher", "student", "distilled", "pruned", "int8")
    assert init_from["int8"] == "pruned" and teacher["int8"] == "teacher"


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.30), (50, 0.25), (60, 0.20), (10, 0.05), (200, 0.29)]
    assert report.pareto_front(points) == [(10, 0.05), (50, 0.25), (100, 0.30)]

"""benchmarks/accelerator.py runs end to end on CPU, small, and writes every row it prints."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The child compiles four train steps: 4.6 minutes on 2 shared, busy cores.
@pytest.mark.slow
def test_every_variant_gets_a_finite_time_and_a_ratio(tiny_data_dir, tmp_path):
    output = tmp_path / "accelerator.json"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "accelerator.py"),
        "--models=centernet_tiny",
        "--distill_teacher=centernet_tiny",
        "--batch_size=2",
        "--image_size=64",
        "--steps=2",
        "--config.data.name=jaxcomp_embedded/tiny",
        f"--config.data.data_dir={tiny_data_dir}",
        "--config.data.max_objects=8",
        f"--output={output}",
    ]
    environ = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["backend"] == "cpu"
    rows = {row["variant"]: row for row in report["rows"]}
    assert sorted(rows) == ["bfloat16", "distill", "float32", "qat"]
    for variant, row in rows.items():
        assert row["model"] == "centernet_tiny"
        assert len(row["step_ms_each"]) == 2
        for key in ("step_ms", "images_per_second", "compile_seconds", "step_over_float32"):
            assert math.isfinite(row[key]) and row[key] > 0, (variant, key, row[key])
        # The CPU's peak is not known, so neither is the utilisation.
        assert row["mfu"] is None
        assert f"| centernet_tiny | {variant} |" in result.stdout
    assert rows["float32"]["step_over_float32"] == 1.0
    # Distillation adds the teacher's forward pass to the model FLOPs of a step.
    assert (
        rows["distill"]["train_step_flops_per_image"]
        == 4 * rows["float32"]["forward_flops_per_image"]
    )

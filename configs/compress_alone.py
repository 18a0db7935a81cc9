r"""The recipe without a teacher: compressing the student against training a smaller one.

The stages of configs/compress.py that need no teacher, 3 seeds each: the dense
students of four widths trained alone, and the student pruned and quantized. Every
compressed stage has configs/compress.py's budget (FINETUNE_STEPS = 2000 steps, its
optimizer, sparsity and QAT schedule) but starts from the student trained alone of its
seed and does not distill. It is the part of the recipe that fits a few hours on 2 CPU
cores, and it answers the question the teacher does not enter: does compressing the
student beat training a smaller dense student for the same number of steps?

Command (resumable stage by stage, like `make results`):
  make results-alone   # = python -m jaxcomp.recipe --config=configs/compress_alone.py \
                       #       --workdir=workdirs/compress_alone \
                       #       --results_dir=results/alone --latency
Stages (seed k in workdirs/compress_alone/<stage>_seed<k>; see configs/compress.py):
  student, student_w025, student_w035, student_w075
                    dense students x0.5, x0.25, x0.35, x0.75, 3000 steps each
  finetuned         the student trained FINETUNE_STEPS more steps, dense: what the
                    compressed stages' extra steps alone buy
  pruned, pruned_90 80% / 90% LAMP-allocated magnitude pruning
  int8_90           90% pruning and int8 QAT in one run (the candidate >= 10x smaller)
  int8_channels     50% of the channels, shrunk, and int8 QAT in one run

Expected: results/alone/results.md and its plots (docs/results.md quotes them).
"""

import os

from jaxcomp.config import load_config_file

STAGES = (
    "student",
    "student_w025",
    "student_w035",
    "finetuned",
    "pruned",
    "int8_90",
    "student_w075",
    "pruned_90",
    "int8_channels",
)
_FINETUNED = ("finetuned", "pruned", "int8_90", "pruned_90", "int8_channels")
INIT_FROM = {stage: "student" for stage in _FINETUNED}
TEACHER = {}
SEEDS = 3
SEEDED_STAGES = STAGES
_WORKDIR = "workdirs/compress_alone"


def get_config(stage: str = "pruned"):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; configs/compress_alone.py has {STAGES}")
    compress = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compress.py")
    config = load_config_file(f"{compress}:{stage}")
    config.distill.teacher = ""
    if stage in INIT_FROM:
        config.init_from = f"{_WORKDIR}/{INIT_FROM[stage]}"
    return config

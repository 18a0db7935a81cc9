r"""The full compression recipe: teacher -> distilled student -> pruned -> int8, and its baselines.

Command (every stage in order, resuming where it stopped; hours on 2 CPU cores):
  make results   # = python -m jaxcomp.recipe --config=configs/compress.py \
                 #       --workdir=workdirs/compress --results_dir=results
One stage alone (its inputs must have finished):
  python -m jaxcomp.main --config=configs/compress.py:pruned --workdir=workdirs/compress/pruned

Stages (workdirs/compress/<stage>):
  teacher           the teacher, 3000 steps (configs/teacher.py)
  student           the student trained alone, 3000 steps (configs/student.py)
  distilled         the student distilled from the teacher, 3000 steps (configs/distill.py)
  pruned            distilled -> 80% gradual magnitude pruning while distilling, 1000 steps
  int8              pruned -> int8 QAT while distilling (masks kept), 1000 steps, converted
                    to int8 and evaluated on the int8 serving path
  student_w035/_w075, distilled_w035/_w075
                    the width axis: narrower and wider backbones, alone and distilled
  pruned_50, pruned_90, pruned_channels
                    the sparsity axis from the distilled student (and channels, shrunk)
  int8_90           pruned_90 -> int8 QAT as for int8: the smallest model of the recipe

Expected: the results table of docs/results.md (results/results.md) and results/*.png.
"""

from jaxcomp.config import default_config, finetune_config

STAGES = (
    "teacher",
    "student",
    "distilled",
    "pruned",
    "int8",
    "student_w035",
    "distilled_w035",
    "student_w075",
    "distilled_w075",
    "pruned_50",
    "pruned_90",
    "pruned_channels",
    "int8_90",
)
_PRUNED = ("pruned", "pruned_50", "pruned_90", "pruned_channels")
_INT8 = {"int8": "pruned", "int8_90": "pruned_90"}
INIT_FROM = {**_INT8, **{stage: "distilled" for stage in _PRUNED}}
TEACHER = {
    stage: "teacher"
    for stage in ("distilled", "distilled_w035", "distilled_w075", *_PRUNED, *_INT8)
}
_WORKDIR = "workdirs/compress"
_WIDTHS = {"w035": "centernet_student_w035", "w075": "centernet_student_w075"}


def get_config(stage: str = "distilled"):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; configs/compress.py has {STAGES}")
    if stage in INIT_FROM:
        config = finetune_config(f"{_WORKDIR}/{INIT_FROM[stage]}")
    else:
        config = default_config()
        config.train.eval_every = 500
    config.model.name = "centernet_teacher" if stage == "teacher" else "centernet_student"
    if stage.endswith(tuple(_WIDTHS)):
        config.model.name = _WIDTHS[stage.rsplit("_", 1)[1]]
    if stage in TEACHER:
        config.distill.teacher = f"{_WORKDIR}/{TEACHER[stage]}"
    if stage in _PRUNED or stage in _INT8:
        config.prune.method = "channel" if stage == "pruned_channels" else "unstructured"
        config.prune.sparsity = {
            "pruned_50": 0.5,
            "pruned_90": 0.9,
            "int8_90": 0.9,
            "pruned_channels": 0.5,
        }.get(stage, 0.8)
        config.prune.end_step = 600
    if stage in _INT8:
        # The masks of the pruned stage are the zeros it ends with: a one-shot magnitude
        # mask at the same sparsity at step 0 picks exactly them and keeps them zero.
        config.prune.schedule = "one_shot"
        config.prune.end_step = 1
        config.quant.mode = "qat"
        config.quant.observer = "ema"
        config.quant.freeze_observers_step = 700
        config.quant.freeze_bn_step = 800
        config.optim.learning_rate = 1e-3
    return config

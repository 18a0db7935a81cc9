r"""The demo: the compression recipe of configs/compress.py, short enough for a laptop.

Command (all stages in order, then one table; resumes if interrupted):
  make demo   # = python -m jaxcomp.recipe --config=configs/demo.py --workdir=workdirs/demo
One stage alone (its inputs must have finished):
  python -m jaxcomp.main --config=configs/demo.py:distilled --workdir=workdirs/demo/distilled

Stages: the teacher and the student trained alone (600 steps of batch 8 from
scratch), the student distilled from that teacher (600 steps), then pruned to 50%
while distilling (200 steps), then int8 QAT while distilling with the masks kept
(150 steps), converted to int8 and evaluated on the int8 serving path.

Expected: see the demo table in docs/results.md (about 11 minutes on 2 CPU cores).
"""

from jaxcomp.config import default_config, finetune_config

STAGES = ("teacher", "student", "distilled", "pruned", "int8")
INIT_FROM = {"pruned": "distilled", "int8": "pruned"}
TEACHER = {"distilled": "teacher", "pruned": "teacher", "int8": "teacher"}
_WORKDIR = "workdirs/demo"
_STEPS = {"teacher": 600, "student": 600, "distilled": 600, "pruned": 200, "int8": 150}


def get_config(stage: str = "student"):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; configs/demo.py has {STAGES}")
    if stage in INIT_FROM:
        config = finetune_config(f"{_WORKDIR}/{INIT_FROM[stage]}")
        config.optim.warmup_steps = 20
    else:
        config = default_config()
    config.model.name = "centernet_teacher" if stage == "teacher" else "centernet_student"
    config.train.steps = _STEPS[stage]
    config.train.checkpoint_every = 100
    if stage in TEACHER:
        config.distill.teacher = f"{_WORKDIR}/{TEACHER[stage]}"
    if stage in ("pruned", "int8"):
        config.prune.method = "unstructured"
        config.prune.sparsity = 0.5
        config.prune.frequency = 25
        config.prune.end_step = 150
    if stage == "int8":
        # A one-shot mask at the pruned stage's sparsity picks exactly its zeros.
        config.prune.schedule = "one_shot"
        config.prune.end_step = 1
        config.quant.mode = "qat"
        config.quant.observer = "ema"
        config.quant.freeze_observers_step = 100
        config.quant.freeze_bn_step = 120
        config.optim.learning_rate = 1e-3
    return config

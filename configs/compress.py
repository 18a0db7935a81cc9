r"""The full compression recipe: teacher -> distilled student -> compressed, and its baselines.

Command (every stage and seed in order, resuming where it stopped; many hours on 2
CPU cores), then the finished stages' latencies side by side:
  make results   # = python -m jaxcomp.recipe --config=configs/compress.py \
                 #       --workdir=workdirs/compress --results_dir=results --latency
One stage alone (its inputs must have finished):
  python -m jaxcomp.main --config=configs/compress.py:pruned --workdir=workdirs/compress/pruned

Stages (seed 0 in workdirs/compress/<stage>, seed k in workdirs/compress/<stage>_seed<k>):
  teacher           the teacher, 3000 steps (configs/teacher.py)
  student           the student (x0.5) trained alone, 3000 steps (configs/student.py)
  distilled         the student distilled from the teacher, 3000 steps (configs/distill.py)
  student_w025/_w035/_w075, distilled_w025/_w035/_w075
                    the width axis: dense students of other widths, alone and distilled,
                    3000 steps each: what training a smaller model buys, to set the
                    compressed models against
  finetuned         the distilled student trained FINETUNE_STEPS more steps, dense: the
                    control for the compressed stages' extra steps
  pruned, pruned_50, pruned_90
                    80% / 50% / 90% gradual magnitude pruning of the prunable kernels,
                    allocated across layers by LAMP (docs/pruning.md: at 80% it kept
                    21.1 AP where uniform per-layer pruning kept 12.5)
  pruned_channels   50% of the channels, shrunk
  int8, int8_90     80% / 90% pruning and int8 QAT in the same run, evaluated on the
                    int8 serving path
  int8_channels     50% channels and int8 QAT in the same run: the shrunk model in int8

The budget: every compressed stage (pruned*, int8*), and the dense control
`finetuned`, trains FINETUNE_STEPS = 2000 steps from the distilled student of its
seed, distilling from the teacher of its seed throughout, with the same optimizer;
pruning reaches its sparsity at step 1200 (60%) and the rest fine-tunes; QAT runs
from the first step, its observers and BatchNorm frozen at steps 1400 and 1600. So
no method gets more training than another (quantizing a pruned stage in a second
run would give int8 twice the steps).

Seeds: the headline rows (SEEDED_STAGES: the dense stages, finetuned, pruned and
the int8 stages) run SEEDS = 3 times, seed k starting from / taught by the seed-k
runs of the stages it depends on; the table reports mean ± std. pruned_50, pruned_90 and
pruned_channels run once and are marked so.

Expected: the results table of docs/results.md (results/results.md) and results/*.png.
"""

from jaxcomp.config import default_config, finetune_config

STAGES = (
    "teacher",
    "student",
    "distilled",
    "finetuned",
    "pruned",
    "int8",
    "student_w025",
    "distilled_w025",
    "student_w035",
    "distilled_w035",
    "student_w075",
    "distilled_w075",
    "pruned_50",
    "pruned_90",
    "pruned_channels",
    "int8_90",
    "int8_channels",
)
FINETUNE_STEPS = 2000
_SPARSITY = {"pruned_50": 0.5, "pruned_90": 0.9, "int8_90": 0.9}
_CHANNELS = ("pruned_channels", "int8_channels")
_INT8 = ("int8", "int8_90", "int8_channels")
_COMPRESSED = ("pruned", "pruned_50", "pruned_90", "pruned_channels", *_INT8)
_WIDTHS = {
    "w025": "centernet_student_w025",
    "w035": "centernet_student_w035",
    "w075": "centernet_student_w075",
}
_FINETUNED = ("finetuned", *_COMPRESSED)
INIT_FROM = {stage: "distilled" for stage in _FINETUNED}
TEACHER = {
    stage: "teacher"
    for stage in ("distilled", *(f"distilled_{width}" for width in _WIDTHS), *_FINETUNED)
}
SEEDS = 3
SEEDED_STAGES = (
    "teacher",
    "student",
    "distilled",
    *(f"{role}_{width}" for width in _WIDTHS for role in ("student", "distilled")),
    "finetuned",
    "pruned",
    *_INT8,
)
_WORKDIR = "workdirs/compress"


def get_config(stage: str = "distilled"):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; configs/compress.py has {STAGES}")
    if stage in INIT_FROM:
        config = finetune_config(f"{_WORKDIR}/{INIT_FROM[stage]}")
        config.train.steps = FINETUNE_STEPS
    else:
        config = default_config()
        config.train.eval_every = 500
    config.model.name = "centernet_teacher" if stage == "teacher" else "centernet_student"
    if stage.endswith(tuple(_WIDTHS)):
        config.model.name = _WIDTHS[stage.rsplit("_", 1)[1]]
    if stage in TEACHER:
        config.distill.teacher = f"{_WORKDIR}/{TEACHER[stage]}"
    if stage in _COMPRESSED:
        config.prune.method = "channel" if stage in _CHANNELS else "unstructured"
        if stage not in _CHANNELS:
            config.prune.scope = "lamp"
        config.prune.sparsity = 0.5 if stage in _CHANNELS else _SPARSITY.get(stage, 0.8)
        config.prune.end_step = 1200
    if stage in _INT8:
        config.quant.mode = "qat"
        config.quant.observer = "ema"
        config.quant.freeze_observers_step = 1400
        config.quant.freeze_bn_step = 1600
    return config

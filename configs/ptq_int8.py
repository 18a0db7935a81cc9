r"""Post-training int8 quantization of the trained student: calibration only, no training.

Train the float student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/ptq_int8.py --workdir=workdirs/ptq_int8

The float model's layer inputs are observed (running min/max) over 32 training
batches; then the fake-quant model (int8 weights per output channel with BatchNorm
folded in, int8 activations per tensor; the first conv and the heatmap's last conv
stay float) and the real int8 serving path (int8 x int8 -> int32) are evaluated.
`compression.json` has both mAPs and the bytes on disk of the int8 export.

Expected: see the measured table in docs/quantization.md (under a minute on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config():
    config = finetune_config()
    config.quant.mode = "ptq"
    config.quant.observer = "minmax"
    config.train.steps = 32  # calibration batches
    config.train.checkpoint_every = 32
    config.optim.warmup_steps = 0
    return config

r"""Int8 quantization-aware fine-tuning of the trained student.

Train the float student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/qat_int8.py --workdir=workdirs/qat_int8

1000 steps with BatchNorm-folded int8 fake-quant weights (per output channel) and
int8 fake-quant layer inputs (per tensor, ranges from an exponential moving
average), gradients through the clipped straight-through estimator. The observers
freeze at step 700 and BatchNorm switches to its running statistics at step 800,
as torch's QAT recipe does. The run ends with the fake-quant mAP, the real int8
serving path's mAP and the bytes on disk of the int8 export (`compression.json`).

Expected: see the measured table in docs/quantization.md (about 8 minutes on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config():
    config = finetune_config()
    config.quant.mode = "qat"
    config.quant.observer = "ema"
    config.quant.freeze_observers_step = 700
    config.quant.freeze_bn_step = 800
    config.optim.learning_rate = 1e-3
    return config

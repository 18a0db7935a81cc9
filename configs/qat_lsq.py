r"""Int8 fine-tuning of the trained student with learned step sizes (LSQ, Esser et al. 2020).

Train the float student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/qat_lsq.py --workdir=workdirs/qat_lsq

The budget of configs/qat_int8.py (1000 steps from the trained student, the same
learning rate, layers and bits), but the per-channel weight and per-tensor input step
sizes are trainable (`jaxcomp/quant/lsq.py`): weight steps start from each channel's
range, input steps and zero points from the first batch's, and train with LSQ's
gradients. BatchNorm keeps training (no freeze step). The run ends with the fake-quant
mAP, the int8 serving path's mAP (its scales are the learned steps) and the int8
export's bytes on disk.

Expected: the comparison with the EMA-observer QAT in docs/quantization.md (about 10
minutes on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config():
    config = finetune_config()
    config.quant.mode = "lsq"
    config.optim.learning_rate = 1e-3
    return config

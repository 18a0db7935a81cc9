"""Distillation losses over arrays (soft targets, regression imitation, features) and a
1x1 feature adapter; nothing here knows about detection."""

from jaxcomp.distill.adapter import apply_adapter, init_adapter
from jaxcomp.distill.losses import (
    LOSSES,
    DistillLoss,
    check_temperature,
    cwd,
    get_loss,
    l1_imitation,
    pkd,
    sigmoid_soft_target,
    soft_target_kl,
)
from jaxcomp.distill.transform import captured, distillation, layer_filter, with_capture

__all__ = [
    "captured",
    "distillation",
    "layer_filter",
    "with_capture",
    "LOSSES",
    "DistillLoss",
    "apply_adapter",
    "check_temperature",
    "cwd",
    "get_loss",
    "init_adapter",
    "l1_imitation",
    "pkd",
    "sigmoid_soft_target",
    "soft_target_kl",
]

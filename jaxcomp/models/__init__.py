"""Detector models and their named variants, looked up by name from configs."""

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcomp.models.centernet import (
    OUTPUT_STRIDE,
    CenterNet,
    centernet_student,
    centernet_student_w025,
    centernet_student_w035,
    centernet_student_w075,
    centernet_teacher,
    centernet_tiny,
    channel_groups,
    channel_widths,
)
from jaxcomp.models.mobilenet_v2 import MobileNetV2
from jaxcomp.ops import DEPTHWISE_IMPLS, check_depthwise_impl

# Compute dtypes of the models; parameters and BatchNorm statistics are float32 in all.
COMPUTE_DTYPES = ("float32", "bfloat16")

# An explicit registry: a new variant is one entry here, not an import side effect.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "centernet_teacher": centernet_teacher,
    "centernet_student": centernet_student,
    "centernet_student_w025": centernet_student_w025,
    "centernet_student_w035": centernet_student_w035,
    "centernet_student_w075": centernet_student_w075,
    "centernet_tiny": centernet_tiny,
}


def _normalize_channels(
    channels: Mapping[str, int] | Sequence[tuple[str, int]],
) -> tuple[tuple[str, int], ...]:
    # A sorted tuple of pairs keeps the module hashable and equal overrides equal.
    pairs = channels.items() if isinstance(channels, Mapping) else channels
    return tuple(
        sorted(
            (str(name), int(width) if isinstance(width, numbers.Integral) else width)
            for name, width in pairs
        )
    )


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The compute dtype named by `dtype` ('float32', 'bfloat16' or those dtypes).

    Args:
      dtype: a name in `COMPUTE_DTYPES` or the dtype itself (e.g. `jnp.bfloat16`).

    Returns:
      The `jnp.dtype`.

    Example:
      >>> compute_dtype("bfloat16")
      dtype(bfloat16)
    """
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}; set config.model.dtype "
            "to one of them"
        )
    return jnp.dtype(name)


def create_model(
    name: str,
    *,
    num_classes: int,
    depthwise_impl: str = "auto",
    channels: Mapping[str, int] | Sequence[tuple[str, int]] = (),
    dtype: Any = "float32",
) -> nn.Module:
    """Builds a registered detector variant.

    Args:
      name: a key of `MODELS`.
      num_classes: number of heatmap channels.
      depthwise_impl: 'auto' (shifted multiply-adds in CPU programs, grouped
        convolution in all others, chosen in the lowered program), 'grouped' or
        'shifted' (on every platform).
      channels: channel group name -> width overrides (a dict or `(name, width)` pairs),
        e.g. `jaxcomp.prune.shrink.group_widths(keep)` to build a channel-shrunk model;
        valid names are the keys of `channel_widths(model)`.
      dtype: compute dtype of every module, 'float32' or 'bfloat16' (or the dtype);
        parameters and BatchNorm statistics stay float32 and the outputs are float32.

    Returns:
      The Flax module.

    Example:
      >>> model = create_model("centernet_tiny", num_classes=13)
      >>> smaller = create_model("centernet_tiny", num_classes=13, channels={"size/hidden": 4})
      >>> half = create_model("centernet_tiny", num_classes=13, dtype="bfloat16")
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; config.model.name must be one of {sorted(MODELS)}"
        )
    check_depthwise_impl(depthwise_impl)
    model = MODELS[name](
        num_classes=num_classes,
        depthwise_impl=depthwise_impl,
        channels=_normalize_channels(channels),
        dtype=compute_dtype(dtype),
    )
    # Fail on a bad override now rather than at the first init or apply.
    channel_widths(model)
    return model


__all__ = [
    "COMPUTE_DTYPES",
    "DEPTHWISE_IMPLS",
    "MODELS",
    "OUTPUT_STRIDE",
    "CenterNet",
    "MobileNetV2",
    "centernet_student",
    "centernet_student_w025",
    "centernet_student_w035",
    "centernet_student_w075",
    "centernet_teacher",
    "centernet_tiny",
    "channel_groups",
    "channel_widths",
    "compute_dtype",
    "create_model",
]

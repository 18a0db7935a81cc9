"""Detector models and their named variants, looked up by name from configs."""

import numbers
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn

from jaxcomp.models.centernet import (
    OUTPUT_STRIDE,
    CenterNet,
    centernet_student,
    centernet_student_w035,
    centernet_student_w075,
    centernet_teacher,
    centernet_tiny,
    channel_groups,
    channel_widths,
)
from jaxcomp.models.layers import (
    DEPTHWISE_IMPLS,
    depthwise_conv3x3_grouped,
    depthwise_conv3x3_shifted,
    resolve_depthwise_impl,
)
from jaxcomp.models.mobilenet_v2 import MobileNetV2

# An explicit registry: a new variant is one entry here, not an import side effect.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "centernet_teacher": centernet_teacher,
    "centernet_student": centernet_student,
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


def create_model(
    name: str,
    *,
    num_classes: int,
    depthwise_impl: str = "auto",
    channels: Mapping[str, int] | Sequence[tuple[str, int]] = (),
) -> nn.Module:
    """Builds a registered detector variant.

    Args:
      name: a key of `MODELS`.
      num_classes: number of heatmap channels.
      depthwise_impl: 'auto', 'grouped' or 'shifted'.
      channels: channel group name -> width overrides (a dict or `(name, width)` pairs),
        e.g. `jaxcomp.prune.shrink.group_widths(keep)` to build a channel-shrunk model;
        valid names are the keys of `channel_widths(model)`.

    Returns:
      The Flax module.

    Example:
      >>> model = create_model("centernet_tiny", num_classes=13)
      >>> smaller = create_model("centernet_tiny", num_classes=13, channels={"size/hidden": 4})
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; config.model.name must be one of {sorted(MODELS)}"
        )
    resolve_depthwise_impl(depthwise_impl)
    model = MODELS[name](
        num_classes=num_classes,
        depthwise_impl=depthwise_impl,
        channels=_normalize_channels(channels),
    )
    # Fail on a bad override now rather than at the first init or apply.
    channel_widths(model)
    return model


__all__ = [
    "DEPTHWISE_IMPLS",
    "MODELS",
    "OUTPUT_STRIDE",
    "CenterNet",
    "MobileNetV2",
    "centernet_student",
    "centernet_student_w035",
    "centernet_student_w075",
    "centernet_teacher",
    "centernet_tiny",
    "channel_groups",
    "channel_widths",
    "create_model",
    "depthwise_conv3x3_grouped",
    "depthwise_conv3x3_shifted",
    "resolve_depthwise_impl",
]

"""Detector models and their named variants, looked up by name from configs."""

from collections.abc import Callable

import flax.linen as nn

from jaxcomp.models.centernet import (
    OUTPUT_STRIDE,
    CenterNet,
    centernet_student,
    centernet_teacher,
    centernet_tiny,
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
    "centernet_tiny": centernet_tiny,
}


def create_model(name: str, *, num_classes: int, depthwise_impl: str = "auto") -> nn.Module:
    """Builds a registered detector variant.

    Args:
      name: a key of `MODELS`.
      num_classes: number of heatmap channels.
      depthwise_impl: 'auto', 'grouped' or 'shifted'.

    Returns:
      The Flax module.

    Example:
      >>> model = create_model("centernet_tiny", num_classes=13)
    """
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; config.model.name must be one of {sorted(MODELS)}"
        )
    resolve_depthwise_impl(depthwise_impl)
    return MODELS[name](num_classes=num_classes, depthwise_impl=depthwise_impl)


__all__ = [
    "DEPTHWISE_IMPLS",
    "MODELS",
    "OUTPUT_STRIDE",
    "CenterNet",
    "MobileNetV2",
    "centernet_student",
    "centernet_teacher",
    "centernet_tiny",
    "create_model",
    "depthwise_conv3x3_grouped",
    "depthwise_conv3x3_shifted",
    "resolve_depthwise_impl",
]

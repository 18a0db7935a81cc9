"""MobileNetV2 backbone (Sandler et al. 2018) returning multi-scale features.

Parameter paths look like `stem/conv/kernel`, `block_3/expand/conv/kernel`,
`block_3/depthwise/conv/kernel`, `block_3/project/bn/scale`: the expansion
channels of a block are shared by `expand`, `depthwise` and the input axis of
`project`, which is what channel pruning needs to know. `channels` overrides
the stem width and each block's expansion width (to build a channel-shrunk
model) without changing any parameter path or residual connection.
"""

import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcomp.models.layers import ConvBN, DepthwiseBN

# (expansion t, output channels c, repeats n, first stride s), as in the paper.
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Stages after which the feature map is tapped: strides 4, 8, 16 and 32.
FEATURE_STAGES = (1, 2, 4, 6)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of `divisor`, never below 90% of it (torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def override_widths(
    widths: Mapping[str, int], overrides: Sequence[tuple[str, int]]
) -> dict[str, int]:
    """Returns `widths` updated by `overrides`, rejecting unknown names and non-positive widths.

    Args:
      widths: the nominal width of every channel group that may be overridden.
      overrides: `(name, width)` pairs.

    Returns:
      A new dict with the same keys as `widths`.
    """
    result = dict(widths)
    for name, width in overrides:
        if name not in widths:
            raise ValueError(
                f"unknown channel group {name!r} in channels overrides; valid names are "
                f"{sorted(widths)}"
            )
        if not isinstance(width, numbers.Integral) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width of channel group {name!r} must be an int >= 1, got {width!r}")
        result[name] = int(width)
    return result


class _Block(NamedTuple):
    expansion: int
    in_features: int
    features: int
    stride: int
    residual: bool


def _blocks(width: float, stages: Sequence[tuple[int, int, int, int]]) -> list[list[_Block]]:
    """The blocks of each stage at nominal widths.

    Residual adds follow from these nominal widths, never from overridden ones, so
    shrinking the stem to block_0's width does not add a residual the model lacked.
    """
    in_features = make_divisible(32 * width)
    layout = []
    for expansion, channels, repeats, first_stride in stages:
        features = make_divisible(channels * width)
        stage = []
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            residual = stride == 1 and in_features == features
            stage.append(_Block(expansion, in_features, features, stride, residual))
            in_features = features
        layout.append(stage)
    return layout


def channel_widths(
    width: float = 1.0, stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
) -> dict[str, int]:
    """Nominal widths of the backbone channels that `MobileNetV2.channels` may override.

    These are the channels not tied by a residual add: 'stem' (only when block_0
    adds no residual; in the 0.25-width tiny variant its input and output are
    both 8 wide, so it does) and 'block_{i}/expand' for every block with an
    expansion conv.

    Args:
      width: width multiplier.
      stages: (t, c, n, s) per stage.

    Returns:
      Name -> width, e.g. {'stem': 32, 'block_1/expand': 96, ...} for width 1.0.
    """
    blocks = [block for stage in _blocks(width, stages) for block in stage]
    widths = {}
    if not blocks or not blocks[0].residual:
        widths["stem"] = make_divisible(32 * width)
    for index, block in enumerate(blocks):
        if block.expansion != 1:
            widths[f"block_{index}/expand"] = block.in_features * block.expansion
    return widths


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), plus a residual add.

    Attributes:
      features: output channels.
      expansion: expansion factor t; 1 means no expand conv.
      stride: depthwise stride.
      depthwise_impl: 'auto', 'grouped' or 'shifted' (see `layers.DepthwiseConv3x3`).
      expanded_features: width of the expand conv, overriding `in_features * expansion`
        (ignored when `expansion` is 1).
      residual: whether to add the input to the output; None adds it when the stride
        is 1 and the input has `features` channels.
      dtype: compute dtype (parameters stay float32).
    """

    features: int
    expansion: int
    stride: int
    depthwise_impl: str = "auto"
    expanded_features: int | None = None
    residual: bool | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        y = x
        if self.expansion != 1:
            expanded = self.expanded_features or in_features * self.expansion
            y = ConvBN(expanded, dtype=self.dtype, name="expand")(y, train)
        y = DepthwiseBN(self.stride, self.depthwise_impl, self.dtype, name="depthwise")(y, train)
        y = ConvBN(self.features, activation=False, dtype=self.dtype, name="project")(y, train)
        residual = self.residual
        if residual is None:
            residual = self.stride == 1 and in_features == self.features
        if residual:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor.

    Attributes:
      width: width multiplier applied to every stage's channels.
      stages: (t, c, n, s) per stage; the tiny test variant uses fewer repeats.
      depthwise_impl: 'auto', 'grouped' or 'shifted' (see `layers.DepthwiseConv3x3`).
      channels: `(name, width)` overrides of the widths `channel_widths` lists
        ('stem', 'block_{i}/expand'); residual adds stay those of the nominal model.
      dtype: compute dtype of every layer (parameters and BatchNorm statistics stay float32).

    Returns from `__call__`: the feature maps at strides 4, 8, 16 and 32.
    """

    width: float = 1.0
    stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
    depthwise_impl: str = "auto"
    channels: tuple[tuple[str, int], ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        widths = override_widths(channel_widths(self.width, self.stages), self.channels)
        stem_features = widths.get("stem", make_divisible(32 * self.width))
        x = ConvBN(stem_features, kernel_size=3, stride=2, dtype=self.dtype, name="stem")(x, train)
        features = []
        block_index = 0
        for stage_index, stage in enumerate(_blocks(self.width, self.stages)):
            for block in stage:
                x = InvertedResidual(
                    block.features,
                    block.expansion,
                    block.stride,
                    self.depthwise_impl,
                    expanded_features=widths.get(f"block_{block_index}/expand"),
                    residual=block.residual,
                    dtype=self.dtype,
                    name=f"block_{block_index}",
                )(x, train)
                block_index += 1
            if stage_index in FEATURE_STAGES:
                features.append(x)
        return features


mobilenet_v2_100 = functools.partial(MobileNetV2, width=1.0)
mobilenet_v2_050 = functools.partial(MobileNetV2, width=0.5)
mobilenet_v2_tiny = functools.partial(
    MobileNetV2, width=0.25, stages=tuple((t, c, 1, s) for t, c, _, s in MOBILENET_V2_STAGES)
)

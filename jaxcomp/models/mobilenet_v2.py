"""MobileNetV2 backbone (Sandler et al. 2018) returning multi-scale features.

Parameter paths look like `stem/conv/kernel`, `block_3/expand/conv/kernel`,
`block_3/depthwise/conv/kernel`, `block_3/project/bn/scale`: the expansion
channels of a block are shared by `expand`, `depthwise` and the input axis of
`project`, which is what channel pruning needs to know.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

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


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), residual when shapes allow."""

    features: int
    expansion: int
    stride: int
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_features = x.shape[-1]
        y = x
        if self.expansion != 1:
            y = ConvBN(in_features * self.expansion, name="expand")(y, train)
        y = DepthwiseBN(self.stride, self.depthwise_impl, name="depthwise")(y, train)
        y = ConvBN(self.features, activation=False, name="project")(y, train)
        if self.stride == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor.

    Attributes:
      width: width multiplier applied to every stage's channels.
      stages: (t, c, n, s) per stage; the tiny test variant uses fewer repeats.
      depthwise_impl: 'auto', 'grouped' or 'shifted' (see `layers.DepthwiseConv3x3`).

    Returns from `__call__`: the feature maps at strides 4, 8, 16 and 32.
    """

    width: float = 1.0
    stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
        x = ConvBN(make_divisible(32 * self.width), kernel_size=3, stride=2, name="stem")(x, train)
        features = []
        block_index = 0
        for stage_index, (expansion, channels, repeats, stride) in enumerate(self.stages):
            out_features = make_divisible(channels * self.width)
            for repeat in range(repeats):
                x = InvertedResidual(
                    out_features,
                    expansion,
                    stride if repeat == 0 else 1,
                    self.depthwise_impl,
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

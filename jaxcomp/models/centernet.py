"""CenterNet-style detector ("Objects as Points", Zhou et al. 2019) on MobileNetV2.

Backbone features at strides 4-32 are merged top-down (nearest upsampling plus
1x1 lateral projections, each merge smoothed by a depthwise-separable conv) into
one stride-4 map, on which three heads predict a per-class centre heatmap,
box size and sub-pixel centre offset.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcomp.models.layers import ConvBN, DepthwiseBN, DepthwiseConv3x3
from jaxcomp.models.mobilenet_v2 import MOBILENET_V2_STAGES, MobileNetV2

OUTPUT_STRIDE = 4
# ImageNet statistics, the convention for MobileNetV2 inputs.
_PIXEL_MEAN = jnp.array([0.485, 0.456, 0.406]) * 255.0
_PIXEL_STD = jnp.array([0.229, 0.224, 0.225]) * 255.0
# Heatmap bias so the initial sigmoid is ~0.1 (CenterNet's -2.19 = -log((1 - 0.1) / 0.1)).
HEATMAP_BIAS_INIT = -2.19


def normalize_images(images: jax.Array) -> jax.Array:
    """Maps uint8 (or float 0-255) RGB images to zero-mean, unit-variance float32."""
    return (images.astype(jnp.float32) - _PIXEL_MEAN) / _PIXEL_STD


def _upsample2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class TopDownNeck(nn.Module):
    """Merges strides 32 -> 16 -> 8 -> 4 into one stride-4 feature map of `features` channels."""

    features: int
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, feature_maps: Sequence[jax.Array], train: bool) -> jax.Array:
        *finer, coarsest = feature_maps
        x = ConvBN(self.features, name="lateral_3")(coarsest, train)
        for level in reversed(range(len(finer))):
            lateral = ConvBN(self.features, name=f"lateral_{level}")(finer[level], train)
            x = _upsample2x(x) + lateral
            x = DepthwiseBN(impl=self.depthwise_impl, name=f"smooth_{level}_dw")(x, train)
            x = ConvBN(self.features, name=f"smooth_{level}_pw")(x, train)
        return x


class Head(nn.Module):
    """Depthwise 3x3 + 1x1 conv + ReLU, then a 1x1 conv to `out_features` (with bias).

    Depthwise-separable rather than CenterNet's dense 3x3: at stride 4 three dense
    heads would cost several times the whole MobileNetV2 backbone.
    """

    hidden: int
    out_features: int
    bias_init: float = 0.0
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DepthwiseConv3x3(impl=self.depthwise_impl, name="depthwise")(x)
        x = nn.relu(nn.Conv(self.hidden, (1, 1), name="conv")(x))
        return nn.Conv(
            self.out_features,
            (1, 1),
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.constant(self.bias_init),
            name="out",
        )(x)


class CenterNet(nn.Module):
    """MobileNetV2 + top-down neck + heatmap/size/offset heads at stride 4.

    Attributes:
      num_classes: heatmap channels.
      width: MobileNetV2 width multiplier.
      neck_features: channels of the stride-4 map.
      head_features: hidden channels of each head.
      stages: MobileNetV2 stage table (the tiny variant uses fewer repeats).
      depthwise_impl: 'auto', 'grouped' or 'shifted'.

    `__call__(images, train)` takes uint8 or 0-255 float NHWC images whose side is
    a multiple of 32 and returns {'heatmap': logits [B, H/4, W/4, C],
    'size': [B, H/4, W/4, 2], 'offset': [B, H/4, W/4, 2]}.
    """

    num_classes: int
    width: float = 1.0
    neck_features: int = 128
    head_features: int = 128
    stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        height, width = images.shape[1:3]
        if height % 32 or width % 32:
            raise ValueError(
                f"image height and width must be multiples of 32, got {height}x{width}; "
                "set config.data.image_size to a multiple of 32"
            )
        x = normalize_images(images)
        feature_maps = MobileNetV2(self.width, self.stages, self.depthwise_impl, name="backbone")(
            x, train
        )
        x = TopDownNeck(self.neck_features, self.depthwise_impl, name="neck")(feature_maps, train)
        impl = self.depthwise_impl
        return {
            "heatmap": Head(
                self.head_features, self.num_classes, HEATMAP_BIAS_INIT, impl, name="heatmap"
            )(x),
            "size": Head(self.head_features, 2, depthwise_impl=impl, name="size")(x),
            "offset": Head(self.head_features, 2, depthwise_impl=impl, name="offset")(x),
        }


centernet_teacher = functools.partial(CenterNet, width=1.0, neck_features=128, head_features=128)
centernet_student = functools.partial(CenterNet, width=0.5, neck_features=64, head_features=64)
centernet_tiny = functools.partial(
    CenterNet,
    width=0.25,
    neck_features=16,
    head_features=16,
    stages=tuple((t, c, 1, s) for t, c, _, s in MOBILENET_V2_STAGES),
)

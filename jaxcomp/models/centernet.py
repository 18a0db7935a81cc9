"""CenterNet-style detector ("Objects as Points", Zhou et al. 2019) on MobileNetV2.

Backbone features at strides 4-32 are merged top-down (nearest upsampling plus
1x1 lateral projections, each merge smoothed by a depthwise-separable conv) into
one stride-4 map, on which three heads predict a per-class centre heatmap,
box size and sub-pixel centre offset.

`channel_groups(variables)` exports which leaves share a prunable channel axis,
as plain data for `jaxcomp.prune.shrink`; `CenterNet.channels` builds the
narrower model that a shrunk variables tree fits.
"""

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.models.layers import ConvBN, DepthwiseBN, DepthwiseConv3x3
from jaxcomp.models.mobilenet_v2 import (
    MOBILENET_V2_STAGES,
    MobileNetV2,
    override_widths,
)
from jaxcomp.models.mobilenet_v2 import (
    channel_widths as backbone_channel_widths,
)
from jaxcomp.ops import conv_general_dilated_per_platform
from jaxcomp.paths import leaf_names

OUTPUT_STRIDE = 4
# ImageNet statistics, the convention for MobileNetV2 inputs. NumPy, not jnp: a jnp
# array at import would start the XLA backend before `jax.distributed.initialize()`.
_PIXEL_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_PIXEL_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0
# Heatmap bias so the initial sigmoid is ~0.1 (CenterNet's -2.19 = -log((1 - 0.1) / 0.1)).
HEATMAP_BIAS_INIT = -2.19
HEADS = ("heatmap", "size", "offset")


def normalize_images(images: jax.Array) -> jax.Array:
    """Maps uint8 (or float 0-255) RGB images to zero-mean, unit-variance float32."""
    return (images.astype(jnp.float32) - _PIXEL_MEAN) / _PIXEL_STD


def _upsample2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class TopDownNeck(nn.Module):
    """Merges strides 32 -> 16 -> 8 -> 4 into one stride-4 feature map of `features` channels."""

    features: int
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feature_maps: Sequence[jax.Array], train: bool) -> jax.Array:
        *finer, coarsest = feature_maps
        conv_bn = functools.partial(ConvBN, self.features, dtype=self.dtype)
        x = conv_bn(name="lateral_3")(coarsest, train)
        for level in reversed(range(len(finer))):
            lateral = conv_bn(name=f"lateral_{level}")(finer[level], train)
            x = _upsample2x(x) + lateral
            x = DepthwiseBN(impl=self.depthwise_impl, dtype=self.dtype, name=f"smooth_{level}_dw")(
                x, train
            )
            x = conv_bn(name=f"smooth_{level}_pw")(x, train)
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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # In CPU programs the 1x1 convs run as matmuls: XLA's conv wraps their weight
        # gradient in transposes that cost ~10% of the student's train step.
        conv = functools.partial(
            nn.Conv,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=conv_general_dilated_per_platform,
        )
        x = DepthwiseConv3x3(impl=self.depthwise_impl, dtype=self.dtype, name="depthwise")(x)
        x = nn.relu(conv(self.hidden, (1, 1), name="conv")(x))
        return conv(
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
      depthwise_impl: 'auto' (per platform, in the lowered program), 'grouped' or 'shifted'.
      dtype: compute dtype of the convolutions and activations (float32 or bfloat16);
        parameters and BatchNorm statistics stay float32 and the outputs are float32.
      channels: `(group name, width)` overrides, e.g. `(("backbone/block_1/expand", 40),)`,
        to build the smaller model a channel-shrunk variables tree fits; the names are
        the keys of `channel_widths(model)` (the group names of `channel_groups`).
        Parameter paths and residual adds do not change.

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
    channels: tuple[tuple[str, int], ...] = ()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        height, width = images.shape[1:3]
        if height % 32 or width % 32:
            raise ValueError(
                f"image height and width must be multiples of 32, got {height}x{width}; "
                "set config.data.image_size to a multiple of 32"
            )
        widths = channel_widths(self)
        backbone_channels = tuple(
            (name.removeprefix("backbone/"), width)
            for name, width in self.channels
            if name.startswith("backbone/")
        )
        x = normalize_images(images)
        feature_maps = MobileNetV2(
            self.width,
            self.stages,
            self.depthwise_impl,
            backbone_channels,
            dtype=self.dtype,
            name="backbone",
        )(x, train)
        x = TopDownNeck(self.neck_features, self.depthwise_impl, self.dtype, name="neck")(
            feature_maps, train
        )
        head = functools.partial(Head, depthwise_impl=self.depthwise_impl, dtype=self.dtype)
        outputs = {
            "heatmap": head(
                widths["heatmap/hidden"], self.num_classes, HEATMAP_BIAS_INIT, name="heatmap"
            )(x),
            "size": head(widths["size/hidden"], 2, name="size")(x),
            "offset": head(widths["offset/hidden"], 2, name="offset")(x),
        }
        # The loss wants float32, whatever the compute dtype.
        return {name: value.astype(jnp.float32) for name, value in outputs.items()}


def channel_widths(model: CenterNet) -> dict[str, int]:
    """Width of every channel group of `model` that `CenterNet.channels` may override.

    Args:
      model: a `CenterNet` (bound or not); its `channels` overrides are applied.

    Returns:
      Group name -> width, e.g. {'backbone/stem': 16, 'backbone/block_1/expand': 48, ...,
      'heatmap/hidden': 64, 'size/hidden': 64, 'offset/hidden': 64}.

    Raises:
      ValueError: an override names an unknown group or is not a positive int.
    """
    nominal = {
        f"backbone/{name}": width
        for name, width in backbone_channel_widths(model.width, model.stages).items()
    }
    nominal.update({f"{head}/hidden": model.head_features for head in HEADS})
    return override_widths(nominal, model.channels)


def _bn(prefix: str) -> list[tuple[str, int]]:
    return [
        (f"params/{prefix}/bn/scale", 0),
        (f"params/{prefix}/bn/bias", 0),
        (f"batch_stats/{prefix}/bn/mean", 0),
        (f"batch_stats/{prefix}/bn/var", 0),
    ]


def _conv_bn(prefix: str) -> list[tuple[str, int]]:
    return [(f"params/{prefix}/conv/kernel", -1), *_bn(prefix)]


def channel_groups(variables: Mapping[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Groups of `(leaf name, axis)` that share one prunable channel axis.

    Derived from the leaf names (and, for the stem, shapes) present in `variables`,
    so it works for every variant, for `jax.eval_shape` outputs and for an
    already-shrunk model. The first member of each group is the producing conv
    kernel, whose output filters are what a channel pruner scores. Groups:

    - 'backbone/block_{i}/expand' (each block with an expand conv): expand conv
      kernel (-1) and BN, depthwise kernel (-1) and BN, project kernel (-2).
    - 'backbone/stem', when block_0 adds no residual: stem conv kernel (-1) and BN,
      then block_0's expand kernel (-2), or, without an expand conv (MobileNetV2),
      block_0's depthwise kernel and BN and project kernel (-2).
    - '{heatmap,size,offset}/hidden': head `conv` kernel (-1) and bias (0), head
      `out` kernel (-2).

    The other channels are not groups:

    - Block outputs (project conv, its BN): a stage's repeated blocks add their
      input to their output, so all of a stage's outputs and the next blocks'
      inputs are one channel set with several producers; removing a channel
      needs every producer's channel gone, which per-producer masks do not
      guarantee. Outputs of blocks that neither add nor feed a residual (e.g.
      single-block stages) are untied but have no width override (yet).
    - The stem when block_0 is stride 1 with equal input and output widths (the
      0.25-width tiny variant: 8 and 8): block_0 adds a residual, tying the stem
      to block_0's output. Decided from shapes: equal widths mean "maybe tied",
      so a stem already shrunk to exactly block_0's width is no longer offered;
      when shrinking such a model again keep its earlier 'backbone/stem' override.
    - Neck: every lateral output is added to the upsampled coarser map, and the
      smoothing convs of levels 1-3 feed the next merge, so all neck channels are
      tied across merges; lateral inputs are backbone stage outputs (above). The
      last smoothing conv's output feeds all three heads' depthwise and `conv`
      kernels; it is untied but has no width override (the neck has one width).
    - Head depthwise channels are the neck's output channels; head `out` channels
      are the predictions (classes, 2 sizes, 2 offsets).

    Args:
      variables: the Flax variables dict, {'params': ..., 'batch_stats': ...}.

    Returns:
      Group name -> `[(leaf name, axis), ...]`, leaf names relative to `variables`
      (e.g. 'params/backbone/block_1/expand/conv/kernel').

    Example:
      >>> groups = channel_groups(jax.eval_shape(model.init, key, images))  # shapes suffice
      >>> groups["heatmap/hidden"][0]
      ('params/heatmap/conv/kernel', -1)
    """
    leaves = dict(zip(leaf_names(variables), jax.tree.leaves(variables), strict=True))
    if not any(name.startswith("params/") for name in leaves):
        raise ValueError(
            "variables must be the Flax variables dict {'params': ..., 'batch_stats': ...}, "
            f"got top-level keys {sorted(variables)}; pass what model.init returns"
        )
    groups = {}
    block_0 = "backbone/block_0"
    stem_kernel = leaves.get("params/backbone/stem/conv/kernel")
    project_kernel = leaves.get(f"params/{block_0}/project/conv/kernel")
    if (
        stem_kernel is not None
        and project_kernel is not None
        and stem_kernel.shape[-1] != project_kernel.shape[-1]
    ):
        if f"params/{block_0}/expand/conv/kernel" in leaves:
            consumers = [(f"params/{block_0}/expand/conv/kernel", -2)]
        else:
            consumers = [
                *_conv_bn(f"{block_0}/depthwise"),
                (f"params/{block_0}/project/conv/kernel", -2),
            ]
        groups["backbone/stem"] = [*_conv_bn("backbone/stem"), *consumers]
    block_pattern = re.compile(r"params/backbone/block_(\d+)/expand/conv/kernel")
    blocks = sorted(int(m.group(1)) for name in leaves if (m := block_pattern.fullmatch(name)))
    for index in blocks:
        block = f"backbone/block_{index}"
        groups[f"{block}/expand"] = [
            *_conv_bn(f"{block}/expand"),
            *_conv_bn(f"{block}/depthwise"),
            (f"params/{block}/project/conv/kernel", -2),
        ]
    for head in HEADS:
        if f"params/{head}/conv/kernel" in leaves:
            groups[f"{head}/hidden"] = [
                (f"params/{head}/conv/kernel", -1),
                (f"params/{head}/conv/bias", 0),
                (f"params/{head}/out/kernel", -2),
            ]
    return groups


centernet_teacher = functools.partial(CenterNet, width=1.0, neck_features=128, head_features=128)
centernet_student = functools.partial(CenterNet, width=0.5, neck_features=64, head_features=64)
# The lightweight-design axis: the student's neck and heads on narrower/wider backbones
# (the student itself is the x0.5 point).
centernet_student_w025 = functools.partial(
    CenterNet, width=0.25, neck_features=64, head_features=64
)
centernet_student_w035 = functools.partial(
    CenterNet, width=0.35, neck_features=64, head_features=64
)
centernet_student_w075 = functools.partial(
    CenterNet, width=0.75, neck_features=64, head_features=64
)
centernet_tiny = functools.partial(
    CenterNet,
    width=0.25,
    neck_features=16,
    head_features=16,
    stages=tuple((t, c, 1, s) for t, c, _, s in MOBILENET_V2_STAGES),
)

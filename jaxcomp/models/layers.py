"""Building blocks shared by the detector models.

The 3x3 depthwise convolution has two implementations with identical parameters
and numerics: XLA's grouped convolution (what GPUs and TPUs want) and nine
shifted multiply-adds (XLA:CPU compiles the weight gradient of a grouped conv
into a dense CxC convolution, which made a MobileNetV2 train step ~3x slower).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "grouped", "shifted")

# Symmetric padding of one pixel (as torchvision's MobileNetV2), so both
# implementations see the same window for stride 1 and stride 2.
_PADDING = ((1, 1), (1, 1))


def resolve_depthwise_impl(impl: str) -> str:
    """Returns the concrete implementation for `impl`, choosing by backend for 'auto'.

    Args:
      impl: one of 'auto', 'grouped', 'shifted'.

    Returns:
      'grouped' or 'shifted'.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return impl


def depthwise_conv3x3_grouped(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise convolution as one grouped convolution.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel.
      stride: spatial stride.

    Returns:
      NHWC output with C channels.
    """
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=_PADDING,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def depthwise_conv3x3_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3 depthwise convolution as nine strided slices times per-channel weights.

    Args:
      x: NHWC input.
      kernel: [3, 3, 1, C] kernel.
      stride: spatial stride.

    Returns:
      NHWC output with C channels, equal to `depthwise_conv3x3_grouped`.
    """
    batch, height, width, channels = x.shape
    out_height = (height - 1) // stride + 1
    out_width = (width - 1) // stride + 1
    padded = jnp.pad(x, ((0, 0), *_PADDING, (0, 0)))
    kernel = kernel.astype(x.dtype)
    out = None
    for dy in range(3):
        for dx in range(3):
            window = lax.slice(
                padded,
                (0, dy, dx, 0),
                (
                    batch,
                    dy + (out_height - 1) * stride + 1,
                    dx + (out_width - 1) * stride + 1,
                    channels,
                ),
                (1, stride, stride, 1),
            )
            term = window * kernel[dy, dx, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise convolution (no bias) whose implementation is picked by backend.

    Attributes:
      stride: spatial stride (1 or 2).
      impl: 'auto' (shifted on CPU, grouped elsewhere), 'grouped' or 'shifted'.
    """

    stride: int = 1
    impl: str = "auto"
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, x.shape[-1]), jnp.float32)
        if resolve_depthwise_impl(self.impl) == "grouped":
            return depthwise_conv3x3_grouped(x, kernel, self.stride)
        return depthwise_conv3x3_shifted(x, kernel, self.stride)

    @nn.nowrap
    def conv_geometry(self, in_features: int) -> dict:
        """Declares this layer as `lax.conv_general_dilated` arguments (NHWC input, HWIO kernel).

        Transforms that re-implement a layer from its kernel (the int8 serving path
        of `jaxcomp.quant.int8`) read this instead of knowing the class.

        Args:
          in_features: channels of the input.

        Returns:
          {'window_strides', 'padding', 'feature_group_count'}.
        """
        return {
            "window_strides": (self.stride, self.stride),
            "padding": _PADDING,
            "feature_group_count": in_features,
        }


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with the momentum and epsilon torchvision's MobileNetV2 uses."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ConvBN(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU6.

    Submodule names (`conv`, `bn`) are part of the parameter paths that pruning
    and quantization rules select, so they are kept stable.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    activation: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
            name="conv",
        )(x)
        x = batch_norm(train, "bn")(x)
        return jax.nn.relu6(x) if self.activation else x


class DepthwiseBN(nn.Module):
    """3x3 depthwise convolution -> BatchNorm -> ReLU6."""

    stride: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = DepthwiseConv3x3(self.stride, self.impl, name="conv")(x)
        return jax.nn.relu6(batch_norm(train, "bn")(x))

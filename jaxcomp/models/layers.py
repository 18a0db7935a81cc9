"""Building blocks shared by the detector models.

The convolutions run the kernels of `jaxcomp.ops`, chosen per platform inside
the lowered program: 3x3 depthwise layers as nine shifted multiply-adds with a
hand-written gradient on CPU and as XLA's grouped convolution elsewhere (or one
of them everywhere, `depthwise_impl`), the 1x1 convolutions of `ConvBN` as
plain matmuls on CPU. `BatchNorm` is `nn.BatchNorm` with an output that leaves
autodiff less to keep. None of this changes a parameter, its name or its shape.

Every module takes a compute `dtype` (float32 or bfloat16): convolutions and
activations run in it, parameters and BatchNorm statistics stay float32.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxcomp.ops import (
    DEPTHWISE_PADDING,
    check_depthwise_impl,
    conv_general_dilated_per_platform,
    depthwise_conv3x3,
)


class DepthwiseConv3x3(nn.Module):
    """3x3 depthwise convolution (no bias) with the kernel each platform runs fastest.

    Attributes:
      stride: spatial stride (1 or 2).
      impl: 'auto' (shifted multiply-adds in CPU programs, grouped convolution in all
        others, chosen in the lowered program), 'grouped' or 'shifted' (everywhere).
      dtype: compute dtype; the kernel parameter stays float32 and its gradient too.
    """

    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, 1, x.shape[-1]), jnp.float32)
        return depthwise_conv3x3(
            x.astype(self.dtype), kernel, self.stride, impl=check_depthwise_impl(self.impl)
        )

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
            "padding": DEPTHWISE_PADDING,
            "feature_group_count": in_features,
        }


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose training-mode output is one multiply-add per element.

    In training mode it computes `x * m + (bias - mean * m)` with
    `m = scale / sqrt(var + epsilon)`, the batch statistics and running averages
    exactly as `nn.BatchNorm` computes them (float32, `E[x^2] - E[x]^2` clipped at 0).
    Flax's `(x - mean) * m + bias` makes autodiff keep `x - mean`, a tensor as large
    as `x`, for the backward pass; this form keeps only `x`, which the convolution
    before it has written anyway (the detector train steps on CPU got ~20% faster).
    In inference mode it computes Flax's `(x - mean) * m + bias`, bit for bit.
    Outputs agree with `nn.BatchNorm` to float32 rounding.

    The arithmetic is float32 whatever the input; the output has the wider of the
    input's dtype and `dtype` (None: float32, as Flax infers it). So with
    `dtype=bfloat16` a bfloat16 input gives a bfloat16 output, and a float32 one
    (what a fake-quantized layer returns, see `jaxcomp.quant.qat`) stays float32
    rather than being rounded before the next layer quantizes it.

    Options this model does not use (a mask, `axis_name`, another axis, float32
    variance off, no scale or bias, non-float32 parameters) run `nn.BatchNorm`'s
    own code. Variables and their names are `nn.BatchNorm`'s, and it is one
    (`isinstance`), so checkpoints, BatchNorm folding and the int8 path see no
    difference.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask=None
    ) -> jax.Array:
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if not self._is_plain(x, mask):
            return super().__call__(x, use_running_average, mask=mask)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
        out_dtype = jnp.promote_types(x.dtype, jnp.float32 if self.dtype is None else self.dtype)
        if running:
            multiplier = lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((x - ra_mean.value) * multiplier + bias).astype(out_dtype)
        axes = tuple(range(x.ndim - 1))
        wide = x.astype(jnp.float32)
        mean = wide.mean(axes)
        var = jnp.maximum(0.0, lax.square(wide).mean(axes) - lax.square(mean))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        multiplier = lax.rsqrt(var + self.epsilon) * scale
        return (x * multiplier + (bias - mean * multiplier)).astype(out_dtype)

    def _is_plain(self, x: jax.Array, mask) -> bool:
        return (
            mask is None
            and self.axis in (-1, x.ndim - 1)
            and self.axis_name is None
            and self.use_scale
            and self.use_bias
            and self.use_fast_variance
            and self.force_float32_reductions
            and self.param_dtype == jnp.float32
            and jnp.issubdtype(x.dtype, jnp.floating)
        )


def batch_norm(train: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
    """BatchNorm with the momentum and epsilon torchvision's MobileNetV2 uses.

    Args:
      train: batch statistics (and running-average updates) if True, else the running ones.
      name: the module name.
      dtype: the compute dtype; statistics, scale and bias stay float32.

    Returns:
      A `BatchNorm`.
    """
    return BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class ConvBN(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional ReLU6.

    Submodule names (`conv`, `bn`) are part of the parameter paths that pruning
    and quantization rules select, so they are kept stable.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      stride: spatial stride.
      activation: apply ReLU6.
      dtype: compute dtype (parameters stay float32).
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
            conv_general_dilated=conv_general_dilated_per_platform,
            name="conv",
        )(x)
        x = batch_norm(train, "bn", self.dtype)(x)
        return jax.nn.relu6(x) if self.activation else x


class DepthwiseBN(nn.Module):
    """3x3 depthwise convolution -> BatchNorm -> ReLU6.

    Attributes:
      stride: spatial stride.
      impl: 'auto', 'grouped' or 'shifted' (see `DepthwiseConv3x3`).
      dtype: compute dtype (parameters stay float32).
    """

    stride: int = 1
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = DepthwiseConv3x3(self.stride, self.impl, self.dtype, name="conv")(x)
        return jax.nn.relu6(batch_norm(train, "bn", self.dtype)(x))

"""Low-level kernels shared by the models and the int8 serving path, chosen per platform.

Each op has a CPU kernel and XLA's native op, with the same numerics:

* 3x3 depthwise convolution (`depthwise`): nine shifted multiply-adds with a
  hand-written gradient on CPU, XLA's grouped convolution elsewhere;
* plain 1x1 convolution (`pointwise`): one matmul on CPU, XLA's convolution
  elsewhere;
* exact integer convolution (`integer`, the int8 serving path): int32
  multiply-adds or an integer matmul on CPU, XLA's integer convolution elsewhere.

With `impl='auto'` the choice is made inside the lowered program with
`jax.lax.platform_dependent`, never by asking `jax.default_backend()` while
tracing: a step traced on a CPU host and exported for TPU or GPU holds XLA's
ops, and the same step exported for CPU holds the CPU kernels. The other
`impl` values force one kernel on every platform.
"""

from jaxcomp.ops.depthwise import (
    DEPTHWISE_IMPLS,
    DEPTHWISE_PADDING,
    check_depthwise_impl,
    depthwise_conv3x3,
    depthwise_conv3x3_grouped,
    depthwise_conv3x3_shifted,
    shifted_multiply_adds,
)
from jaxcomp.ops.integer import INTEGER_CONV_IMPLS, integer_conv
from jaxcomp.ops.pointwise import (
    POINTWISE_IMPLS,
    conv_general_dilated_per_platform,
    is_plain_pointwise,
    pointwise_as_matmul,
)

__all__ = [
    "DEPTHWISE_IMPLS",
    "DEPTHWISE_PADDING",
    "INTEGER_CONV_IMPLS",
    "POINTWISE_IMPLS",
    "check_depthwise_impl",
    "conv_general_dilated_per_platform",
    "depthwise_conv3x3",
    "depthwise_conv3x3_grouped",
    "depthwise_conv3x3_shifted",
    "integer_conv",
    "is_plain_pointwise",
    "pointwise_as_matmul",
    "shifted_multiply_adds",
]

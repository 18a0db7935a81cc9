"""Forward-pass FLOPs of a Flax model, counted from its kernels and their output shapes.

Only layers that own a 'kernel' parameter are counted (convolutions, dense
layers, `jaxcomp.models.layers.DepthwiseConv3x3`): each output position of a
layer costs one multiply-add per kernel entry (a conv kernel is stored per
group, [kh, kw, in / groups, out], so this holds for grouped and depthwise
convs too). BatchNorm, activations, residual adds, upsampling and biases are
not counted: BatchNorm folds into the preceding conv at inference, and the
rest is a few operations per activation, negligible next to the convolutions.
Padding positions are counted as if they were real inputs.

Example:
  >>> model = nn.Conv(8, (3, 3))
  >>> images = np.zeros((1, 32, 32, 3), np.float32)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), images)
  >>> positions = kernel_output_positions(model, variables, images)
  >>> count_flops(variables["params"], positions)["total"]  # 2 * 32 * 32 * (3 * 3 * 3 * 8)
  442368
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxcomp.paths import leaf_names


def _is_array_like(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def kernel_output_positions(
    model: nn.Module, variables: Any, *args: Any, **kwargs: Any
) -> dict[str, int]:
    """Output positions of every kernel-owning layer in one `model.apply(variables, ...)`.

    Traced with `jax.eval_shape`, so nothing is computed: `variables` and the array
    arguments may be `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(model.init, ...)`).
    Non-array arguments (like `train=False`) are passed through as they are.

    Args:
      model: a Flax linen module.
      variables: its variables, {'params': ...} and any other collections.
      *args: positional arguments of `model.apply` after the variables.
      **kwargs: keyword arguments of `model.apply`.

    Returns:
      Kernel leaf name relative to params (e.g. 'backbone/block_1/expand/conv/kernel')
      -> the number of output positions: the product of the layer's output shape
      except the last (channel) axis, batch included, summed over calls of the layer.

    Example:
      >>> inputs = np.zeros((2, 3, 5), np.float32)
      >>> variables = jax.eval_shape(nn.Dense(4).init, jax.random.key(0), inputs)
      >>> kernel_output_positions(nn.Dense(4), variables, inputs)
      {'kernel': 6}
    """
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [leaf for leaf in leaves if _is_array_like(leaf)]
    positions: dict[str, int] = {}

    def record(next_fun, call_args, call_kwargs, context):
        outputs = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name == "__call__" and module.has_variable("params", "kernel"):
            name = "/".join((*module.path, "kernel"))
            positions[name] = positions.get(name, 0) + math.prod(np.shape(outputs)[:-1])
        return outputs

    def forward(variables, dynamic_leaves):
        replacements = iter(dynamic_leaves)
        restored = [next(replacements) if _is_array_like(leaf) else leaf for leaf in leaves]
        call_args, call_kwargs = jax.tree.unflatten(treedef, restored)
        with nn.intercept_methods(record):
            return model.apply(variables, *call_args, **call_kwargs)

    jax.eval_shape(forward, variables, dynamic)
    return positions


def count_flops(
    params: Any, positions: Mapping[str, int], *, nonzero_only: bool = False
) -> dict[str, Any]:
    """Forward FLOPs (2 per multiply-add) of the kernels in `positions`.

    A kernel costs `positions * kernel.size` multiply-adds (convolution, grouped or
    depthwise, and dense alike). BatchNorm, activations and adds are not counted.

    Args:
      params: the params collection (arrays, or `jax.ShapeDtypeStruct`s unless
        `nonzero_only`).
      positions: kernel leaf name -> output positions, from `kernel_output_positions`.
      nonzero_only: count only non-zero kernel entries, what an unstructured-sparse
        model would cost on hardware that skips zeros.

    Returns:
      {'per_kernel': {kernel name: FLOPs}, 'total': FLOPs}, Python ints.

    Example:
      >>> count_flops({"kernel": np.ones((5, 4))}, {"kernel": 6})
      {'per_kernel': {'kernel': 240}, 'total': 240}
    """
    kernels = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
    per_kernel = {}
    for name, count in positions.items():
        if name not in kernels:
            raise ValueError(
                f"kernel {name!r} from positions is not a leaf of params (leaf names look like "
                f"{list(kernels)[:3]}); pass variables['params'] of the model the positions "
                "came from"
            )
        kernel = kernels[name]
        if nonzero_only:
            weights = int(np.count_nonzero(np.asarray(kernel)))
        else:
            weights = math.prod(np.shape(kernel))
        per_kernel[name] = 2 * int(count) * weights
    return {"per_kernel": per_kernel, "total": sum(per_kernel.values())}

"""A real int8 serving path: int8 kernels and activations, int32 accumulation.

`convert_to_int8` turns a trained (QAT or calibrated) float model into an
ordinary pytree of arrays (orbax saves it as is):

    {"int8": {<layer path as nested dicts>: {
         "kernel": int8 [..., C]          (BN-folded where a BatchNorm follows),
         "kernel_scale": float32 [C],     (symmetric per output channel)
         "bias": float32 [C],             (the folded bias, or the layer's own, or zeros)
         "input_scale": float32 [],       (from the layer's input observer)
         "input_zero_point": int32 []}},
     "float": {"params": ..., "batch_stats": ...}}   (everything not folded or quantized)

`int8_apply` runs the unchanged Flax model on it: an interceptor replaces each
quantized layer's call by quantize-input -> int8 x int8 conv/dot with int32
accumulation -> rescale -> + bias (float32), and makes the folded BatchNorms the
identity. The conv geometry comes from the module: `nn.Conv` attributes,
`nn.Dense` (a dot over the last axis), or a module's own
`conv_geometry(in_features)` (`qat.layer_geometry`). The integer convolutions
are `jaxcomp.ops.integer_conv`: CPU routes in CPU programs, XLA's integer
convolution in all others, chosen inside the lowered program.
"""

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcomp import ops
from jaxcomp.paths import leaf_names, nest
from jaxcomp.quant import numerics, observers, qat

_ENTRY_KEYS = frozenset({"kernel", "kernel_scale", "bias", "input_scale", "input_zero_point"})


def _without(tree: Any, names: set[str], prefix: str = "") -> Any:
    """A copy of nested dict `tree` without the leaves in `names`; empty dicts are dropped."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if name in names:
            continue
        value = _without(value, names, f"{name}/")
        if isinstance(value, Mapping) and not value:
            continue
        out[key] = value
    return out


def _folded_bn(layer: str, config: qat.QuantConfig) -> str | None:
    if not config.fold_batch_norm:
        return None
    match = re.fullmatch(config.conv_pattern, f"{layer}/kernel")
    return None if match is None else match.expand(config.bn_template)


def convert_to_int8(
    params: Any, batch_stats: Any, quant_stats: Any, config: qat.QuantConfig
) -> dict[str, Any]:
    """Converts a float model plus its observers into the int8 serving tree.

    The int8 kernels are exactly the codes the fake-quant path (`quantized_apply`
    in 'eval' mode) uses, and the input scale/zero point those of its observers.

    Args:
      params: the float params.
      batch_stats: the BatchNorm statistics (None when the model has none).
      quant_stats: the observers (from `calibrate` or QAT).
      config: the quantization config used for QAT/calibration.

    Returns:
      {'int8': per-layer int8 entries, 'float': {'params', 'batch_stats'} left float}.

    Example:
      >>> tree = convert_to_int8(params, batch_stats, quant_stats, QuantConfig())
      >>> out = int8_apply(model, tree, images, config=QuantConfig(), train=False)
    """
    layers = qat.quantized_layers(params, config)
    qat.check_calibrated(quant_stats, layers)
    pairs = (
        qat.conv_bn_pairs(params, config.conv_pattern, config.bn_template)
        if config.fold_batch_norm
        else {}
    )
    param_names = set(leaf_names(params))
    stat_names = set() if batch_stats is None else set(leaf_names(batch_stats))
    plan = tuple((layer, pairs.get(f"{layer}/kernel")) for layer in layers)
    used_params: set[str] = set()
    used_stats: set[str] = set()
    for layer, bn in plan:
        used_params.update({f"{layer}/kernel", f"{layer}/bias"} & param_names)
        if bn is None:
            continue
        if not {f"{bn}/mean", f"{bn}/var"} <= stat_names:
            raise ValueError(
                f"{layer}/kernel is paired with BatchNorm {bn} but batch_stats has no "
                f"{bn}/mean and {bn}/var; pass the model's batch_stats collection"
            )
        used_params.update({f"{bn}/scale", f"{bn}/bias"})
        used_stats.update({f"{bn}/mean", f"{bn}/var"})
    entries = _quantize_layers(params, batch_stats, quant_stats, config=config, plan=plan)
    return {
        "int8": nest(entries),
        "float": {
            "params": _without(params, used_params),
            "batch_stats": _without(batch_stats if batch_stats is not None else {}, used_stats),
        },
    }


# One compiled program instead of hundreds of small eager ops (one per layer and op).
@functools.partial(jax.jit, static_argnames=("config", "plan"))
def _quantize_layers(
    params: Any,
    batch_stats: Any,
    quant_stats: Any,
    *,
    config: qat.QuantConfig,
    plan: tuple[tuple[str, str | None], ...],
) -> dict[str, dict[str, jax.Array]]:
    param_leaves = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
    stat_leaves = (
        {}
        if batch_stats is None
        else dict(zip(leaf_names(batch_stats), jax.tree.leaves(batch_stats), strict=True))
    )
    entries = {}
    for layer, bn in plan:
        kernel = param_leaves[f"{layer}/kernel"]
        own_bias = param_leaves.get(f"{layer}/bias")
        bias = jnp.zeros(kernel.shape[-1], jnp.float32) if own_bias is None else own_bias
        if bn is not None:
            gamma, beta = param_leaves[f"{bn}/scale"], param_leaves[f"{bn}/bias"]
            mean, var = stat_leaves[f"{bn}/mean"], stat_leaves[f"{bn}/var"]
            kernel, bias = qat.fold_batch_norm(kernel, gamma, beta, mean, var, config.bn_epsilon)
            if own_bias is not None:
                bias = bias + own_bias * qat.bn_multiplier(gamma, var, config.bn_epsilon)
        kernel_scale, kernel_zero_point, qmin, qmax = numerics.weight_qparams(
            kernel, config.weight_bits
        )
        input_scale, input_zero_point, _, _ = observers.observer_qparams(
            qat.input_observer(quant_stats, layer),
            config.activation_bits,
            config.activation_symmetric,
            name=layer,
        )
        entries[layer] = {
            "kernel": numerics.quantize(
                kernel, kernel_scale, kernel_zero_point, qmin, qmax, axis=-1, dtype=jnp.int8
            ),
            "kernel_scale": kernel_scale,
            "bias": jnp.asarray(bias, jnp.float32),
            "input_scale": input_scale,
            "input_zero_point": input_zero_point.astype(jnp.int32),
        }
    return entries


def int8_size_bytes(tree: Any) -> int:
    """Bytes of all array leaves of `tree` (arrays or `jax.ShapeDtypeStruct`s)."""
    return sum(
        int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
    )


def _int8_layers(tree: Any, prefix: str = "") -> dict[str, Mapping[str, Any]]:
    """Flattens the 'int8' part of a serving tree into {layer path: entry}."""
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"int8 tree node {prefix or '<root>'} is a {type(tree).__name__}, not a dict; "
            "build the tree with convert_to_int8"
        )
    if _ENTRY_KEYS <= set(tree):
        return {prefix.rstrip("/"): tree}
    layers = {}
    for key, value in tree.items():
        layers.update(_int8_layers(value, f"{prefix}{key}/"))
    return layers


def _int8_layer_apply(
    module: nn.Module, x: jax.Array, entry: Mapping[str, Any], qmin: int, qmax: int, path: str
) -> jax.Array:
    kernel = entry["kernel"]
    if kernel.dtype != jnp.int8:
        raise ValueError(f"int8 layer {path} has a {kernel.dtype} kernel; expected int8")
    features = getattr(module, "features", None)
    if features is not None and features != kernel.shape[-1]:
        raise ValueError(
            f"int8 layer {path} has {kernel.shape[-1]} output channels but the model's layer "
            f"has {features}: the int8 tree does not match the model"
        )
    zero_point = entry["input_zero_point"]
    # `quantize` rounds in at least float32, so a bfloat16 input gets the codes its
    # fake-quant twin gets.
    q = numerics.quantize(x, entry["input_scale"], zero_point, qmin, qmax, dtype=jnp.int8)
    if isinstance(module, nn.Dense):
        if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
            raise ValueError(
                f"int8 layer {path} has a kernel of shape {kernel.shape} for an input with "
                f"{x.shape[-1]} features: the int8 tree does not match the model"
            )
        accumulator = lax.dot_general(
            q, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
    else:
        geometry = qat.layer_geometry(module, x, kernel, path)
        groups = geometry["feature_group_count"]
        if kernel.shape[-2] * groups != x.shape[-1]:
            raise ValueError(
                f"int8 layer {path} has a kernel of shape {kernel.shape} (groups {groups}) for "
                f"an input with {x.shape[-1]} channels: the int8 tree does not match the model"
            )
        # Padding with the zero point (the code of 0.0) makes every window full, so
        # the zero-point correction below is the same at the borders as inside.
        pads = [(0, 0, 0), *((lo, hi, 0) for lo, hi in geometry["padding"]), (0, 0, 0)]
        q = lax.pad(q, zero_point.astype(jnp.int8), pads)
        accumulator = ops.integer_conv(
            q,
            kernel,
            window_strides=geometry["window_strides"],
            rhs_dilation=geometry["rhs_dilation"],
            feature_group_count=groups,
            dimension_numbers=geometry["dimension_numbers"],
        )
    # sum((q - zp) * w) = sum(q * w) - zp * sum(w), exact in int32.
    window_sum = jnp.sum(kernel.astype(jnp.int32), axis=tuple(range(kernel.ndim - 1)))
    accumulator = accumulator - zero_point.astype(jnp.int32) * window_sum
    rescale = entry["input_scale"] * entry["kernel_scale"]
    return accumulator.astype(jnp.float32) * rescale + entry["bias"]


def int8_apply(
    model: nn.Module, int8_tree: Mapping[str, Any], *args: Any, config: qat.QuantConfig, **kwargs
) -> Any:
    """Runs `model` for inference with its quantized layers in int8.

    Each layer in `int8_tree['int8']` quantizes its input to int8 with the stored
    scale/zero point, convolves (or multiplies) int8 by int8 with int32
    accumulation, subtracts the zero point's contribution exactly, rescales by
    input_scale * kernel_scale and adds the float bias. BatchNorms folded into a
    quantized layer are the identity; all other modules run in float on
    `int8_tree['float']`. Call it with the model's inference arguments (train=False).

    Args:
      model: the Flax model the tree was converted from (unchanged code).
      int8_tree: the output of `convert_to_int8`.
      *args: positional arguments of the model.
      config: the `QuantConfig` used for conversion.
      **kwargs: keyword arguments of the model (e.g. train=False).

    Returns:
      The model's output.

    Raises:
      ValueError: the tree does not match the model (a layer missing on either side,
        or a kernel shape that does not fit its input).
    """
    if not isinstance(int8_tree, Mapping) or set(int8_tree) != {"int8", "float"}:
        keys = sorted(int8_tree) if isinstance(int8_tree, Mapping) else None
        raise ValueError(
            "int8_tree must be the {'int8': ..., 'float': ...} dict convert_to_int8 returns, "
            f"got a {type(int8_tree).__name__} with keys {keys}"
        )
    layers = _int8_layers(int8_tree["int8"])
    folded = {bn: layer for layer in layers if (bn := _folded_bn(layer, config)) is not None}
    float_params = int8_tree["float"].get("params", {})
    qmin, qmax = numerics.int_range(
        config.activation_bits, signed=True, narrow=config.activation_symmetric
    )
    visited: set[str] = set()

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not call_args:
            return next_fun(*call_args, **call_kwargs)
        path = "/".join(module.path)
        if path in layers:
            visited.add(path)
            return _int8_layer_apply(module, call_args[0], layers[path], qmin, qmax, path)
        if path in folded and isinstance(module, nn.BatchNorm):
            visited.add(path)
            return call_args[0]
        conv_like = isinstance(module, nn.Conv | nn.Dense) or hasattr(module, "conv_geometry")
        if conv_like and qat._lookup(float_params, f"{path}/kernel") is None:
            raise ValueError(
                f"layer {path} is neither in the int8 tree nor in its float params: the int8 "
                "tree does not match the model; rebuild it with convert_to_int8 for this model"
            )
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(int8_tree["float"], *args, **kwargs)
    missing = sorted(set(layers) - visited)
    if missing:
        raise ValueError(
            f"the int8 tree has layers the model never called: {missing[:5]}; the int8 tree "
            "does not match the model; rebuild it with convert_to_int8 for this model"
        )
    return out

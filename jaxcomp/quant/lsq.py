"""Learned step size quantization (Esser et al., "Learned Step Size Quantization", ICLR 2020).

The step sizes are trainable: one per output channel of each quantized kernel (folded
with its BatchNorm, as QAT folds it) and one per layer input, with the gradient of
LSQ (`lsq_fake_quant`) scaled by `1 / sqrt(N * q_max)`. They are trained as
logarithms: jaxcomp trains a method's parameters with the model's AdamW, whose
updates are about the learning rate in size whatever the gradient's scale, and a step
of 0.01 must not move by 0.001 at once; in log space an update changes a step by a
fraction of itself. Weight steps start from the
weights' per-channel range (what the weight observer gives); input steps and their
zero points from the first training batch's observed range. Exported to the same int8
serving path as QAT: the int8 tree carries the learned steps as its scales.

Registered as `config.quant.mode = 'lsq'` (`jaxcomp.quant.transform.QUANT_MODES`).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxcomp import paths, transforms
from jaxcomp.quant import numerics, observers, qat
from jaxcomp.quant.int8 import convert_to_int8, int8_apply
from jaxcomp.quant.settings import quant_config_of

# The collection where the first step records each input's observed step and zero point.
FIRST_RANGES = "lsq_first_ranges"
_EPSILON = 1e-8


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """`x` in the forward pass; its gradient multiplied by `scale`."""
    return x * scale + jax.lax.stop_gradient(x - x * scale)


def lsq_fake_quant(
    x: jax.Array,
    step: jax.Array,
    zero_point: jax.Array,
    qmin: int,
    qmax: int,
    gradient_scale: float,
) -> jax.Array:
    """`(clip(round(x / step) + zero_point, qmin, qmax) - zero_point) * step` with LSQ's
    gradients.

    The codes are those of `numerics.quantize` (round half to even, then the zero point,
    then the clip), so the int8 serving path computes the same integers. The input's
    gradient is the clipped straight-through estimator (1 where the code is inside the
    range, else 0); the step's is `round(v) - v` inside and `qmin - zero_point` or
    `qmax - zero_point` outside (v = x / step), times `gradient_scale`.

    Args:
      x: the values.
      step: the step size, broadcastable to `x` (per channel on the last axis).
      zero_point: integer-valued, broadcastable to `x` (0 for weights).
      qmin, qmax: the integer range.
      gradient_scale: LSQ's `1 / sqrt(N * qmax)`.
    """
    step = scale_gradient(jnp.maximum(step, _EPSILON), gradient_scale)
    v = x / step
    code = v + jax.lax.stop_gradient(jnp.round(v) - v) + zero_point
    constant = jax.lax.stop_gradient(code)
    inside = (constant >= qmin) & (constant <= qmax)
    code = jnp.where(inside, code, jnp.clip(constant, qmin, qmax))
    return (code - zero_point) * step


def _folded_kernels(params: Any, batch_stats: Any, layers, config: qat.QuantConfig):
    """Each layer's kernel folded with its BatchNorm's running variance (as QAT folds),
    and the fold's per-channel multiplier (None for a layer without BatchNorm)."""
    pairs = qat.conv_bn_pairs(params, config.conv_pattern, config.bn_template)
    folded = {}
    for layer in layers:
        kernel = paths.lookup(params, f"{layer}/kernel")
        bn = pairs.get(f"{layer}/kernel")
        if bn is None:
            folded[layer] = (kernel, None)
            continue
        multiplier = qat.bn_multiplier(
            paths.lookup(params, f"{bn}/scale"),
            jax.lax.stop_gradient(paths.lookup(batch_stats, f"{bn}/var")),
            config.bn_epsilon,
        )
        folded[layer] = (kernel * multiplier, multiplier)
    return folded


def _weight_range(bits: int) -> tuple[int, int]:
    _, qmax = numerics.int_range(bits, signed=True)
    return -qmax, qmax  # narrow, as the int8 serving path's kernels


def lsq_weights(params: Any, batch_stats: Any, log_steps: Mapping, layers, config) -> Any:
    """The params with each quantized kernel fake-quantized by its learned steps."""
    qmin, qmax = _weight_range(config.weight_bits)
    flat = dict(zip(paths.leaf_names(params), jax.tree.leaves(params), strict=True))
    for layer, (folded, multiplier) in _folded_kernels(params, batch_stats, layers, config).items():
        per_channel = folded.size // folded.shape[-1]
        quantized = lsq_fake_quant(
            folded,
            jnp.exp(paths.lookup(log_steps, layer)),
            0.0,
            qmin,
            qmax,
            1.0 / (per_channel * qmax) ** 0.5,
        )
        if multiplier is not None:
            # A channel whose gamma is 0 outputs its BN bias whatever the kernel.
            dead = multiplier == 0
            quantized = jnp.where(
                dead, flat[f"{layer}/kernel"], quantized / jnp.where(dead, 1, multiplier)
            )
        flat[f"{layer}/kernel"] = quantized
    return jax.tree.unflatten(jax.tree.structure(params), list(flat.values()))


def _input_range(config: qat.QuantConfig) -> tuple[int, int]:
    """The integer range of layer inputs, as `observers.observer_qparams` chooses it."""
    qmin, qmax = numerics.int_range(config.activation_bits, signed=True)
    return (-qmax, qmax) if config.activation_symmetric else (qmin, qmax)


def _input_interceptor(layers, config: qat.QuantConfig, log_steps, zero_points, first_step):
    """Fake-quantizes the inputs of `layers` with LSQ; on the first step with the batch's
    own range, which it records in `FIRST_RANGES` for `update`."""
    selected = frozenset(layers)
    qmin, qmax = _input_range(config)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.path)
        if context.method_name != "__call__" or not args or path not in selected:
            return next_fun(*args, **kwargs)
        x = args[0]
        step = jnp.exp(paths.lookup(log_steps, path))
        zero_point = paths.lookup(zero_points, path)
        if first_step is not None:
            low, high = numerics.min_max(jax.lax.stop_gradient(x).astype(jnp.float32))
            observed = observers.ObserverState(low, high, jnp.int32(1))
            first, first_zero, _, _ = observers.observer_qparams(
                observed, config.activation_bits, config.activation_symmetric, name=path
            )
            module.put_variable(
                FIRST_RANGES, "input", {"step": first, "zero_point": first_zero.astype(jnp.float32)}
            )
            step = jnp.where(first_step, first, step)
            zero_point = jnp.where(first_step, first_zero.astype(jnp.float32), zero_point)
        gradient_scale = 1.0 / (x[0].size * qmax) ** 0.5
        x = lsq_fake_quant(x, step, zero_point, qmin, qmax, gradient_scale).astype(x.dtype)
        return next_fun(x, *args[1:], **kwargs)

    return interceptor


def lsq(model: nn.Module, image_size: int, config: qat.QuantConfig) -> transforms.Transform:
    """LSQ fine-tuning of `model`'s layers that `config.rules` select.

    Args:
      model: the Flax model (its `apply` is wrapped; `int8_apply` serves it).
      image_size: side of the square input.
      config: layers and bits (`observer` and `momentum` are not used: steps are learned).

    Returns:
      The `Transform`: trainable {'weights': per-channel log steps, 'inputs': per-tensor
      log steps} nested by layer path; state {'zero_points', 'initialized'}.
    """
    del image_size

    def layers_of(params):
        return qat.quantized_layers(params, config)

    def init_params(variables, key):
        del key
        layers = layers_of(variables["params"])
        _, qmax = _weight_range(config.weight_bits)
        folded = _folded_kernels(variables["params"], variables["batch_stats"], layers, config)
        weights = {
            layer: jnp.log(jnp.maximum(numerics.abs_max(kernel, axis=-1) / qmax, _EPSILON))
            for layer, (kernel, _) in folded.items()
        }
        inputs = {layer: jnp.zeros((), jnp.float32) for layer in layers}
        return {"weights": paths.nest(weights), "inputs": paths.nest(inputs)}

    def init(variables, key):
        del key
        layers = layers_of(variables["params"])
        return {
            "zero_points": paths.nest({layer: jnp.zeros((), jnp.float32) for layer in layers}),
            "initialized": jnp.zeros((), jnp.bool_),
        }

    def apply(apply_fn, view):
        def quantized(variables, *args, mutable=False, **kwargs):
            params = variables["params"]
            layers = layers_of(params)
            weights = lsq_weights(
                params, variables["batch_stats"], view.params["weights"], layers, config
            )
            first_step = None
            if view.training:
                first_step = jnp.logical_not(view.state["initialized"])
                mutable = [mutable] if isinstance(mutable, str) else list(mutable or [])
                mutable.append(FIRST_RANGES)
            interceptor = _input_interceptor(
                layers, config, view.params["inputs"], view.state["zero_points"], first_step
            )
            with nn.intercept_methods(interceptor):
                return apply_fn({**variables, "params": weights}, *args, mutable=mutable, **kwargs)

        return quantized

    def update(view, info):
        if info.grads is None:
            return view.state, view.params
        first = jnp.logical_not(view.state["initialized"])
        recorded = info.collections[FIRST_RANGES]

        def pick(field, current):
            return jax.tree.map(
                lambda old, layer_input: jnp.where(first, layer_input["input"][field], old),
                current,
                recorded,
                is_leaf=lambda node: isinstance(node, Mapping) and "input" in node,
            )

        first_steps = pick("step", jax.tree.map(jnp.exp, view.params["inputs"]))
        params = {**view.params, "inputs": jax.tree.map(jnp.log, first_steps)}
        state = {
            "zero_points": pick("zero_point", view.state["zero_points"]),
            "initialized": jnp.ones((), jnp.bool_),
        }
        return state, params

    def export(view, inputs):
        variables = inputs.variables
        return {"int8": _int8_form(model, variables, view, config)}

    return transforms.Transform(
        init=init, init_params=init_params, apply=apply, update=update, export=export
    )


def int8_tree(
    params: Any, batch_stats: Any, log_steps: Mapping, zero_points: Any, config: qat.QuantConfig
) -> dict[str, Any]:
    """The int8 serving tree (as `convert_to_int8`'s) whose scales are LSQ's learned steps.

    Args:
      params: the model's float parameters.
      batch_stats: its BatchNorm statistics (folded as in QAT).
      log_steps: the method's trainable parameters, {'weights', 'inputs'} log steps by layer.
      zero_points: the method state's input zero points by layer.
      config: the run's `QuantConfig`.

    Returns:
      {'int8': ..., 'float': ...} for `int8_apply` and the ONNX export.
    """
    layers = qat.quantized_layers(params, config)
    qmin, qmax = _input_range(config)
    # Observer ranges whose scale and zero point are the learned ones.
    ranges = {}
    for layer in layers:
        step = jnp.exp(paths.lookup(log_steps["inputs"], layer))
        zero_point = paths.lookup(zero_points, layer)
        ranges[layer] = {
            "input": {
                "min": jnp.float32((qmin - zero_point) * step),
                "max": jnp.float32((qmax - zero_point) * step),
                "count": jnp.int32(1),
            }
        }
    tree = convert_to_int8(params, batch_stats, paths.nest(ranges), config)
    wmin, wmax = _weight_range(config.weight_bits)
    for layer, (folded, _) in _folded_kernels(params, batch_stats, layers, config).items():
        step = jnp.maximum(jnp.exp(paths.lookup(log_steps["weights"], layer)), _EPSILON)
        entry = paths.lookup(tree["int8"], layer)
        entry["kernel"] = jnp.clip(jnp.round(folded / step), wmin, wmax).astype(jnp.int8)
        entry["kernel_scale"] = jnp.asarray(step, jnp.float32)
        # The learned values themselves: the range above gives them up to float rounding.
        entry["input_scale"] = jnp.exp(paths.lookup(log_steps["inputs"], layer))
        zero_point = paths.lookup(zero_points, layer)
        entry["input_zero_point"] = jnp.asarray(zero_point, jnp.int32)
    return jax.device_get(tree)


def _int8_form(model, variables, view, config) -> transforms.Export:
    tree = int8_tree(
        variables["params"],
        variables["batch_stats"],
        view.params,
        view.state["zero_points"],
        config,
    )
    return transforms.Export(
        tree=tree,
        apply=lambda tree, images: int8_apply(model, tree, images, config=config, train=False),
    )


def from_config(config: ml_collections.ConfigDict, context) -> transforms.Transform:
    """LSQ with the bits and rules of `config.quant` (rules default to the model's)."""
    return lsq(
        context.model, context.image_size, quant_config_of(config.quant, context.quant_rules)
    )

"""Quantization-aware training and post-training calibration without touching model code.

Three pure pieces:

* weights: `fake_quant_weights` / `fake_quant_folded_weights` map a params
  pytree to a params pytree whose selected kernels are fake-quantized (int8,
  symmetric per output channel), optionally through the BatchNorm that follows
  them, as torch's ConvBn QAT modules do;
* activations: `activation_quant_interceptor` is a `flax.linen.intercept_methods`
  interceptor that observes and fake-quantizes the input of each selected
  conv/dense layer, keeping observer state in the `quant_stats` collection;
* `quantized_apply` puts both around a model's `apply`, and `calibrate` runs it
  over a few batches for post-training quantization.

Where a selected layer computes in a dtype narrower than float32 (a bfloat16
model), fake-quantized values would be rounded to that dtype, and so would the
layer's sums: the int8 serving path would no longer agree with it. Such a
layer instead convolves the integer codes of its input and kernel
(`numerics.fake_quant_codes`, exact in bfloat16), sums them in float32
(`preferred_element_type`), rescales, adds its bias and returns float32, with
the same straight-through gradients (`quantize_kernel_codes`).

Layers are selected by rules over *layer paths* (module paths such as
'backbone/block_1/expand/conv'); a layer is a module that owns a `kernel`
parameter, so the candidates are read from the params tree, never guessed from
module classes or object identity.

Example (QAT train step)::

    config = QuantConfig(freeze_observers_step=1000)
    variables = {"params": params, "batch_stats": batch_stats, "quant_stats": quant_stats}
    out, updates = quantized_apply(
        model.apply, variables, images, train=True,
        config=config, mode="qat", step=step, mutable=["batch_stats"])
    # updates["batch_stats"], updates["quant_stats"] go back into the train state.

One module of about 880 lines, on purpose: weight and activation fake quant,
BatchNorm folding, calibration and the bfloat16 path through integer codes all
read the same layer selection and folding rules; split, that one numerics
contract would be spread over several files.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

from jaxcomp import ops
from jaxcomp.paths import Rules, leaf_names, map_with_names, resolve_rules
from jaxcomp.quant import numerics, observers

QUANT_STATS = "quant_stats"
MODES = ("calibrate", "qat", "eval")
# Name of the observer variable of a layer's input in the `quant_stats` collection.
_INPUT = "input"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how; frozen and hashable, so it can be a static jit argument.

    Attributes:
      weight_bits: kernel width in [2, 8] (symmetric per output channel, narrow range).
      activation_bits: layer-input width in [2, 8] (per tensor).
      activation_symmetric: symmetric ([-127, 127], zero point 0) or asymmetric
        ([-128, 127] with a zero point) activations.
      observer: 'minmax' (running min/max) or 'ema' (moving average of batch min/max).
      momentum: EMA decay of the 'ema' observer.
      freeze_observers_step: in 'qat' mode, observers stop updating at this step (None: never).
      rules: `((regex, True | None), ...)` over layer paths such as
        'backbone/block_1/expand/conv'; first match wins, None keeps a layer float,
        a layer no rule matches stays float.
      fold_batch_norm: fake-quantize conv kernels folded with their BatchNorm.
      conv_pattern: regex over kernel leaf names whose groups `bn_template` uses.
      bn_template: `re.Match.expand` template naming a kernel's BatchNorm module.
      bn_epsilon: the BatchNorm epsilon of the model.
      on_unmatched: 'error', 'warn' or 'ignore' for rules that select no layer.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    activation_symmetric: bool = False
    observer: str = "minmax"
    momentum: float = 0.9
    freeze_observers_step: int | None = None
    rules: tuple[tuple[str, Any], ...] = ((".*", True),)
    fold_batch_norm: bool = True
    conv_pattern: str = r"(.*)/conv/kernel"
    bn_template: str = r"\1/bn"
    bn_epsilon: float = 1e-5
    on_unmatched: str = "error"

    def __post_init__(self):
        for field in ("weight_bits", "activation_bits"):
            bits = getattr(self, field)
            if not (isinstance(bits, int) and 2 <= bits <= 8):
                raise ValueError(f"{field} must be an int in [2, 8], got {bits!r}")
        if self.observer not in observers.OBSERVER_METHODS:
            raise ValueError(
                f"observer must be one of {observers.OBSERVER_METHODS}, got {self.observer!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        rules = tuple(tuple(rule) for rule in self.rules)
        for pattern, value in rules:
            if value is not True and value is not None:
                raise ValueError(
                    f"QuantConfig rule values must be True (quantize) or None (keep float), "
                    f"got {value!r} for {pattern!r}"
                )
        object.__setattr__(self, "rules", rules)


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    if tree is None:
        return {}
    return dict(zip(leaf_names(tree), jax.tree.leaves(tree), strict=True))


def _rule_values(tree: Any, rules: Rules, on_unmatched: str) -> list[Any]:
    """The value of the first matching rule for every leaf, in flattening order (None kept)."""
    chosen = resolve_rules(tree, rules, on_unmatched=on_unmatched)
    return jax.tree.leaves(chosen, is_leaf=lambda value: value is None)


def _bits_for(value: Any, bits: int, name: str) -> int | None:
    if value is None:
        return None
    if value is True:
        return bits
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"weight rule value for {name} must be True, None or a bit width, got {value!r}"
        )
    numerics.int_range(value)
    return value


def _check_kernel(name: str, leaf: Any) -> None:
    if leaf.ndim < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(
            f"weight fake-quant selected {name} of shape {leaf.shape} and dtype {leaf.dtype}; "
            "rules must select float kernels of rank >= 2 only, e.g. r'.*/kernel'"
        )


def fake_quant_kernel(kernel: jax.Array, bits: int = 8) -> jax.Array:
    """Fake-quantizes a kernel symmetrically per output channel (last axis), narrow range.

    Exact zeros (pruned weights) stay exactly zero.

    Args:
      kernel: [..., out] kernel (HWIO conv, [3, 3, 1, C] depthwise, [in, out] dense).
      bits: width in [2, 8].

    Returns:
      The fake-quantized kernel, with the straight-through gradient.
    """
    scale, zero_point, qmin, qmax = numerics.weight_qparams(kernel, bits, axis=-1)
    return numerics.fake_quant(kernel, scale, zero_point, qmin, qmax, axis=-1)


def fake_quant_weights(
    params: Any, rules: Rules, *, bits: int = 8, on_unmatched: str = "error"
) -> Any:
    """Fake-quantizes the kernels that `rules` select, leaving every other leaf unchanged.

    Args:
      params: a params pytree (Flax `params` dict, nnx.State, plain dict).
      rules: `[(regex over leaf names, value), ...]` resolved with
        `jaxcomp.paths.resolve_rules`: True quantizes with `bits`, an int with that
        many bits, None keeps the leaf float.
      bits: default width in [2, 8].
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no leaf.

    Returns:
      A params pytree of the same structure.

    Example:
      >>> params = fake_quant_weights(params, [(r".*/kernel", True)])
    """
    return _fake_quant_selected(
        params,
        rules,
        bits,
        on_unmatched,
        lambda _, leaf, leaf_bits: fake_quant_kernel(leaf, leaf_bits),
    )


def _fake_quant_selected(
    params: Any,
    rules: Rules,
    bits: int,
    on_unmatched: str,
    quantize_leaf: Callable[[str, jax.Array, int], jax.Array],
) -> Any:
    """`quantize_leaf(name, kernel, bits)` on the kernels `rules` select; other leaves as is."""
    values = _rule_values(params, rules, on_unmatched)
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for name, leaf, value in zip(leaf_names(params), leaves, values, strict=True):
        leaf_bits = _bits_for(value, bits, name)
        if leaf_bits is None:
            out.append(leaf)
            continue
        _check_kernel(name, leaf)
        out.append(quantize_leaf(name, leaf, leaf_bits))
    return jax.tree.unflatten(treedef, out)


def conv_bn_pairs(
    params: Any, conv_pattern: str = r"(.*)/conv/kernel", bn_template: str = r"\1/bn"
) -> dict[str, str]:
    """Pairs conv kernels with the BatchNorm that follows them, by leaf names.

    A kernel leaf whose name fully matches `conv_pattern` is paired with the
    module `match.expand(bn_template)` when that module has `scale` and `bias`
    params. The defaults fit this repo's `ConvBN`/`DepthwiseBN`:
    'backbone/block_1/expand/conv/kernel' -> 'backbone/block_1/expand/bn'.

    Args:
      params: a params pytree.
      conv_pattern: regex over kernel leaf names.
      bn_template: template naming the BatchNorm module from the match's groups.

    Returns:
      {kernel leaf name: BatchNorm module path}.
    """
    names = set(leaf_names(params))
    pattern = re.compile(conv_pattern)
    pairs = {}
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        bn = match.expand(bn_template)
        if f"{bn}/scale" in names and f"{bn}/bias" in names:
            pairs[name] = bn
    return pairs


def bn_multiplier(scale: jax.Array, var: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Per-channel factor of a BatchNorm, gamma / sqrt(var + eps), computed as Flax computes it."""
    return jax.lax.rsqrt(var + epsilon) * scale


def fold_batch_norm(
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """Folds an inference-mode BatchNorm into the conv (or dense) kernel before it.

    BN(conv(x, W)) = conv(x, W * s) + (bias - mean * s) with s = scale / sqrt(var + eps),
    per output channel (the kernel's last axis).

    Args:
      kernel: [..., C] kernel.
      scale: BatchNorm gamma [C].
      bias: BatchNorm beta [C].
      mean: running mean [C].
      var: running variance [C].
      epsilon: BatchNorm epsilon.

    Returns:
      (folded_kernel [..., C], folded_bias [C]).
    """
    multiplier = bn_multiplier(scale, var, epsilon)
    return kernel * multiplier, bias - mean * multiplier


def _folded_fake_quant(kernel, gamma, var, bits, epsilon):
    multiplier = bn_multiplier(gamma, jax.lax.stop_gradient(var), epsilon)
    # A channel whose gamma is 0 outputs its BN bias whatever the kernel: keep the
    # kernel instead of dividing by zero.
    dead = multiplier == 0
    safe = jnp.where(dead, 1.0, multiplier)
    return jnp.where(dead, kernel, fake_quant_kernel(kernel * multiplier, bits) / safe)


def fake_quant_folded_weights(
    params: Any,
    batch_stats: Any,
    rules: Rules,
    *,
    bits: int = 8,
    epsilon: float = 1e-5,
    conv_pattern: str = r"(.*)/conv/kernel",
    bn_template: str = r"\1/bn",
    on_unmatched: str = "error",
) -> Any:
    """Fake-quantizes selected kernels as they will be served: folded with their BatchNorm.

    A kernel W paired with a BatchNorm (see `conv_bn_pairs`) becomes
    `fake_quant(W * s) / s` with s = gamma / sqrt(running_var + eps), so that the
    model's own BatchNorm, applied afterwards as usual, sees the conv output of
    the quantized folded weight (torch's ConvBn QAT modules do the same).
    Gradients reach W and gamma through the straight-through estimator; the
    running variance gets none. Unpaired kernels are fake-quantized directly.

    Freezing BN statistics is the caller's business: after the freeze step, run
    the model with train=False (running statistics) so that BatchNorm and the
    fold use the same statistics.

    Args:
      params: a params pytree.
      batch_stats: the BatchNorm statistics pytree (`{.../bn/mean, .../bn/var}`).
      rules: `[(regex over leaf names, True | int | None), ...]`, as in `fake_quant_weights`.
      bits: default width in [2, 8].
      epsilon: the BatchNorm epsilon.
      conv_pattern: see `conv_bn_pairs`.
      bn_template: see `conv_bn_pairs`.
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no leaf.

    Returns:
      A params pytree of the same structure.
    """
    by_name = _leaves_by_name(params)
    stats = _leaves_by_name(batch_stats)
    pairs = conv_bn_pairs(params, conv_pattern, bn_template)

    def quantize_leaf(name: str, leaf: jax.Array, leaf_bits: int) -> jax.Array:
        bn = pairs.get(name)
        if bn is None:
            return fake_quant_kernel(leaf, leaf_bits)
        if f"{bn}/var" not in stats:
            raise ValueError(
                f"{name} is paired with BatchNorm {bn} but batch_stats has no {bn}/var; "
                "pass the model's batch_stats collection"
            )
        scale, var = by_name[f"{bn}/scale"], stats[f"{bn}/var"]
        return _folded_fake_quant(leaf, scale, var, leaf_bits, epsilon)

    return _fake_quant_selected(params, rules, bits, on_unmatched, quantize_leaf)


class KernelCodes(NamedTuple):
    """A fake-quantized kernel as integer codes times a per-output-channel step.

    `codes * step` is the kernel `quantize_weights` gives (to float32 rounding).

    Attributes:
      codes: integer-valued float32 kernel (|codes| <= 127 for 8 bits), whose
        straight-through gradient reaches the float kernel (and BatchNorm scale).
      step: [C] float32 value of one code per output channel (the weight scale,
        divided by the BatchNorm multiplier when folded); no gradient reaches it
        through the scale, as in `fake_quant`.
    """

    codes: jax.Array
    step: jax.Array


def _kernel_codes(kernel: jax.Array, bits: int) -> KernelCodes:
    scale, zero_point, qmin, qmax = numerics.weight_qparams(kernel, bits, axis=-1)
    codes = numerics.fake_quant_codes(kernel, scale, zero_point, qmin, qmax, axis=-1)
    return KernelCodes(codes, jax.lax.stop_gradient(scale))


def _folded_kernel_codes(kernel, gamma, var, bits, epsilon) -> KernelCodes:
    multiplier = bn_multiplier(gamma, jax.lax.stop_gradient(var), epsilon)
    dead = multiplier == 0
    safe = jnp.where(dead, 1.0, multiplier)
    codes, scale = _kernel_codes(kernel * multiplier, bits)
    # As `_folded_fake_quant`: a channel whose gamma is 0 keeps its float kernel (its
    # BatchNorm outputs the bias whatever the sums are), one unit per "code".
    return KernelCodes(jnp.where(dead, kernel, codes), jnp.where(dead, 1.0, scale / safe))


def quantize_kernel_codes(
    params: Any, batch_stats: Any, config: QuantConfig
) -> dict[str, KernelCodes]:
    """The kernels `quantize_weights` fake-quantizes, as integer codes and steps, by layer.

    Args:
      params: a params pytree.
      batch_stats: BatchNorm statistics (may be None when the model has none).
      config: the quantization config.

    Returns:
      {layer path: KernelCodes} for the layers `config` selects.

    Example:
      >>> codes = quantize_kernel_codes(params, batch_stats, QuantConfig())
      >>> layer, entry = next(iter(codes.items()))
      >>> kernel = entry.codes * entry.step  # `layer`'s fake-quantized (BN-folded) kernel
      >>> bool(jnp.all(entry.codes == jnp.round(entry.codes)))
      True
    """
    rules = kernel_rules(config.rules)
    values = _rule_values(params, rules, config.on_unmatched)
    stats = _leaves_by_name(batch_stats)
    by_name = _leaves_by_name(params)
    pairs = (
        conv_bn_pairs(params, config.conv_pattern, config.bn_template)
        if config.fold_batch_norm and batch_stats is not None
        else {}
    )
    kernels = {}
    for name, leaf, value in zip(leaf_names(params), jax.tree.leaves(params), values, strict=True):
        bits = _bits_for(value, config.weight_bits, name)
        if bits is None:
            continue
        _check_kernel(name, leaf)
        layer = name.removesuffix("/kernel")
        bn = pairs.get(name)
        if bn is None:
            kernels[layer] = _kernel_codes(leaf, bits)
            continue
        if f"{bn}/var" not in stats:
            raise ValueError(
                f"{name} is paired with BatchNorm {bn} but batch_stats has no {bn}/var; "
                "pass the model's batch_stats collection"
            )
        kernels[layer] = _folded_kernel_codes(
            leaf, by_name[f"{bn}/scale"], stats[f"{bn}/var"], bits, config.bn_epsilon
        )
    return kernels


def kernel_rules(rules: Rules) -> list[tuple[str, Any]]:
    """Turns rules over layer paths into rules over their kernel leaves ('<layer>/kernel')."""
    return [(f"(?:{pattern})/kernel", value) for pattern, value in rules]


def quantized_layers(params: Any, config: QuantConfig) -> tuple[str, ...]:
    """Lists the layer paths `config.rules` select among the modules owning a `kernel`.

    Args:
      params: a params pytree.
      config: the quantization config.

    Returns:
      Sorted layer paths, e.g. ('backbone/block_0/depthwise/conv', ...).
    """
    values = _rule_values(params, kernel_rules(config.rules), config.on_unmatched)
    return tuple(
        sorted(
            name[: -len("/kernel")]
            for name, value in zip(leaf_names(params), values, strict=True)
            if value is not None
        )
    )


def quantize_weights(params: Any, batch_stats: Any, config: QuantConfig) -> Any:
    """Fake-quantizes the kernels of the layers `config` selects (BN-folded if configured).

    Args:
      params: a params pytree.
      batch_stats: BatchNorm statistics (may be None when the model has none).
      config: the quantization config.

    Returns:
      A params pytree of the same structure.
    """
    rules = kernel_rules(config.rules)
    if config.fold_batch_norm and batch_stats is not None:
        return fake_quant_folded_weights(
            params,
            batch_stats,
            rules,
            bits=config.weight_bits,
            epsilon=config.bn_epsilon,
            conv_pattern=config.conv_pattern,
            bn_template=config.bn_template,
            on_unmatched=config.on_unmatched,
        )
    return fake_quant_weights(
        params, rules, bits=config.weight_bits, on_unmatched=config.on_unmatched
    )


def _lookup(tree: Any, path: str) -> Any:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def input_observer(quant_stats: Any, layer: str) -> observers.ObserverState | None:
    """The input observer of `layer` in a `quant_stats` collection, or None if it has none."""
    value = _lookup(quant_stats, f"{layer}/{_INPUT}") if quant_stats is not None else None
    return None if value is None else observers.as_observer_state(value)


def _broadcast_ints(value: Any, count: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * count
    if isinstance(value, int):
        return (value,) * count
    return tuple(value)


def layer_geometry(module: nn.Module, x: jax.Array, kernel: jax.Array, path: str) -> dict:
    """`lax.conv_general_dilated` arguments of a conv-like layer, with explicit padding.

    Read from `nn.Conv`'s attributes, or from a module's own
    `conv_geometry(in_features)` (a depthwise layer written as its own module
    declares itself so), so that a layer can be re-implemented from its kernel
    without knowing its class.

    Args:
      module: the layer (bound or not).
      x: its input, channels last.
      kernel: its kernel, (spatial..., in / groups, out).
      path: the layer path, for error messages.

    Returns:
      {'window_strides', 'padding' (pairs), 'rhs_dilation', 'feature_group_count',
      'dimension_numbers' (channels-last `lax.ConvDimensionNumbers`)}.
    """
    spatial = kernel.ndim - 2
    if x.ndim != spatial + 2:
        raise ValueError(
            f"quantized layer {path} expects an input of rank {spatial + 2} (batch, spatial, "
            f"channels), got shape {x.shape}"
        )
    if hasattr(module, "conv_geometry"):
        geometry = dict(module.conv_geometry(x.shape[-1]))
    elif isinstance(module, nn.Conv):
        if _broadcast_ints(module.input_dilation, spatial) != (1,) * spatial:
            raise ValueError(f"quantized layer {path}: input_dilation is not supported")
        if module.mask is not None:
            raise ValueError(f"quantized layer {path}: masked convolutions are not supported")
        geometry = {
            "window_strides": _broadcast_ints(module.strides, spatial),
            "padding": canonicalize_padding(module.padding, spatial),
            "rhs_dilation": _broadcast_ints(module.kernel_dilation, spatial),
            "feature_group_count": module.feature_group_count,
        }
    else:
        raise ValueError(
            f"quantized layer {path} is a {type(module).__name__}, which is neither nn.Conv, "
            "nn.Dense nor a module declaring conv_geometry(); keep it float with a rule "
            f"({path!r}, None)"
        )
    geometry.setdefault("rhs_dilation", (1,) * spatial)
    padding = geometry["padding"]
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"quantized layer {path}: padding {padding!r} is not supported")
        dilations = zip(kernel.shape[:spatial], geometry["rhs_dilation"], strict=True)
        dilated = [(size - 1) * dilation + 1 for size, dilation in dilations]
        padding = lax.padtype_to_pads(x.shape[1:-1], dilated, geometry["window_strides"], padding)
    geometry["padding"] = tuple(tuple(pair) for pair in padding)
    channels_last = (0, spatial + 1, *range(1, spatial + 1))
    geometry["dimension_numbers"] = lax.ConvDimensionNumbers(
        lhs_spec=channels_last,
        rhs_spec=(spatial + 1, spatial, *range(spatial)),
        out_spec=channels_last,
    )
    return geometry


def _compute_dtype(module: nn.Module, x: jax.Array) -> jnp.dtype:
    """The dtype a layer computes in: its `dtype`, else (Flax's rule) its input's and float32."""
    dtype = getattr(module, "dtype", None)
    return jnp.dtype(jnp.promote_types(x.dtype, jnp.float32) if dtype is None else dtype)


def _sums_of_codes(
    module: nn.Module, codes: jax.Array, kernel: jax.Array, dtype: jnp.dtype, path: str
) -> jax.Array:
    """The layer's convolution (or dot) of integer codes in `dtype`, summed in float32."""
    codes, kernel = codes.astype(dtype), kernel.astype(dtype)
    if isinstance(module, nn.Dense):
        return lax.dot_general(
            codes,
            kernel,
            (((codes.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
    geometry = layer_geometry(module, codes, kernel, path)
    strides = geometry["window_strides"]
    groups = geometry["feature_group_count"]
    if (
        kernel.shape == (3, 3, 1, codes.shape[-1])
        and groups == codes.shape[-1]
        and geometry["padding"] == ops.DEPTHWISE_PADDING
        and strides[0] == strides[1]
        and tuple(geometry["rhs_dilation"]) == (1, 1)
    ):
        return ops.depthwise_conv3x3(codes, kernel, strides[0], preferred_element_type=jnp.float32)
    return ops.conv_general_dilated_per_platform(
        codes,
        kernel,
        strides,
        geometry["padding"],
        rhs_dilation=geometry["rhs_dilation"],
        dimension_numbers=geometry["dimension_numbers"],
        feature_group_count=groups,
        preferred_element_type=jnp.float32,
    )


def _apply_from_codes(
    module: nn.Module,
    x: jax.Array,
    kernel: KernelCodes,
    qparams: tuple[jax.Array, jax.Array, int, int],
    dtype: jnp.dtype,
    path: str,
) -> jax.Array:
    """A fake-quantized layer computing in `dtype` as exactly as in float32 (see the module doc)."""
    scale, zero_point, qmin, qmax = qparams
    codes = numerics.fake_quant_codes(x, scale, zero_point, qmin, qmax)
    # Zero padding of `codes` is padding of x with the code of 0.0, as in float32.
    sums = _sums_of_codes(module, codes, kernel.codes, dtype, path)
    # The scales get no gradient, as in `fake_quant`.
    out = sums * (jax.lax.stop_gradient(scale) * kernel.step)
    bias = module.get_variable("params", "bias")
    return out if bias is None else out + bias


def check_calibrated(quant_stats: Any, layers: Sequence[str]) -> None:
    """Raises if a layer has no observer, or (when concrete) one that saw no batch."""
    for layer in layers:
        state = input_observer(quant_stats, layer)
        if state is None:
            raise ValueError(f"observer for {layer} was never updated: run calibration first")
        observers.check_observed(state, layer)


def activation_quant_interceptor(
    layers: Sequence[str],
    config: QuantConfig,
    *,
    mode: str,
    step: jax.Array | int | None = None,
    kernel_codes: Mapping[str, KernelCodes] | None = None,
) -> Callable[..., Any]:
    """An interceptor that observes and fake-quantizes the inputs of `layers`.

    For a `__call__` of a module whose path is in `layers`, it reads (creating
    it when `quant_stats` is mutable) the variable `quant_stats/<layer>/input`
    = {min, max, count}; in 'calibrate' and 'qat' modes it updates it with the
    input's range ('qat' stops at `config.freeze_observers_step`); in 'qat' and
    'eval' modes it fake-quantizes the input before calling the layer. A layer
    computing in a dtype narrower than float32, given its `kernel_codes`, is
    computed from integer codes instead (see the module docstring) and returns
    float32.

    Observer state lives in a Flax variable collection: an interceptor runs
    inside the module's compact scope, so `context.module.variable(...)` can
    declare and update variables there (Flax 0.12.8), the way qwix keeps its
    calibration statistics.

    Args:
      layers: layer paths (from `quantized_layers`).
      config: the quantization config.
      mode: 'calibrate', 'qat' or 'eval'.
      step: the train step (may be traced); needed when freezing observers in 'qat'.
      kernel_codes: {layer path: KernelCodes} (`quantize_kernel_codes`), for layers
        computing in bfloat16; None fake-quantizes their inputs as in float32.

    Returns:
      An interceptor for `flax.linen.intercept_methods`.

    Example:
      >>> with nn.intercept_methods(activation_quant_interceptor(layers, config, mode="eval")):
      ...   out = model.apply(variables, images)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    selected = frozenset(layers)
    freeze_step = config.freeze_observers_step if mode == "qat" else None

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if path not in selected:
            return next_fun(*args, **kwargs)
        updates = mode != "eval"
        if updates and not module.is_mutable_collection(QUANT_STATS):
            raise ValueError(
                f"mode {mode!r} updates observers: apply with mutable=[{QUANT_STATS!r}] "
                "(quantized_apply adds it for you)"
            )
        if not module.has_variable(QUANT_STATS, _INPUT) and not updates:
            raise ValueError(f"observer for {path} was never updated: run calibration first")
        variable = module.variable(QUANT_STATS, _INPUT, lambda: observers.init_observer()._asdict())
        state = observers.as_observer_state(variable.value)
        x = args[0]
        if updates:
            state = observers.observe(
                state,
                x,
                method=config.observer,
                momentum=config.momentum,
                step=step,
                freeze_step=freeze_step,
            )
            variable.value = state._asdict()
        if mode != "calibrate":
            qparams = observers.observer_qparams(
                state, config.activation_bits, config.activation_symmetric, name=path
            )
            dtype = _compute_dtype(module, x)
            if kernel_codes is not None and jnp.finfo(dtype).bits < 32:
                if len(args) > 1 or kwargs:
                    raise ValueError(
                        f"quantized layer {path} computes in {dtype} and takes arguments "
                        "besides its input, which its integer-code form cannot pass on; "
                        f"keep it float with a rule ({path!r}, None)"
                    )
                return _apply_from_codes(module, x, kernel_codes[path], qparams, dtype, path)
            x = numerics.fake_quant(x, *qparams)
        return next_fun(x, *args[1:], **kwargs)

    return interceptor


def _with_quant_stats(mutable: Any) -> Any:
    if mutable is True:
        return True
    if mutable is False or mutable is None:
        return [QUANT_STATS]
    if isinstance(mutable, str):
        mutable = [mutable]
    if not isinstance(mutable, Iterable):
        raise ValueError(f"mutable must be a bool, a name or a list of names, got {mutable!r}")
    mutable = list(mutable)
    return mutable if QUANT_STATS in mutable else [*mutable, QUANT_STATS]


def quantized_apply(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    *args: Any,
    config: QuantConfig,
    mode: str,
    step: jax.Array | int | None = None,
    mutable: Any = False,
    **kwargs: Any,
) -> Any:
    """Runs `apply_fn` (a Flax `model.apply`) with fake-quantized weights and activations.

    * 'calibrate' (PTQ): float weights, observers record each selected layer's input range.
    * 'qat': kernels fake-quantized (BN-folded if configured), observers updated until
      `config.freeze_observers_step`, layer inputs fake-quantized.
    * 'eval': kernels and inputs fake-quantized with the stored (frozen) observers.

    Layers computing in bfloat16 use integer codes (see the module docstring):
    their output agrees with `jaxcomp.quant.int8_apply` to within one quantization
    step, as in float32.

    In 'calibrate' and 'qat' modes `quant_stats` is added to `mutable`, so the
    result is `(output, updated_collections)`; in 'eval' mode the result is what
    `apply_fn` returns for the caller's `mutable`. Pass `model.apply` itself, not
    a jitted version of it (the interceptor acts while tracing): jit the caller.

    Args:
      apply_fn: `model.apply`.
      variables: {'params': ..., 'batch_stats': ..., 'quant_stats': ...}; 'quant_stats'
        may be absent in 'calibrate'/'qat' modes (observers then start empty).
      *args: positional arguments of the model.
      config: the quantization config.
      mode: 'calibrate', 'qat' or 'eval'.
      step: the train step (may be traced); needed with `config.freeze_observers_step`.
      mutable: collections the model may update besides `quant_stats`.
      **kwargs: keyword arguments of the model (e.g. train=False).

    Returns:
      The output of `apply_fn`, with updated collections as described above.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = variables["params"]
    layers = quantized_layers(params, config)
    if mode == "eval":
        check_calibrated(variables.get(QUANT_STATS), layers)
    else:
        mutable = _with_quant_stats(mutable)
    kernel_codes = None
    if mode != "calibrate":
        batch_stats = variables.get("batch_stats")
        # Float32 layers read the first, narrower ones the second; under jit XLA
        # drops the one no layer reads.
        variables = {**variables, "params": quantize_weights(params, batch_stats, config)}
        kernel_codes = quantize_kernel_codes(params, batch_stats, config)
    interceptor = activation_quant_interceptor(
        layers, config, mode=mode, step=step, kernel_codes=kernel_codes
    )
    with nn.intercept_methods(interceptor):
        return apply_fn(variables, *args, mutable=mutable, **kwargs)


def init_quant_stats(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    *args: Any,
    config: QuantConfig,
    **kwargs: Any,
) -> dict[str, Any]:
    """Fresh observers (count 0) for every selected layer, without running the model.

    The structure comes from `jax.eval_shape`, so this costs a trace, not a compile;
    use it to put `quant_stats` into a train state before the first jitted step.

    Args:
      apply_fn: `model.apply`.
      variables: {'params': ..., 'batch_stats': ...}.
      *args: example positional arguments of the model (shapes matter, not values).
      config: the quantization config.
      **kwargs: keyword arguments of the model (e.g. train=False).

    Returns:
      The `quant_stats` collection: {<layer path>: {'input': {'min', 'max', 'count'}}}.
    """
    base = {name: tree for name, tree in variables.items() if name != QUANT_STATS}

    def run(base, *args):
        _, updates = quantized_apply(
            apply_fn, base, *args, config=config, mode="calibrate", **kwargs
        )
        return updates[QUANT_STATS]

    shapes = jax.eval_shape(run, base, *args)
    fresh = observers.init_observer()._asdict()
    return map_with_names(lambda name, _: fresh[name.rsplit("/", 1)[-1]], shapes)


def calibrate(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    config: QuantConfig,
    **kwargs: Any,
) -> dict[str, Any]:
    """Post-training calibration: observes the layer inputs over `batches`, no gradient steps.

    The per-batch call is jitted once (all batches must share one shape).

    Args:
      apply_fn: `model.apply`.
      variables: {'params': ..., 'batch_stats': ...} of the trained float model.
      batches: an iterable of model inputs: an array, or a tuple of positional arguments.
      config: the quantization config (`observer`, `momentum`, `rules`, bits).
      **kwargs: keyword arguments of the model, e.g. train=False (running BN statistics).

    Returns:
      The `quant_stats` collection to pass to `quantized_apply(mode='eval')` or
      `convert_to_int8`.

    Example:
      >>> quant_stats = calibrate(model.apply, variables, image_batches, QuantConfig(), train=False)
    """
    base = {name: tree for name, tree in variables.items() if name != QUANT_STATS}

    @jax.jit
    def update(base, quant_stats, batch_args):
        _, updates = quantized_apply(
            apply_fn,
            {**base, QUANT_STATS: quant_stats},
            *batch_args,
            config=config,
            mode="calibrate",
            **kwargs,
        )
        return updates[QUANT_STATS]

    quant_stats = None
    for batch in batches:
        batch_args = batch if isinstance(batch, tuple) else (batch,)
        if quant_stats is None:
            quant_stats = init_quant_stats(apply_fn, base, *batch_args, config=config, **kwargs)
        quant_stats = update(base, quant_stats, batch_args)
    if quant_stats is None:
        raise ValueError("batches is empty: calibration needs at least one batch")
    return quant_stats

"""Pruning masks: which entries of each leaf to keep, as pure functions of scores.

Masks have the structure of the params. A pruned (selected) leaf's mask is a
bool array of the leaf's shape (True = keep); a leaf left alone has the 0-d
bool array `True` (see `keep_all`), never None, so that mask trees map, jit
and checkpoint like any pytree of arrays.

Exact counts: pruning a fraction `s` of `n` entries removes `round(s * n)`
of them (round half to even, as Python's `round` and
`torch.nn.utils.prune`), lowest scores first; ties go to the lower flat index
(a stable sort), so masks are deterministic.

Leaves are selected by a float (every leaf whose name ends in 'kernel' with
ndim >= 2; nnx.State names end in 'kernel/value') or by rules
`[(regex, sparsity_or_None), ...]` resolved with `jaxcomp.paths.resolve_rules`.
Conv kernels are HWIO and dense kernels [in, out], so the output-channel axis
is -1 and the input-channel axis is -2.

One module of about 800 lines, on purpose: every mask kind (unstructured, N:M,
channel; layer-wise, global, or allocated by LAMP or ERK from
`jaxcomp.prune.allocation`) keeps the exact-count and tie rules above, and they
are checked together.
"""

import functools
import itertools
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.paths import Rules, compile_rules, leaf_names, map_with_names, resolve_rules
from jaxcomp.prune.allocation import erk_pruned_counts, lamp_scores
from jaxcomp.prune.scores import is_selected

METHODS = ("unstructured", "nm", "channel")
# How sparsity is allocated across leaves: each at its target ('layer'), one ranking of
# the scores ('global') or of their LAMP rescaling ('lamp'), ERK densities per leaf ('erk').
SCOPES = ("layer", "global", "lamp", "erk")
# The scopes whose one ranking spans all selected leaves.
ONE_RANKING = ("global", "lamp")
NORMS = ("l1", "l2")
UNMATCHED = ("error", "warn", "ignore")

ChannelGroups = Mapping[str, Sequence[tuple[str, int]]]
SparsityOrRules = float | Rules


def keep_all() -> jax.Array:
    """The mask of a leaf left alone: a 0-d bool array holding True."""
    return jnp.ones((), jnp.bool_)


def validate_sparsity(sparsity: Any, name: str = "sparsity") -> float:
    """Checks that `sparsity` is a number in [0, 1) and returns it as a float.

    Args:
      sparsity: the value to check.
      name: what to call it in the error message.

    Returns:
      `float(sparsity)`.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity}")
    return float(sparsity)


def validate_choice(what: str, value: Any, valid: Sequence[str]) -> None:
    """Raises a ValueError listing `valid` if `value` is not one of them."""
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid values are {list(valid)}")


def validate_nm(n: Any, m: Any) -> None:
    """Checks N:M parameters: integers with m >= 1 and 0 <= n <= m."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"N:M sparsity needs integer n and m, got {name}={value!r}")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(
            f"N:M sparsity keeps n of every m entries and needs 0 <= n <= m and m >= 1, "
            f"got n={n}, m={m}"
        )


def validate_sparsity_or_rules(sparsity_or_rules: Any) -> None:
    """Checks a sparsity, or rules whose regexes compile and values are sparsities or None."""
    if isinstance(sparsity_or_rules, numbers.Real) and not isinstance(sparsity_or_rules, bool):
        validate_sparsity(sparsity_or_rules)
        return
    if isinstance(sparsity_or_rules, str | bytes) or not isinstance(sparsity_or_rules, Sequence):
        raise ValueError(
            "expected a sparsity in [0, 1) or rules [(regex, sparsity_or_None), ...], "
            f"got {sparsity_or_rules!r}"
        )
    for index, (pattern, value) in enumerate(compile_rules(sparsity_or_rules)):
        if value is not None:
            validate_sparsity(value, f"rule {index} ({pattern.pattern!r}) sparsity")


def validate_options(method: str, scope: str, n: int, m: int, norm: str) -> None:
    """Checks the method, scope, N:M and norm options shared by the mask makers."""
    validate_choice("method", method, METHODS)
    validate_choice("norm", norm, NORMS)
    validate_nm(n, m)
    validate_scope(method, scope)


def validate_scope(method: str, scope: str) -> None:
    """Checks that `scope` is one of `SCOPES` and can allocate the sparsity of `method`."""
    validate_choice("scope", scope, SCOPES)
    if method == "nm" and scope == "global":
        raise ValueError("method 'nm' prunes within groups of m entries; use scope='layer'")
    if scope in ("lamp", "erk") and method != "unstructured":
        raise ValueError(
            f"scope {scope!r} allocates sparsity to single weights and needs "
            f"method='unstructured', got method={method!r}; use scope='layer' or 'global'"
        )


def check_masks(params: Any, masks: Any) -> None:
    """Raises a ValueError naming the first leaf where `masks` does not fit `params`.

    Args:
      params: a pytree of arrays.
      masks: a mask tree: the structure of `params`, each leaf a bool array of
        its leaf's shape or a 0-d True.
    """
    if jax.tree.structure(params) != jax.tree.structure(masks):
        param_names, mask_names = leaf_names(params), leaf_names(masks)
        for param_name, mask_name in itertools.zip_longest(param_names, mask_names):
            if param_name != mask_name:
                raise ValueError(
                    "masks do not have the structure of params: first difference at "
                    f"params leaf {param_name!r} vs masks leaf {mask_name!r}; build masks "
                    "from these params (magnitude_masks(params, ...) or Pruner.init(params))"
                )
        raise ValueError(
            "masks have the leaf names of params but other containers: "
            f"{jax.tree.structure(masks)} vs {jax.tree.structure(params)}"
        )
    names = leaf_names(params)
    for name, param, mask in zip(
        names, jax.tree.leaves(params), jax.tree.leaves(masks), strict=True
    ):
        if jnp.result_type(mask) != jnp.bool_:
            raise ValueError(f"mask for leaf {name!r} has dtype {jnp.result_type(mask)}; use bool")
        if jnp.shape(mask) not in ((), jnp.shape(param)):
            raise ValueError(
                f"mask for leaf {name!r} has shape {jnp.shape(mask)} but the leaf has shape "
                f"{jnp.shape(param)}; a mask is a bool array of its leaf's shape or a 0-d True"
            )


def is_default_target(name: str, leaf: Any) -> bool:
    """Whether a float sparsity applies to this leaf: a kernel with ndim >= 2."""
    return (name.endswith("kernel") or name.endswith("kernel/value")) and jnp.ndim(leaf) >= 2


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    return list(zip(leaf_names(tree), jax.tree.leaves(tree), strict=True))


def _report_unmatched(message: str, on_unmatched: str) -> None:
    """Raises or warns, as `on_unmatched` says, that a selection matched nothing."""
    if on_unmatched == "error":
        raise ValueError(message)
    if on_unmatched == "warn":
        warnings.warn(message, stacklevel=3)


def leaf_sparsities(
    params: Any, sparsity_or_rules: SparsityOrRules, *, on_unmatched: str = "error"
) -> Any:
    """Maps each leaf of `params` to its target sparsity, or None to leave it alone.

    Args:
      params: a pytree of arrays.
      sparsity_or_rules: a float for every default target (`is_default_target`),
        or rules `[(regex, sparsity_or_None), ...]` (first match wins).
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no leaf
        (or a float that selects none).

    Returns:
      A tree with the structure of `params` holding floats or None.

    Example:
      >>> leaf_sparsities({"dense": {"kernel": jnp.ones((4, 4))}}, [(".*kernel", 0.5)])
      {'dense': {'kernel': 0.5}}
    """
    validate_sparsity_or_rules(sparsity_or_rules)
    validate_choice("on_unmatched", on_unmatched, UNMATCHED)
    if isinstance(sparsity_or_rules, numbers.Real):
        sparsity = float(sparsity_or_rules)
        targets = map_with_names(
            lambda name, leaf: sparsity if is_default_target(name, leaf) else None, params
        )
        if not any(is_default_target(name, leaf) for name, leaf in _named_leaves(params)):
            _report_unmatched(
                f"sparsity {sparsity} applies to leaves named '...kernel' with ndim >= 2 and "
                f"there are none (leaf names look like {leaf_names(params)[:3]}); pass rules "
                "[(regex, sparsity), ...] to choose leaves",
                on_unmatched,
            )
        return targets
    return resolve_rules(params, sparsity_or_rules, on_unmatched=on_unmatched)


def check_leaf_fits(name: str, shape: tuple[int, ...], method: str, m: int) -> None:
    """Raises a ValueError naming the leaf if `method` cannot prune a leaf of this shape."""
    if method == "unstructured":
        return
    if len(shape) < 2:
        raise ValueError(
            f"leaf {name!r} of shape {shape}: method {method!r} needs ndim >= 2; "
            "leave it alone with a rule (regex, None)"
        )
    if method == "nm":
        _check_nm_axis(shape, m, -2, name)


def _check_nm_axis(shape: tuple[int, ...], m: int, axis: int, name: str | None = None) -> None:
    size = shape[_normalize_axis(axis, shape)]
    if size % m:
        where = f"leaf {name!r} of shape {shape}" if name else f"shape {shape}"
        raise ValueError(
            f"N:M sparsity with m={m} needs axis {axis} of {where} to be divisible by {m}, "
            f"but it has {size} entries; leave such leaves alone with a rule, e.g. depthwise "
            "kernels whose input axis is 1: ('.*depthwise.*', None)"
        )


def _normalize_axis(axis: int, shape: tuple[int, ...], name: str | None = None) -> int:
    if not -len(shape) <= axis < len(shape):
        where = f"leaf {name!r} of shape {shape}" if name else f"shape {shape}"
        raise ValueError(f"axis {axis} is out of range for {where}")
    return axis % len(shape)


def num_to_prune(sparsity: Any, size: int) -> Any:
    """Returns `round(sparsity * size)`, rounding half to even.

    Args:
      sparsity: a number in [0, 1), or a traced float scalar (from a schedule
        under jit; then the product is taken in float32).
      size: the number of entries (or channels) ranked.

    Returns:
      A Python int for a number, an int32 scalar for a traced sparsity.
    """
    if isinstance(sparsity, numbers.Real):
        return round(validate_sparsity(sparsity) * size)
    product = jnp.asarray(sparsity, jnp.float32) * size
    return jnp.clip(jnp.round(product), 0, size).astype(jnp.int32)


@jax.jit
def _keep_top(scores: jax.Array, num_pruned: Any) -> jax.Array:
    """Prunes the `num_pruned` lowest scores (ties: lower flat index first)."""
    flat = jnp.ravel(scores)
    order = jnp.argsort(flat, stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks >= num_pruned).reshape(jnp.shape(scores))


def _keep_top_global(unit_scores: Sequence[jax.Array], num_pruned: Any) -> list[jax.Array]:
    """One ranking across all units: prunes the `num_pruned` lowest scores overall."""
    if not unit_scores:
        return []
    keep = _keep_top(jnp.concatenate([jnp.ravel(scores) for scores in unit_scores]), num_pruned)
    offsets = list(itertools.accumulate(jnp.size(scores) for scores in unit_scores))[:-1]
    return [
        part.reshape(jnp.shape(scores))
        for part, scores in zip(jnp.split(keep, offsets), unit_scores, strict=True)
    ]


def _rank_units(unit_scores: Sequence[jax.Array], counts: Any, scope: str) -> list[jax.Array]:
    """Keeps per unit; `counts` is one count per unit or one in all (`ONE_RANKING` scopes)."""
    if scope in ONE_RANKING:
        return _keep_top_global(unit_scores, counts)
    return [_keep_top(scores, count) for scores, count in zip(unit_scores, counts, strict=True)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _channel_scores(scores: jax.Array, axis: int, norm: str) -> jax.Array:
    """The L1 or L2 norm of |scores| over all axes but `axis`: one score per channel."""
    scores = jnp.asarray(scores)
    axis = _normalize_axis(axis, scores.shape)
    others = tuple(a for a in range(scores.ndim) if a != axis)
    values = jnp.abs(scores).astype(jnp.promote_types(scores.dtype, jnp.float32))
    if norm == "l1":
        return jnp.sum(values, axis=others)
    return jnp.sqrt(jnp.sum(jnp.square(values), axis=others))


def _alive_channels(mask: jax.Array, axis: int) -> jax.Array:
    """Channels along `axis` with at least one kept entry."""
    axis = axis % mask.ndim
    return jnp.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))


def _broadcast_channels(keep: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(keep.reshape(view), shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_keep(scores: jax.Array, n: int, m: int, axis: int) -> jax.Array:
    """Keeps the n highest scores of every m consecutive entries along `axis`."""
    moved = jnp.moveaxis(jnp.asarray(scores), axis, -1)
    grouped = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
    order = jnp.argsort(grouped, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return jnp.moveaxis((ranks >= m - n).reshape(moved.shape), -1, axis)


def _without_pruned(scores: jax.Array, previous: jax.Array | None) -> jax.Array:
    """Gives already-pruned entries the lowest score so that masks only lose entries."""
    if previous is None:
        return scores
    return jnp.where(previous, scores, -jnp.inf)


def _lamp_without_pruned(scores: jax.Array, previous: jax.Array | None) -> jax.Array:
    """LAMP scores of the entries still kept: pruned ones rank lowest and, scored 0
    before rescaling, add nothing to the kept entries' tail sums."""
    if previous is None:
        return lamp_scores(scores)
    return jnp.where(previous, lamp_scores(jnp.where(previous, scores, 0)), -jnp.inf)


def unstructured_mask(scores: jax.Array, sparsity: Any) -> jax.Array:
    """Keeps all but the `round(sparsity * n)` lowest scores.

    Args:
      scores: an array of scores (e.g. |w|).
      sparsity: a number in [0, 1), or a traced float scalar.

    Returns:
      A bool array of `scores`' shape; exactly `round(sparsity * scores.size)`
      entries are False (ties: the lower flat index is pruned first).

    Example:
      >>> unstructured_mask(jnp.array([3.0, 1.0, 2.0, 1.0]), 0.5)
      Array([ True, False,  True, False], dtype=bool)
    """
    return _keep_top(scores, num_to_prune(sparsity, jnp.size(scores)))


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Keeps the n highest scores in every group of m consecutive entries along `axis`.

    Args:
      scores: an array of scores.
      n: entries kept per group.
      m: group size; `scores.shape[axis]` must be divisible by it.
      axis: the axis along which groups run (-2, the input axis of a kernel).

    Returns:
      A bool array of `scores`' shape with exactly n True per group (ties:
      the lower index is pruned first).

    Example:
      >>> nm_mask(jnp.array([[4.0], [1.0], [3.0], [2.0]]), 2, 4).ravel()
      Array([ True, False,  True, False], dtype=bool)
    """
    validate_nm(n, m)
    _check_nm_axis(jnp.shape(scores), m, axis)
    return _nm_keep(scores, n, m, axis)


def channel_mask(scores: jax.Array, sparsity: Any, axis: int = -1, norm: str = "l1") -> jax.Array:
    """Prunes whole channels along `axis`: the `round(sparsity * C)` with the lowest norm.

    Args:
      scores: an array of scores (e.g. |w| of a kernel).
      sparsity: a number in [0, 1), or a traced float scalar.
      axis: the channel axis (-1, the output axis of a kernel).
      norm: 'l1' or 'l2', the norm of a channel's scores over the other axes.

    Returns:
      A bool array of `scores`' shape whose pruned channels are entirely False.
    """
    validate_choice("norm", norm, NORMS)
    shape = jnp.shape(scores)
    axis = _normalize_axis(axis, shape)
    channel_scores = _channel_scores(scores, axis, norm)
    keep = _keep_top(channel_scores, num_to_prune(sparsity, shape[axis]))
    return _broadcast_channels(keep, shape, axis)


def _flatten_scores(scores_tree: Any) -> tuple[list[Any], Any]:
    return jax.tree.flatten(scores_tree, is_leaf=lambda x: x is None)


def _fill(num_leaves: int, picked: Sequence[int], masks: Sequence[jax.Array]) -> list[jax.Array]:
    """A mask for every leaf: `masks` at the `picked` indices, `keep_all()` elsewhere."""
    filled = [keep_all()] * num_leaves
    for index, mask in zip(picked, masks, strict=True):
        filled[index] = mask
    return filled


def global_unstructured_masks(scores_tree: Any, sparsity: Any) -> Any:
    """One ranking across all scored leaves: prunes exactly `round(sparsity * total)`.

    Args:
      scores_tree: a tree with the structure of the params: scores for each
        selected leaf, None for the others (as `score_tree` returns).
      sparsity: a number in [0, 1), or a traced float scalar.

    Returns:
      A mask tree with the structure of the params.
    """
    leaves, treedef = _flatten_scores(scores_tree)
    picked = [index for index, leaf in enumerate(leaves) if leaf is not None]
    scores = [leaves[index] for index in picked]
    total = sum(jnp.size(leaf) for leaf in scores)
    keeps = _keep_top_global(scores, num_to_prune(sparsity, total))
    return jax.tree.unflatten(treedef, _fill(len(leaves), picked, keeps))


def global_channel_masks(
    scores_tree: Any, sparsity: Any, *, axis: int = -1, norm: str = "l1"
) -> Any:
    """One ranking of channels across all scored leaves: prunes `round(sparsity * C_total)`.

    Args:
      scores_tree: scores for each selected leaf, None for the others.
      sparsity: a number in [0, 1), or a traced float scalar.
      axis: the channel axis of every scored leaf (-1, output channels).
      norm: 'l1' or 'l2'.

    Returns:
      A mask tree with the structure of the params; pruned channels are
      entirely False.
    """
    validate_choice("norm", norm, NORMS)
    leaves, treedef = _flatten_scores(scores_tree)
    picked = [index for index, leaf in enumerate(leaves) if leaf is not None]
    channel_scores = [_channel_scores(leaves[index], axis, norm) for index in picked]
    total = sum(int(scores.shape[0]) for scores in channel_scores)
    keeps = _keep_top_global(channel_scores, num_to_prune(sparsity, total))
    masks = [
        _broadcast_channels(keep, jnp.shape(leaves[index]), axis)
        for keep, index in zip(keeps, picked, strict=True)
    ]
    return jax.tree.unflatten(treedef, _fill(len(leaves), picked, masks))


def leaf_masks(
    score_leaves: Sequence[jax.Array | None],
    counts: Any,
    *,
    method: str,
    scope: str,
    n: int,
    m: int,
    norm: str,
    previous: Sequence[jax.Array] | None = None,
) -> list[jax.Array]:
    """The engine behind `magnitude_masks` and the pruner, on flat lists of leaves.

    Args:
      score_leaves: scores per leaf, None for a leaf left alone.
      counts: entries (or channels, for 'channel') to prune: one per scored
        leaf for scopes 'layer' and 'erk', one in all for 'global' and 'lamp';
        ignored for 'nm'.
      method: 'unstructured', 'nm' or 'channel' (output axis -1).
      scope: a name in `SCOPES`; 'lamp' ranks the LAMP scores of `score_leaves`.
      n: N:M entries kept per group.
      m: N:M group size (along axis -2).
      norm: 'l1' or 'l2' channel norm.
      previous: the current masks per leaf; entries they prune stay pruned.

    Returns:
      A mask per leaf (0-d True for leaves left alone).
    """
    picked = [index for index, scores in enumerate(score_leaves) if scores is not None]
    before = [None if previous is None else previous[index] for index in picked]
    scores = [score_leaves[index] for index in picked]
    if method == "nm":
        keeps = [
            _nm_keep(_without_pruned(leaf, prev), n, m, -2)
            for leaf, prev in zip(scores, before, strict=True)
        ]
    elif method == "unstructured":
        rescale = _lamp_without_pruned if scope == "lamp" else _without_pruned
        units = [rescale(leaf, prev) for leaf, prev in zip(scores, before, strict=True)]
        keeps = _rank_units(units, counts, scope)
    else:
        units = [
            _channel_scores(leaf, -1, norm)
            if prev is None
            else jnp.where(_alive_channels(prev, -1), _channel_scores(leaf, -1, norm), -jnp.inf)
            for leaf, prev in zip(scores, before, strict=True)
        ]
        keeps = [
            _broadcast_channels(keep, jnp.shape(leaf), -1)
            for keep, leaf in zip(_rank_units(units, counts, scope), scores, strict=True)
        ]
    return _fill(len(score_leaves), picked, keeps)


def unit_size(shape: tuple[int, ...], method: str) -> int:
    """How many units a leaf ranks: entries, or output channels for 'channel'."""
    if method == "channel":
        return shape[-1]
    size = 1
    for dim in shape:
        size *= dim
    return size


def single_target(targets: Sequence[float | None]) -> float | None:
    """The one sparsity that scopes other than 'layer' allocate; rules must agree on it."""
    values = sorted({target for target in targets if target is not None})
    if len(values) > 1:
        raise ValueError(
            "scopes 'global', 'lamp' and 'erk' allocate one sparsity over all selected leaves, "
            f"but the rules give {values}; use one float, or rules whose values are equal "
            "(or None)"
        )
    return values[0] if values else None


def magnitude_masks(
    params: Any,
    sparsity_or_rules: SparsityOrRules,
    *,
    method: str = "unstructured",
    scope: str = "layer",
    n: int = 2,
    m: int = 4,
    norm: str = "l1",
    on_unmatched: str = "error",
) -> Any:
    """Masks that prune the smallest weights of the selected leaves.

    Args:
      params: a pytree of arrays.
      sparsity_or_rules: a float for every kernel with ndim >= 2, or rules
        `[(regex, sparsity_or_None), ...]`. For 'nm' the values only select
        leaves (the pattern fixes the sparsity at 1 - n/m); for scopes other
        than 'layer' all non-None values must be equal.
      method: 'unstructured', 'nm' (n of every m along the input axis -2) or
        'channel' (whole output channels, axis -1).
      scope: 'layer' (each leaf at its sparsity), 'global' (one ranking),
        'lamp' (one ranking of LAMP scores) or 'erk' (ERK sparsity per leaf);
        the last two for 'unstructured' only.
      n: N:M entries kept per group.
      m: N:M group size.
      norm: 'l1' or 'l2' channel norm.
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no leaf.

    Returns:
      A mask tree with the structure of `params`.

    Example:
      >>> masks = magnitude_masks({"dense": {"kernel": jnp.ones((4, 4))}}, 0.5)
      >>> int(masks["dense"]["kernel"].sum())
      8
    """
    validate_options(method, scope, n, m, norm)
    targets_tree = leaf_sparsities(params, sparsity_or_rules, on_unmatched=on_unmatched)
    leaves, treedef = jax.tree.flatten(params)
    targets = treedef.flatten_up_to(targets_tree)
    picked = [index for index, target in enumerate(targets) if is_selected(target)]
    names = leaf_names(params)
    for index in picked:
        check_leaf_fits(names[index], jnp.shape(leaves[index]), method, m)
    sizes = [unit_size(jnp.shape(leaves[index]), method) for index in picked]
    if scope == "layer":
        counts = [round(targets[index] * size) for index, size in zip(picked, sizes, strict=True)]
    else:
        target = single_target([targets[index] for index in picked]) or 0.0
        if scope == "erk":
            counts = erk_pruned_counts([jnp.shape(leaves[index]) for index in picked], target)
        else:
            counts = round(target * sum(sizes))
    chosen = set(picked)
    score_leaves = [jnp.abs(leaf) if i in chosen else None for i, leaf in enumerate(leaves)]
    masks = leaf_masks(score_leaves, counts, method=method, scope=scope, n=n, m=m, norm=norm)
    return jax.tree.unflatten(treedef, masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes the entries of `params` where `masks` is False, keeping each leaf's dtype.

    Args:
      params: a pytree of arrays.
      masks: a mask tree with the structure of `params` (checked first; the
        error names the first leaf that does not fit).

    Returns:
      The masked params.
    """
    check_masks(params, masks)
    return jax.tree.map(
        lambda param, mask: jnp.where(mask, param, jnp.zeros((), jnp.result_type(param))),
        params,
        masks,
    )


class ChannelGroup(NamedTuple):
    """A validated channel group: leaf indices and non-negative axes of its members."""

    name: str
    members: tuple[tuple[int, int], ...]
    size: int


def subtree_groups(groups: ChannelGroups, prefix: str = "params/") -> dict[str, list]:
    """Restricts channel groups named relative to a Flax variables dict to one collection.

    Args:
      groups: `{group_name: [(leaf_name, axis), ...]}` with names such as
        'params/backbone/stem/conv/kernel'.
      prefix: the collection prefix to strip ('params/' or 'batch_stats/').

    Returns:
      The groups with `prefix` stripped and members outside it dropped; a
      group left with no member is dropped.

    Example:
      >>> subtree_groups({"g": [("params/c/kernel", -1), ("batch_stats/bn/mean", 0)]})
      {'g': [('c/kernel', -1)]}
    """
    result = {}
    for name, members in groups.items():
        kept = [(leaf[len(prefix) :], axis) for leaf, axis in members if leaf.startswith(prefix)]
        if kept:
            result[name] = kept
    return result


def resolve_groups(
    names: Sequence[str], shapes: Sequence[tuple[int, ...]], groups: ChannelGroups
) -> list[ChannelGroup]:
    """Checks channel groups against the leaves of a params tree.

    Args:
      names: the leaf names of the params (`jaxcomp.paths.leaf_names`).
      shapes: the leaf shapes, in the same order.
      groups: `{group_name: [(leaf_name, axis), ...]}`, the first member being
        the producing kernel whose filters are scored.

    Returns:
      One `ChannelGroup` per group, in the order of `groups`.
    """
    if not isinstance(groups, Mapping):
        raise ValueError(
            f"channel groups must be a dict name -> [(leaf, axis), ...], got {groups!r}"
        )
    index_of = {name: index for index, name in enumerate(names)}
    resolved = []
    for group_name, members in groups.items():
        if not members:
            raise ValueError(f"channel group {group_name!r} has no members")
        indexed = []
        for member in members:
            valid = isinstance(member, tuple | list) and len(member) == 2
            if not (valid and isinstance(member[0], str) and isinstance(member[1], int)):
                raise ValueError(
                    f"channel group {group_name!r}: members must be (leaf_name, axis) pairs, "
                    f"got {member!r}"
                )
            leaf, axis = member
            if leaf not in index_of:
                raise ValueError(
                    f"channel group {group_name!r}: no leaf named {leaf!r}; leaf names look like "
                    f"{list(names[:3])} (names relative to a Flax variables dict need "
                    "subtree_groups(groups, 'params/'))"
                )
            index = index_of[leaf]
            indexed.append((index, _normalize_axis(axis, shapes[index], leaf)))
        (first_leaf, first_axis), (first_index, first_norm) = members[0], indexed[0]
        size = shapes[first_index][first_norm]
        for (leaf, axis), (index, normalized) in zip(members, indexed, strict=True):
            if shapes[index][normalized] != size:
                raise ValueError(
                    f"channel group {group_name!r}: {leaf!r} has {shapes[index][normalized]} "
                    f"entries along axis {axis} but {first_leaf!r} has {size} along axis "
                    f"{first_axis}; members of a group must share one channel axis"
                )
        resolved.append(ChannelGroup(group_name, tuple(indexed), size))
    return resolved


def group_sparsities(
    group_names: Sequence[str], sparsity_or_rules: SparsityOrRules, *, on_unmatched: str = "error"
) -> list[float | None]:
    """Each group's target sparsity: a float for all, or rules matched against group names."""
    validate_sparsity_or_rules(sparsity_or_rules)
    if isinstance(sparsity_or_rules, numbers.Real):
        return [float(sparsity_or_rules)] * len(group_names)
    by_name = resolve_rules(
        {name: 0 for name in group_names}, sparsity_or_rules, on_unmatched=on_unmatched
    )
    return [by_name[name] for name in group_names]


def group_masks(
    shapes: Sequence[tuple[int, ...]],
    score_leaves: Sequence[jax.Array | None],
    groups: Sequence[ChannelGroup],
    counts: Any,
    *,
    scope: str,
    norm: str,
    previous: Sequence[jax.Array] | None = None,
) -> list[jax.Array]:
    """The engine behind `channel_group_masks` and the pruner, on flat lists of leaves.

    Args:
      shapes: every leaf's shape.
      score_leaves: per leaf, the scores of a group's first member (others unused).
      groups: the selected groups.
      counts: channels to prune, one per group ('layer') or one in all ('global').
      scope: 'layer' or 'global'.
      norm: 'l1' or 'l2'.
      previous: the current masks per leaf; channels they prune stay pruned.

    Returns:
      A mask per leaf: pruned channels False in every member, 0-d True for a
      leaf in no selected group.
    """
    units = []
    for group in groups:
        index, axis = group.members[0]
        channel_scores = _channel_scores(score_leaves[index], axis, norm)
        if previous is not None:
            alive = _alive_channels(previous[index], axis)
            channel_scores = jnp.where(alive, channel_scores, -jnp.inf)
        units.append(channel_scores)
    masks: list[jax.Array | None] = [None] * len(shapes)
    for group, keep in zip(groups, _rank_units(units, counts, scope), strict=True):
        for index, axis in group.members:
            member_mask = _broadcast_channels(keep, shapes[index], axis)
            masks[index] = member_mask if masks[index] is None else masks[index] & member_mask
    return [keep_all() if mask is None else mask for mask in masks]


def channel_group_masks(
    params: Any,
    groups: ChannelGroups,
    sparsity_or_rules: SparsityOrRules,
    *,
    norm: str = "l1",
    scope: str = "layer",
    scores: Any = None,
    on_unmatched: str = "error",
) -> Any:
    """Prunes coupled channels: the same channels of every member of a group.

    Args:
      params: a pytree of arrays.
      groups: `{group_name: [(leaf_name, axis), ...]}` (see `subtree_groups`
        for names relative to a Flax variables dict); the first member's
        filters are scored.
      sparsity_or_rules: a float for every group, or rules matched against
        group names (None leaves a group alone); for scope 'global' all
        non-None values must be equal.
      norm: 'l1' or 'l2', the norm of a channel's scores.
      scope: 'layer' (each group at its sparsity) or 'global' (one ranking
        over all selected groups' channels).
      scores: optional scores tree (`score_tree`); defaults to |params|.
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match no group.

    Returns:
      A mask tree with the structure of `params`.
    """
    validate_choice("norm", norm, NORMS)
    validate_scope("channel", scope)
    leaves, treedef = jax.tree.flatten(params)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    resolved = resolve_groups(leaf_names(params), shapes, groups)
    targets = group_sparsities(
        [g.name for g in resolved], sparsity_or_rules, on_unmatched=on_unmatched
    )
    chosen = [(g, t) for g, t in zip(resolved, targets, strict=True) if t is not None]
    score_leaves = list(leaves) if scores is None else treedef.flatten_up_to(scores)
    score_leaves = [
        s if s is not None else leaf for s, leaf in zip(score_leaves, leaves, strict=True)
    ]
    if scope == "global":
        target = single_target([t for _, t in chosen]) or 0.0
        counts = round(target * sum(g.size for g, _ in chosen))
    else:
        counts = [round(t * g.size) for g, t in chosen]
    masks = group_masks(
        shapes, score_leaves, [g for g, _ in chosen], counts, scope=scope, norm=norm
    )
    return jax.tree.unflatten(treedef, masks)

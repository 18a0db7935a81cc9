"""Gradual pruning during training, optax style: a pruner and a pruning optimizer wrapper.

`make_pruner` returns a `Pruner` (`init`, `update`) whose state holds the masks;
`pruned_optimizer` wraps any optax optimizer so that the masks live in the
optimizer state and the ordinary `optax.apply_updates` leaves the params exactly
masked: no call to remember after the update, and one checkpoint of the
optimizer state restores the masks.

Per-leaf sparsity over time: with a float, every selected leaf follows the
schedule; with rules, a leaf whose target is `s_leaf` is pruned at step t to
`schedule.sparsity(t) * s_leaf / schedule.final_sparsity`, reaching exactly
`round(s_leaf * n)` pruned entries at the end (a float acts as that target for
every default-selected leaf). With the other scopes the float or the rules only
select leaves and `schedule.final_sparsity` is allocated over all of them: with
'global' one ranking of the scores follows `schedule.sparsity(t)`, with 'lamp'
one ranking of their LAMP rescaling (`allocation.lamp_scores`; magnitude scores
only), and with 'erk' each leaf gets its ERK share (`allocation.erk_pruned_counts`)
as its target and is scaled like a rule's target.

Masks are monotone: entries pruned at one update stay pruned at the next (they
are ranked lowest), so under a non-decreasing schedule masks only lose entries.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcomp.paths import leaf_names
from jaxcomp.prune.allocation import erk_pruned_counts
from jaxcomp.prune.masks import (
    ONE_RANKING,
    UNMATCHED,
    ChannelGroup,
    ChannelGroups,
    SparsityOrRules,
    apply_masks,
    check_leaf_fits,
    group_masks,
    group_sparsities,
    keep_all,
    leaf_masks,
    leaf_sparsities,
    resolve_groups,
    unit_size,
    validate_choice,
    validate_options,
    validate_sparsity,
    validate_sparsity_or_rules,
)
from jaxcomp.prune.schedules import Schedule
from jaxcomp.prune.scores import ScoreFn, get_score, is_selected, magnitude_score


class PrunerState(NamedTuple):
    """The state of a pruner.

    Attributes:
      masks: a mask tree with the structure of the params.
      count: int32 scalar, the number of updates done so far.
      key: the raw uint32 data of the PRNG key (`jax.random.key_data`), zeros
        when no key was given; typed keys do not checkpoint with orbax.
    """

    masks: Any
    count: jax.Array
    key: jax.Array


class Pruner(NamedTuple):
    """A pruner: `init(params, key=None) -> state`, `update(params, state, grads=None)`.

    `update` returns `(masked_params, new_state)`; it recomputes the masks on
    the schedule's update steps and counts one update per call.
    """

    init: Callable[..., PrunerState]
    update: Callable[..., tuple[Any, PrunerState]]


class PrunedOptState(NamedTuple):
    """The state of `pruned_optimizer`: the inner optimizer's state and the pruner's."""

    inner_state: Any
    pruner_state: PrunerState


class _Plan(NamedTuple):
    """What the pruner does to one params tree, decided from names and shapes alone."""

    treedef: Any
    shapes: list[tuple[int, ...]]
    masked: frozenset[int]
    scored: frozenset[int]
    targets: list[float]
    sizes: list[int]
    groups: list[ChannelGroup] | None


def _scheduled_count(sparsity: jax.Array, target: float, size: int, final: float) -> jax.Array:
    """Units to prune at schedule sparsity `sparsity`, exactly `round(target * size)` at the end."""
    final_count = round(target * size)
    if final == 0.0 or final_count == 0:
        return jnp.zeros((), jnp.int32)
    count = jnp.round(sparsity * jnp.float32(target * size / final))
    count = jnp.clip(count, 0, final_count).astype(jnp.int32)
    return jnp.where(sparsity >= jnp.float32(final), jnp.int32(final_count), count)


def _raw_key(key: Any) -> jax.Array:
    """The uint32 data of `key` (a typed key or raw key data) for the default PRNG."""
    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key such as jax.random.key(0), got dtype {key.dtype}")
    try:
        jax.random.wrap_key_data(key)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"key data of shape {key.shape} is not a key of the default PRNG: {error}"
        ) from error
    return key


def make_pruner(
    sparsity_or_rules: SparsityOrRules,
    schedule: Schedule,
    *,
    method: str = "unstructured",
    score: str | ScoreFn = "magnitude",
    scope: str = "layer",
    n: int = 2,
    m: int = 4,
    norm: str = "l1",
    channel_groups: ChannelGroups | None = None,
    on_unmatched: str = "error",
) -> Pruner:
    """Builds a pruner that prunes the selected leaves along `schedule`.

    Args:
      sparsity_or_rules: a float target for every kernel with ndim >= 2, or
        rules `[(regex, sparsity_or_None), ...]` (see the module docstring for
        how targets scale with the schedule); with `channel_groups` the rules
        match group names.
      schedule: a `Schedule` (`jaxcomp.prune.schedules`).
      method: 'unstructured', 'nm' (the N:M pattern from the schedule's first
        update step on; the schedule's sparsity is otherwise ignored) or
        'channel' (whole output channels, axis -1, or coupled channels with
        `channel_groups`).
      score: a name in `jaxcomp.prune.scores.SCORES` or a score function.
      scope: how the sparsity is allocated across leaves: 'layer' (each leaf
        or group at its target), 'global' (one ranking), 'lamp' (one ranking of
        LAMP scores; score 'magnitude' only) or 'erk' (ERK share per leaf);
        'lamp' and 'erk' for method 'unstructured' only.
      n: N:M entries kept per group.
      m: N:M group size (along the input axis -2).
      norm: 'l1' or 'l2' channel norm.
      channel_groups: `{group_name: [(leaf_name, axis), ...]}` for method
        'channel', names relative to the params (see `subtree_groups`).
      on_unmatched: 'error', 'warn' or 'ignore' for rules that match nothing.

    Returns:
      A `Pruner`.

    Example:
      >>> pruner = make_pruner(0.5, one_shot_schedule(0.5))
      >>> state = pruner.init(params)
      >>> params, state = pruner.update(params, state)
    """
    validate_options(method, scope, n, m, norm)
    score_fn = get_score(score)
    if scope == "lamp" and score_fn is not magnitude_score:
        raise ValueError(
            "scope='lamp' rescales squared weight magnitudes (Lee et al. 2021) and needs "
            f"score='magnitude', got score={score!r}; rank other scores with scope='global' "
            "or 'erk'"
        )
    validate_sparsity_or_rules(sparsity_or_rules)
    validate_choice("on_unmatched", on_unmatched, UNMATCHED)
    if not isinstance(schedule, Schedule):
        raise ValueError(
            f"schedule must be a Schedule (e.g. polynomial_schedule(...)), got {schedule!r}"
        )
    final = validate_sparsity(schedule.final_sparsity, "schedule.final_sparsity")
    if channel_groups is not None:
        if method != "channel":
            raise ValueError(f"channel_groups need method='channel', got method={method!r}")
        if not isinstance(channel_groups, Mapping):
            raise ValueError(
                f"channel_groups must be a dict name -> [(leaf, axis), ...], got {channel_groups!r}"
            )

    def plan(params: Any) -> _Plan:
        leaves, treedef = jax.tree.flatten(params)
        names = leaf_names(params)
        shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
        if channel_groups is None:
            per_leaf = treedef.flatten_up_to(
                leaf_sparsities(params, sparsity_or_rules, on_unmatched=on_unmatched)
            )
            picked = [index for index, target in enumerate(per_leaf) if is_selected(target)]
            for index in picked:
                check_leaf_fits(names[index], shapes[index], method, m)
            sizes = [unit_size(shapes[index], method) for index in picked]
            if scope == "erk":
                pruned = erk_pruned_counts([shapes[index] for index in picked], final)
                targets = [count / size for count, size in zip(pruned, sizes, strict=True)]
            else:
                targets = [per_leaf[index] for index in picked]
            chosen = frozenset(picked)
            return _Plan(treedef, shapes, chosen, chosen, targets, sizes, None)
        groups = resolve_groups(names, shapes, channel_groups)
        per_group = group_sparsities(
            [group.name for group in groups], sparsity_or_rules, on_unmatched=on_unmatched
        )
        picked_groups = [(g, t) for g, t in zip(groups, per_group, strict=True) if t is not None]
        masked = frozenset(index for g, _ in picked_groups for index, _ in g.members)
        scored = frozenset(g.members[0][0] for g, _ in picked_groups)
        targets = [t for _, t in picked_groups]
        sizes = [g.size for g, _ in picked_groups]
        return _Plan(treedef, shapes, masked, scored, targets, sizes, [g for g, _ in picked_groups])

    def counts(the_plan: _Plan, sparsity: jax.Array) -> Any:
        if scope in ONE_RANKING:
            return _scheduled_count(sparsity, final, sum(the_plan.sizes), final)
        return [
            _scheduled_count(sparsity, target, size, final)
            for target, size in zip(the_plan.targets, the_plan.sizes, strict=True)
        ]

    def new_masks(the_plan: _Plan, params: Any, state: PrunerState, grads: Any) -> Any:
        leaves = the_plan.treedef.flatten_up_to(params)
        grad_leaves = (
            [None] * len(leaves) if grads is None else the_plan.treedef.flatten_up_to(grads)
        )
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        score_leaves = [
            score_fn(leaf, grad, jax.random.fold_in(key, index))
            if index in the_plan.scored
            else None
            for index, (leaf, grad) in enumerate(zip(leaves, grad_leaves, strict=True))
        ]
        previous = the_plan.treedef.flatten_up_to(state.masks)
        sparsity = schedule.sparsity(state.count)
        if the_plan.groups is None:
            masks = leaf_masks(
                score_leaves,
                counts(the_plan, sparsity),
                method=method,
                scope=scope,
                n=n,
                m=m,
                norm=norm,
                previous=previous,
            )
        else:
            masks = group_masks(
                the_plan.shapes,
                score_leaves,
                the_plan.groups,
                counts(the_plan, sparsity),
                scope=scope,
                norm=norm,
                previous=previous,
            )
        return the_plan.treedef.unflatten(masks)

    def init_fn(params: Any, key: jax.Array | None = None) -> PrunerState:
        the_plan = plan(params)
        if the_plan.scored:
            probe = jax.ShapeDtypeStruct(the_plan.shapes[min(the_plan.scored)], jnp.float32)
            jax.eval_shape(lambda leaf: score_fn(leaf, leaf, key), probe)
        key_data = jnp.zeros((2,), jnp.uint32) if key is None else _raw_key(key)
        masks = [
            jnp.ones(shape, jnp.bool_) if index in the_plan.masked else keep_all()
            for index, shape in enumerate(the_plan.shapes)
        ]
        return PrunerState(the_plan.treedef.unflatten(masks), jnp.zeros((), jnp.int32), key_data)

    def update_fn(params: Any, state: PrunerState, grads: Any = None) -> tuple[Any, PrunerState]:
        the_plan = plan(params)
        masks = jax.lax.cond(
            schedule.is_update_step(state.count),
            lambda: new_masks(the_plan, params, state, grads),
            lambda: state.masks,
        )
        count = jnp.asarray(state.count, jnp.int32) + 1
        return apply_masks(params, masks), PrunerState(masks, count, state.key)

    return Pruner(init_fn, update_fn)


def pruned_optimizer(
    inner: optax.GradientTransformation,
    pruner: Pruner,
    *,
    key: jax.Array | None = None,
    score_inputs: Callable[[dict[str, Any]], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that `optax.apply_updates` leaves the params pruned.

    `update(grads, state, params)` zeroes the gradients of pruned weights, runs
    `inner`, recomputes the masks from `params + updates` on the schedule's
    update steps (with the raw gradients, for saliency) and returns
    `where(mask, updates, -params)`: after `optax.apply_updates` pruned entries
    are exactly 0.0 and kept entries exactly `params + updates` of `inner`.

    Args:
      inner: any optax optimizer (e.g. an `optax.chain`).
      pruner: a `Pruner` from `make_pruner`.
      key: the PRNG key for scores that need one (the 'random' score).
      score_inputs: what the score reads in place of the gradients, taken from
        the update's extra arguments (a stateful score's accumulated sums);
        None: the raw gradients.

    Returns:
      An optax transformation whose state is a `PrunedOptState`.

    Example:
      >>> tx = pruned_optimizer(optax.adamw(1e-3), make_pruner(0.8, schedule))
      >>> opt_state = tx.init(params)
      >>> updates, opt_state = tx.update(grads, opt_state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> PrunedOptState:
        return PrunedOptState(inner.init(params), pruner.init(params, key))

    def update_fn(
        grads: Any, state: PrunedOptState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, PrunedOptState]:
        if params is None:
            raise ValueError(
                "pruned_optimizer needs the params: call tx.update(grads, opt_state, params)"
            )
        masked_grads = apply_masks(grads, state.pruner_state.masks)
        updates, inner_state = inner.update(masked_grads, state.inner_state, params, **extra_args)
        candidate = optax.apply_updates(params, updates)
        scored = grads if score_inputs is None else score_inputs(extra_args)
        _, pruner_state = pruner.update(candidate, state.pruner_state, scored)
        updates = jax.tree.map(
            lambda update, param, mask: jnp.where(
                mask, update, jnp.negative(param).astype(jnp.result_type(update))
            ),
            updates,
            params,
            pruner_state.masks,
        )
        return updates, PrunedOptState(inner_state, pruner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pruner_state_of(opt_state: Any) -> PrunerState:
    """Finds the `PrunerState` inside an optimizer state (e.g. of an `optax.chain`).

    Args:
      opt_state: any pytree holding one `PrunedOptState`.

    Returns:
      Its `pruner_state`.
    """
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PrunedOptState))
        if isinstance(node, PrunedOptState)
    ]
    if not found:
        raise ValueError(
            "no PrunedOptState in this optimizer state; build the optimizer with "
            "pruned_optimizer(inner, pruner)"
        )
    return found[0].pruner_state


def masks_of(opt_state: Any) -> Any:
    """The pruning masks inside an optimizer state built with `pruned_optimizer`."""
    return pruner_state_of(opt_state).masks

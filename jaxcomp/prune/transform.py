"""Pruning as a compression method (`jaxcomp.transforms.Transform`).

The masks live in the optimizer state (`pruned_optimizer`), so a checkpoint holds
them and pruned weights stay exactly zero. A stateful score (movement) keeps its
running sums in the method's state and hands them to the pruner through the
optimizer's extra arguments. Channel pruning exports the physically smaller model.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from jaxcomp import paths, transforms
from jaxcomp.prune.masks import subtree_groups
from jaxcomp.prune.pruner import Pruner, make_pruner, pruned_optimizer
from jaxcomp.prune.schedules import SCHEDULES, Schedule
from jaxcomp.prune.scores import SCORES, StatefulScore
from jaxcomp.prune.shrink import channel_keep_indices, group_widths, shrink_tree


def pruning(
    pruner: Pruner,
    *,
    key: jax.Array | None = None,
    stateful_score: StatefulScore | None = None,
    shrink: Callable[[Any], transforms.Export] | None = None,
    name: str = "prune",
) -> transforms.Transform:
    """A method that prunes the model's parameters with `pruner` inside the optimizer.

    Args:
      pruner: from `make_pruner` (its score is `stateful_score.score` when given).
      key: PRNG key for scores that sample (the 'random' score).
      stateful_score: a score whose running sums are this method's state.
      shrink: `variables -> Export` of the smaller model (channel pruning).
      name: the method's name in the train state (where the optimizer finds the sums).

    Returns:
      The `Transform`.
    """

    def init(variables, key):
        del key
        if stateful_score is None:
            return {}
        return {"scores": stateful_score.init(variables["params"])}

    def optimizer(tx):
        score_inputs = None
        if stateful_score is not None:

            def score_inputs(extra_args):
                return extra_args["method_states"][name]["scores"]

        return pruned_optimizer(tx, pruner, key=key, score_inputs=score_inputs)

    def update(view, info):
        if stateful_score is None or info.grads is None:
            return view.state, view.params
        scores = stateful_score.update(view.state["scores"], info.params, info.grads)
        return {"scores": scores}, view.params

    def export(view, inputs):
        del view
        return {} if shrink is None else {"shrunk": shrink(inputs.variables)}

    return transforms.Transform(init=init, optimizer=optimizer, update=update, export=export)


def prune_end_step(config: ml_collections.ConfigDict) -> int:
    """The step where the pruning schedule reaches its final sparsity (default 3/4 of training)."""
    if config.prune.end_step is None:
        return max(config.prune.begin_step + 1, 3 * config.train.steps // 4)
    return config.prune.end_step


def make_schedule(settings: ml_collections.ConfigDict, end_step: int) -> Schedule:
    """The sparsity schedule `settings.schedule` (a key of `SCHEDULES`) over
    [settings.begin_step, end_step]."""
    begin = settings.begin_step
    if settings.schedule == "one_shot":
        return SCHEDULES["one_shot"](settings.sparsity, begin)
    if settings.schedule == "iterative":
        return SCHEDULES["iterative"](settings.sparsity, begin, end_step, settings.num_prunes)
    return SCHEDULES[settings.schedule](settings.sparsity, begin, end_step, settings.frequency)


def rules_of(settings: ml_collections.ConfigDict, names: list[str], default_rules: Callable):
    """`settings.rules`, or the model's defaults when it is None."""
    if settings.rules is not None:
        return tuple(tuple(rule) for rule in settings.rules)
    return default_rules(settings.method, settings.sparsity, names)


def from_config(config: ml_collections.ConfigDict, context) -> transforms.Transform | None:
    """The pruning method of `config.prune` (None for method 'none').

    Args:
      config: the experiment config.
      context: a `jaxcomp.methods.MethodContext`.
    """
    settings = config.prune
    if settings.method == "none":
        return None
    params = context.variables["params"]
    names = paths.leaf_names(params)
    groups = shrink = None
    if settings.method == "channel":
        groups = subtree_groups(context.channel_groups(context.variables), "params/")
        names = list(groups)
        shrink = _shrinker(context)
    score = SCORES[settings.score]
    stateful = score if isinstance(score, StatefulScore) else None
    pruner = make_pruner(
        rules_of(settings, names, context.prune_rules),
        make_schedule(settings, prune_end_step(config)),
        method=settings.method,
        score=score,
        scope=settings.scope,
        n=settings.n,
        m=settings.m,
        norm=settings.norm,
        channel_groups=groups,
    )
    # Every score gets a key (scores other than 'random' ignore it), so a newly
    # registered score that samples has one.
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return pruning(pruner, key=key, stateful_score=stateful, shrink=shrink)


def _shrinker(context) -> Callable[[Mapping[str, Any]], transforms.Export]:
    """`variables -> Export` of the model without its all-zero channels."""

    def shrink(variables):
        groups = context.channel_groups(variables)
        keep = channel_keep_indices(variables, groups)
        widths = group_widths(keep)
        model = context.rebuild(widths)
        return transforms.Export(
            tree=shrink_tree(variables, groups, keep),
            apply=lambda tree, images: model.apply(tree, images, train=False),
            model=model,
            info={"channels": sorted(widths.items())},
        )

    return shrink

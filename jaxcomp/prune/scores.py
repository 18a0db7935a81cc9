"""Importance scores for pruning: which weights matter least.

A score function is `fn(param, grad, key) -> array of param's shape`; `grad` and
`key` may be None when the score does not use them. Lower scores are pruned
first. Adding a score is one small function and one line in `SCORES`.

A scores tree has the structure of the params: an array for each selected leaf
and `None` for a leaf left alone.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcomp.prune import movement

ScoreFn = Callable[[jax.Array, jax.Array | None, jax.Array | None], jax.Array]


class StatefulScore(NamedTuple):
    """A score that accumulates over training steps (movement pruning).

    Its running sums are the pruning method's state; at each mask update the pruner
    scores a leaf as `score(param, accumulated_leaf, key)`.

    Attributes:
      init: `params -> accumulated` (a tree with the params' structure).
      update: `(accumulated, params, grads) -> accumulated`, once per train step.
      score: a `ScoreFn` reading the accumulated leaf in place of the gradient.
    """

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], Any]
    score: ScoreFn


def magnitude_score(param: jax.Array, grad: jax.Array | None, key: jax.Array | None) -> jax.Array:
    """Scores each weight by its magnitude |w|."""
    del grad, key
    return jnp.abs(param)


def random_score(param: jax.Array, grad: jax.Array | None, key: jax.Array | None) -> jax.Array:
    """Scores each weight uniformly at random in [0, 1), drawn from `key`."""
    del grad
    if key is None:
        raise ValueError("the random score needs a PRNG key; pass key= to init")
    return jax.random.uniform(key, jnp.shape(param), jnp.float32)


def saliency_score(param: jax.Array, grad: jax.Array | None, key: jax.Array | None) -> jax.Array:
    """Scores each weight by |w * g|, the first-order change of the loss if it is removed."""
    del key
    if grad is None:
        raise ValueError(
            "the saliency score |w * g| needs gradients; pass grads= to the pruner's update "
            "(pruned_optimizer does this for you)"
        )
    return jnp.abs(param * grad)


SCORES: dict[str, ScoreFn | StatefulScore] = {
    "magnitude": magnitude_score,
    "random": random_score,
    "saliency": saliency_score,
    "movement": StatefulScore(movement.init, movement.accumulate, movement.score),
}


def get_score(score: str | ScoreFn) -> ScoreFn:
    """Returns the score function named `score` in `SCORES` (or `score` if it is callable).

    Args:
      score: a name in `SCORES` or a score function.

    Returns:
      The score function.
    """
    if isinstance(score, StatefulScore):
        return score.score
    if callable(score):
        return score
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid scores are {sorted(SCORES)}")
    return get_score(SCORES[score])


def is_selected(value: Any) -> bool:
    """Whether a value of a selection tree selects its leaf (None and False do not)."""
    return value is not None and value is not False


def score_tree(
    params: Any,
    selected: Any,
    score: str | ScoreFn,
    grads: Any = None,
    key: jax.Array | None = None,
) -> Any:
    """Scores the selected leaves of `params`.

    Args:
      params: a pytree of arrays.
      selected: a tree with the structure of `params` (e.g. from
        `jaxcomp.paths.resolve_rules`); a leaf is scored unless its value is
        None or False.
      score: a name in `SCORES` or a score function.
      grads: gradients with the structure of `params`, or None.
      key: a PRNG key, or None; leaf i gets `jax.random.fold_in(key, i)` so that
        leaves draw independent random scores.

    Returns:
      A tree with the structure of `params`: the scores of each selected leaf,
      None for the others.

    Example:
      >>> scores = score_tree({"kernel": jnp.array([[-2.0, 1.0]])}, {"kernel": True}, "magnitude")
    """
    score_fn = get_score(score)
    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(selected)
    grad_leaves = [None] * len(leaves) if grads is None else treedef.flatten_up_to(grads)
    scores = []
    for index, (leaf, flag, grad) in enumerate(zip(leaves, flags, grad_leaves, strict=True)):
        if not is_selected(flag):
            scores.append(None)
            continue
        leaf_key = None if key is None else jax.random.fold_in(key, index)
        scores.append(score_fn(leaf, grad, leaf_key))
    return jax.tree.unflatten(treedef, scores)

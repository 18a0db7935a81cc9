"""Movement pruning (Sanh et al., "Movement Pruning", NeurIPS 2020) as a stateful score.

The score of a weight is its accumulated movement away from zero, `S = -sum_t w_t *
g_t` over the steps so far: weights that the gradient pushes towards zero score low
and are pruned first, whatever their magnitude. The sum is the method's state
(checkpointed with the run); registered as `prune.SCORES['movement']`.
"""

from typing import Any

import jax
import jax.numpy as jnp


def init(params: Any) -> Any:
    """Zero accumulated movement for every leaf (float32, the params' structure)."""
    return jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.float32), params)


def accumulate(scores: Any, params: Any, grads: Any) -> Any:
    """`scores - params * grads`: one step's movement added (gradients before masking)."""
    return jax.tree.map(
        lambda score, param, grad: score - (param * grad).astype(jnp.float32),
        scores,
        params,
        grads,
    )


def score(param: jax.Array, accumulated: jax.Array, key: jax.Array | None) -> jax.Array:
    """The pruner's score of a leaf: its accumulated movement (lower is pruned first)."""
    del param, key
    return accumulated

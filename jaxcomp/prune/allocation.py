"""How much of each layer to prune when one sparsity is set for many: LAMP and ERK.

LAMP (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning",
ICLR 2021) rescales each leaf's squared magnitudes so that one global ranking
of the rescaled scores prunes by a bound on the distortion of the model's
output, not by magnitude alone. ERK (the Erdős–Rényi-Kernel allocation of Evci et al., "Rigging the
lottery", ICML 2020) fixes each leaf's density from its shape alone, more for
layers with few weights per input and output.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@jax.jit
def lamp_scores(scores: jax.Array) -> jax.Array:
    """The LAMP score of every entry of one leaf: `s_u^2 / sum(s_v^2 for v >= u)`.

    `v >= u` runs over the entries at or after `u` in ascending order of `s^2`
    (ties: the lower flat index first, as the masks break them), so the largest
    entry of every leaf scores 1. An entry whose tail sum is 0 scores 0.

    Args:
      scores: a leaf's scores: its weights or their magnitudes (the same result).

    Returns:
      Float scores of `scores`' shape, in (0, 1] where `scores` is non-zero.

    Example:
      >>> lamp_scores(jnp.array([2.0, 1.0]))
      Array([1. , 0.2], dtype=float32)
    """
    flat = jnp.ravel(scores).astype(jnp.promote_types(scores.dtype, jnp.float32))
    order = jnp.argsort(jnp.square(flat), stable=True)
    squares = jnp.square(flat[order])
    tails = jnp.cumsum(squares[::-1])[::-1]
    ranked = jnp.where(tails > 0, squares / jnp.where(tails > 0, tails, 1), 0)
    return jnp.zeros_like(ranked).at[order].set(ranked).reshape(jnp.shape(scores))


def erk_densities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """The fraction of each leaf that the Erdős–Rényi-Kernel allocation keeps.

    Leaf i keeps `eps * sum(shape_i) / prod(shape_i)` of its entries (for a conv
    kernel (kh, kw, cin, cout): `(kh + kw + cin + cout) / (kh * kw * cin * cout)`),
    with one `eps` for all leaves such that they keep `(1 - sparsity) * total`
    entries. A leaf whose density would exceed 1 is kept dense and `eps` is solved
    again for the others, until none exceeds 1 (RigL's
    `sparse_utils.get_sparsities_erdos_renyi`). A kernel counts by its stored
    shape: a depthwise kernel (kh, kw, 1, C) gets about `eps / (kh * kw)`, far
    more than a pointwise kernel's `eps * (1 / cin + 1 / cout)`, and is often the
    first to be kept dense.

    Args:
      shapes: the shapes of the selected leaves, each with ndim >= 1 and no
        zero dimension.
      sparsity: the fraction of all their entries to prune, in [0, 1).

    Returns:
      One density in (0, 1] per shape.

    Example:
      >>> erk_densities([(2, 2), (10, 10)], 0.5)  # 2x2 alone would get density 2.17
      [1.0, 0.48]
    """
    for shape in shapes:
        if not shape or 0 in shape:
            raise ValueError(
                f"ERK allocates by a leaf's dimensions and cannot allocate a leaf of shape "
                f"{tuple(shape)}; leave it alone with a rule (regex, None)"
            )
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes, strict=True)]
    dense: set[int] = set()
    while True:
        sparse = [index for index in range(len(shapes)) if index not in dense]
        budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[index] for index in dense)
        divisor = sum(raw[index] * sizes[index] for index in sparse)
        # Only sparsity 0 can leave no sparse leaf (divisor 0): then all are dense.
        eps = budget / divisor if divisor else 0.0
        exceeding = {index for index in sparse if eps * raw[index] > 1.0}
        if not exceeding:
            break
        dense |= exceeding
    return [1.0 if index in dense else eps * raw[index] for index in range(len(shapes))]


def erk_pruned_counts(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """Entries to prune per leaf under ERK, exactly `round(sparsity * total)` in all.

    Each leaf prunes `(1 - density) * size` rounded down or up: the leftover
    entries go, one each, to the leaves with the largest fractional parts (ties:
    the earlier leaf), so the total is exact and no leaf is off by more than one.

    Args:
      shapes: the shapes of the selected leaves, each with ndim >= 1.
      sparsity: the fraction of all their entries to prune, in [0, 1).

    Returns:
      One count per shape.

    Example:
      >>> erk_pruned_counts([(2, 2), (10, 10)], 0.5)
      [0, 52]
    """
    sizes = [math.prod(shape) for shape in shapes]
    quotas = [
        (1.0 - density) * size
        for density, size in zip(erk_densities(shapes, sparsity), sizes, strict=True)
    ]
    counts = [min(math.floor(quota), size) for quota, size in zip(quotas, sizes, strict=True)]
    leftover = round(sparsity * sum(sizes)) - sum(counts)
    by_fraction = sorted(range(len(shapes)), key=lambda index: counts[index] - quotas[index])
    for index in by_fraction[: max(leftover, 0)]:
        counts[index] += 1
    return counts

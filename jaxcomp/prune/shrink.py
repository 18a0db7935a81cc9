"""Physically removes pruned channels from any pytree, given channel groups as data.

A channel group is `[(leaf name, axis), ...]`: leaves that share one channel
axis (a conv's output filters, its BatchNorm, the next conv's input). Models
export their groups (e.g. `jaxcomp.models.centernet.channel_groups`); this module
never imports a model. The first member of a group is its producing kernel:
a channel is kept when that kernel has any non-zero entry for it.

Example:
  >>> groups = centernet.channel_groups(masked_variables)
  >>> keep = channel_keep_indices(masked_variables, groups)
  >>> smaller = shrink_tree(masked_variables, groups, keep)
  >>> model = create_model(name, num_classes=3, channels=group_widths(keep))
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.paths import leaf_names, map_with_names

Groups = Mapping[str, Sequence[tuple[str, int]]]


def _leaves_by_name(tree: Any) -> dict[str, Any]:
    return dict(zip(leaf_names(tree), jax.tree.leaves(tree), strict=True))


def _channels_last(leaf: Any, axis: int) -> np.ndarray:
    values = np.asarray(leaf)
    return np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])


def channel_keep_indices(tree: Any, groups: Groups) -> dict[str, np.ndarray]:
    """The channels of each group whose producing kernel is not all zero.

    Only the first member of a group (the producer) is read, so `tree` may be the
    masked variables or a tree of masks. A channel whose producer slice is zero
    is dropped even if, say, its BatchNorm bias is not: such a channel outputs a
    constant, so masks should zero the whole group (channel mask makers do).
    At least one channel per group is kept so that the model stays valid: if all
    would go, the one with the largest L1 norm stays (channel 0 when all are zero).

    Args:
      tree: a pytree whose leaf names (`jaxcomp.paths.leaf_names`) are those the
        groups use, e.g. {'params': ..., 'batch_stats': ...} for Flax variables.
      groups: group name -> `[(leaf name, axis), ...]`, producer first.

    Returns:
      Group name -> sorted int indices of the kept channels, for every group whose
      producer is a leaf of `tree` (groups without one are left out).

    Example:
      >>> channel_keep_indices({"w": np.array([[1.0, 0.0, 2.0]])}, {"g": [("w", -1)]})
      {'g': array([0, 2])}
    """
    leaves = _leaves_by_name(tree)
    keep = {}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"channel group {group!r} has no members; give it its producer first")
        producer, axis = members[0]
        if producer not in leaves:
            continue
        channels = _channels_last(leaves[producer], axis)
        kept = np.flatnonzero(np.any(channels != 0, axis=0))
        if kept.size == 0:
            l1_norms = np.abs(channels.astype(np.float64)).sum(axis=0)
            kept = np.array([int(np.argmax(l1_norms))])
        keep[group] = kept
    return keep


def _check_indices(group: str, indices: Any, size: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"keep[{group!r}] must be a 1-D array of int channel indices, got dtype "
            f"{indices.dtype} and shape {indices.shape}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(
            f"keep[{group!r}] has indices outside [0, {size}) (the group's channel count): "
            f"min {indices.min()}, max {indices.max()}"
        )
    return indices


def shrink_tree(tree: Any, groups: Groups, keep: Mapping[str, Any]) -> Any:
    """Slices every member leaf of each group in `keep` down to the kept channels.

    Leaves in no kept group are returned untouched. A leaf may be in several
    groups on different axes (e.g. a conv's input and output channels).

    Args:
      tree: a pytree (numpy or JAX arrays) whose leaf names the groups use.
      groups: group name -> `[(leaf name, axis), ...]`.
      keep: group name -> int indices of the channels to keep, e.g. from
        `channel_keep_indices`.

    Returns:
      A pytree of the same structure with narrower member leaves.

    Raises:
      ValueError: a kept group is unknown, a member is not a leaf of `tree`, members'
        channel counts differ, an index is out of range, or a leaf axis is in two groups.
    """
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(f"keep names groups not in groups: {unknown}; known: {sorted(groups)}")
    leaves = _leaves_by_name(tree)
    # Validate everything before slicing anything, so an error loses no work.
    slices: dict[str, list[tuple[int, np.ndarray]]] = {}
    owners: dict[tuple[str, int], str] = {}
    for group, indices in keep.items():
        sizes = {}
        for name, axis in groups[group]:
            if name not in leaves:
                raise ValueError(
                    f"member {name!r} of channel group {group!r} is not a leaf of the tree; "
                    f"leaf names look like {list(leaves)[:3]}"
                )
            shape = np.shape(leaves[name])
            if not -len(shape) <= axis < len(shape):
                raise ValueError(
                    f"axis {axis} of member {name!r} of channel group {group!r} is out of "
                    f"range for its shape {shape}"
                )
            axis %= len(shape)
            if (name, axis) in owners:
                raise ValueError(
                    f"axis {axis} of {name!r} is in channel groups {owners[name, axis]!r} "
                    f"and {group!r}; a channel axis may belong to one group only"
                )
            owners[name, axis] = group
            sizes[name] = shape[axis]
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"members of channel group {group!r} have different channel counts: {sizes}"
            )
        size = next(iter(sizes.values()), 0)
        indices = _check_indices(group, indices, size)
        for name, axis in groups[group]:
            slices.setdefault(name, []).append((axis % len(np.shape(leaves[name])), indices))

    def take(name: str, leaf: Any) -> Any:
        for axis, indices in slices.get(name, ()):
            if isinstance(leaf, np.ndarray):
                leaf = np.take(leaf, indices, axis=axis)
            else:
                leaf = jnp.take(leaf, jnp.asarray(indices), axis=axis)
        return leaf

    return map_with_names(take, tree)


def group_widths(keep: Mapping[str, Any]) -> dict[str, int]:
    """The number of kept channels per group, e.g. for `create_model(..., channels=...)`."""
    return {group: int(np.size(indices)) for group, indices in keep.items()}

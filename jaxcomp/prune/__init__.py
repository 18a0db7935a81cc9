"""Mask-based pruning as pure functions over parameter pytrees.

Scores -> masks (unstructured, N:M, channel; layer-wise, global, LAMP or ERK) -> a pruner
on a schedule, carried in the optimizer state by `pruned_optimizer`; sparse
storage, reports, and generic channel shrinking by model-declared groups.
Nothing here knows about detectors.
"""

from jaxcomp.prune.allocation import erk_densities, erk_pruned_counts, lamp_scores
from jaxcomp.prune.masks import (
    METHODS,
    NORMS,
    SCOPES,
    apply_masks,
    channel_group_masks,
    channel_mask,
    global_channel_masks,
    global_unstructured_masks,
    magnitude_masks,
    nm_mask,
    subtree_groups,
    unstructured_mask,
)
from jaxcomp.prune.pruner import (
    PrunedOptState,
    Pruner,
    PrunerState,
    make_pruner,
    masks_of,
    pruned_optimizer,
    pruner_state_of,
)
from jaxcomp.prune.report import format_sparsity_table, sparsity_report
from jaxcomp.prune.schedules import (
    SCHEDULES,
    Schedule,
    iterative_schedule,
    one_shot_schedule,
    polynomial_schedule,
)
from jaxcomp.prune.scores import (
    SCORES,
    StatefulScore,
    magnitude_score,
    random_score,
    saliency_score,
)
from jaxcomp.prune.shrink import channel_keep_indices, group_widths, shrink_tree
from jaxcomp.prune.storage import (
    directory_bytes,
    entropy_coded_bytes,
    load_sparse,
    save_dense,
    save_sparse,
)

__all__ = [
    "METHODS",
    "NORMS",
    "SCOPES",
    "StatefulScore",
    "SCHEDULES",
    "SCORES",
    "PrunedOptState",
    "Pruner",
    "PrunerState",
    "Schedule",
    "apply_masks",
    "channel_group_masks",
    "channel_keep_indices",
    "channel_mask",
    "directory_bytes",
    "entropy_coded_bytes",
    "erk_densities",
    "erk_pruned_counts",
    "format_sparsity_table",
    "global_channel_masks",
    "global_unstructured_masks",
    "group_widths",
    "iterative_schedule",
    "lamp_scores",
    "load_sparse",
    "magnitude_masks",
    "magnitude_score",
    "make_pruner",
    "masks_of",
    "nm_mask",
    "one_shot_schedule",
    "polynomial_schedule",
    "pruned_optimizer",
    "pruner_state_of",
    "random_score",
    "saliency_score",
    "save_dense",
    "save_sparse",
    "shrink_tree",
    "sparsity_report",
    "subtree_groups",
    "unstructured_mask",
]

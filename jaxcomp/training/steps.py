"""The jitted train and eval steps: the detector's loss plus whatever the methods add.

The step never names a method: it composes their hooks (`jaxcomp.transforms`) around
the model's forward pass, loss, optimizer update and state.
"""

import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import evaluation, transforms
from jaxcomp.detection import decode_detections, detection_loss, encode_batch_targets
from jaxcomp.models import OUTPUT_STRIDE
from jaxcomp.sharding import batch_sharding
from jaxcomp.training.state import TrainState, global_batch

# Batch fields the train step reads; the rest stay on the host. The CenterNet targets
# are encoded inside the step: a 512x512 COCO heatmap is 5 MiB a row, its boxes 1 KiB.
TRAIN_FIELDS = ("image", "boxes", "labels", "box_mask")
EVAL_FIELDS = ("image", "boxes", "labels", "box_mask", "image_id", "valid")


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    constants: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    method_optimizer: optax.GradientTransformation | None,
    methods: transforms.Methods,
    phases: tuple[Hashable, ...],
    loss_weights: dict[str, float],
    num_classes: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a (global) batch.

    Args:
      state: the current TrainState.
      batch: the TRAIN_FIELDS of a batch, sharded over the `data` axis; the step adds
        the CenterNet targets (`encode_batch_targets`) before the model and methods see it.
      constants: each method's constants (a teacher's variables), never updated.
      model: the detector.
      optimizer: the model's optimizer, with the methods' `optimizer` hooks.
      method_optimizer: trains the methods' parameters.
      methods: the compression methods, (name, Transform) pairs, in order.
      phases: each method's phase for this program (`transforms.phases`).
      loss_weights: heatmap_weight, size_weight, offset_weight.
      num_classes: the detector's heatmap channels.

    Returns:
      The new state and scalar metrics (loss terms, gradient norm).
    """
    batch = {**batch, **batch_targets(batch, num_classes)}
    method_states = state.methods or {}
    method_params = state.method_params or {}
    views = transforms.views(methods, method_states, method_params, state.step, phases)
    prepared = {
        name: transform.prepare(views[name], constants.get(name), batch)
        for name, transform in methods
    }
    trains = all(transform.trains for _, transform in methods)

    def loss_fn(params, trainable):
        step_views = {
            name: view._replace(params=trainable.get(name, {})) for name, view in views.items()
        }
        apply = transforms.compose_apply(model.apply, methods, step_views)
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, collections = apply(
            variables, batch["image"], train=trains, mutable=["batch_stats"]
        )
        loss, terms = detection_loss(outputs, batch, **loss_weights)
        if not methods:
            return loss, (terms, collections)
        extra, method_terms = transforms.total_loss(
            methods,
            step_views,
            lambda name: transforms.LossInputs(outputs, collections, batch, prepared[name], params),
        )
        terms = {**terms, **method_terms, "detection": loss, "total": loss + extra}
        return loss + extra, (terms, collections)

    if not trains:
        _, (terms, collections) = loss_fn(state.params, method_params)
        info = transforms.StepInfo(state.params, state.params, None, collections, batch)
        new_states, new_params = transforms.update_all(methods, views, info)
        return state.replace(step=state.step + 1, methods=new_states or None), terms

    (grads, method_grads), (terms, collections) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, method_params
    )
    updates, opt_state = optimizer.update(
        grads, state.opt_state, state.params, method_states=method_states
    )
    params = optax.apply_updates(state.params, updates)
    method_opt_state = state.method_opt_state
    if method_params:
        method_updates, method_opt_state = method_optimizer.update(
            method_grads, state.method_opt_state, method_params
        )
        views = {
            name: view._replace(
                params=optax.apply_updates(method_params, method_updates).get(name, {})
            )
            for name, view in views.items()
        }
    info = transforms.StepInfo(state.params, params, grads, collections, batch)
    new_states, new_params = transforms.update_all(methods, views, info)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=collections["batch_stats"],
        opt_state=opt_state,
        methods=new_states or None,
        method_params=new_params or None,
        method_opt_state=method_opt_state,
    )
    return new_state, {**terms, "grad_norm": optax.global_norm(grads)}


def batch_targets(batch: dict[str, jax.Array], num_classes: int) -> dict[str, jax.Array]:
    """The CenterNet targets of a batch's padded boxes, labels and box mask."""
    return encode_batch_targets(
        batch["boxes"],
        batch["labels"],
        batch["box_mask"],
        image_size=batch["image"].shape[1],
        num_classes=num_classes,
        stride=OUTPUT_STRIDE,
    )


def eval_step(
    state: TrainState,
    images: jax.Array,
    *,
    model: nn.Module,
    top_k: int,
    methods: transforms.Methods = (),
):
    """Runs the detector in inference mode, as the methods change it, and decodes top-k."""
    views = transforms.views(
        methods, state.methods or {}, state.method_params or {}, state.step, training=False
    )
    apply = transforms.compose_apply(model.apply, methods, views)
    outputs = apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    return decode_detections(outputs, k=top_k, stride=OUTPUT_STRIDE)


def export_eval_step(tree: Any, images: jax.Array, *, apply: Callable, top_k: int):
    """An exported form (`transforms.Export.apply`) run and decoded like `eval_step`."""
    return decode_detections(apply(tree, images), k=top_k, stride=OUTPUT_STRIDE)


def jit_train_step(
    model,
    optimizer,
    loss_weights,
    mesh: Mesh,
    methods: transforms.Methods = (),
    phases: tuple[Hashable, ...] | None = None,
    method_optimizer=None,
    state_sharding: Any = None,
    batch_axes: Sequence[str] = ("data",),
) -> Callable:
    """The train step compiled once: the state placed by `state_sharding` (and donated),
    the batch split over `batch_axes`.

    The compiled step is f(state, batch, constants); constants (the methods'
    `constants()`, replicated) are not donated. `state_sharding` is a tree of
    shardings (`jaxcomp.sharding.state_shardings`); None replicates the state.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sharding = state_sharding or replicated
    return jax.jit(
        functools.partial(
            train_step,
            model=model,
            # The step hands the methods' states to the optimizer as extra arguments.
            optimizer=optax.with_extra_args_support(optimizer),
            method_optimizer=method_optimizer,
            methods=tuple(methods),
            phases=phases if phases is not None else (None,) * len(methods),
            loss_weights=loss_weights,
            num_classes=model.num_classes,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh, batch_axes), replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def jit_eval_step(
    model,
    top_k: int,
    mesh: Mesh,
    methods: transforms.Methods = (),
    apply: Callable | None = None,
    state_sharding: Any = None,
    batch_axes: Sequence[str] = ("data",),
) -> Callable:
    """The eval step compiled once; detections stay split over the batch.

    With `apply` (an exported form's), the first argument is that form's tree.
    `state_sharding` places the first argument as in `jit_train_step` (None: replicated).
    """
    if apply is None:
        step = functools.partial(eval_step, model=model, methods=tuple(methods), top_k=top_k)
        if state_sharding is not None:
            # The optimizer states go unread (None: unspecified), so a TrainState
            # without them (built from variables) evaluates too.
            state_sharding = state_sharding.replace(opt_state=None, method_opt_state=None)
    else:
        step = functools.partial(export_eval_step, apply=apply, top_k=top_k)
    return jax.jit(
        step,
        in_shardings=(
            state_sharding or NamedSharding(mesh, PartitionSpec()),
            batch_sharding(mesh, batch_axes),
        ),
    )


def evaluate(
    eval_fn: Callable,
    state: Any,
    batches: Iterable[dict],
    mesh: Mesh,
    class_names=None,
    batch_axes: Sequence[str] = ("data",),
) -> dict[str, float]:
    """COCO metrics of `state` over every batch of `batches` (padding rows skipped).

    The detections stay on the devices until the last batch; then one gather brings
    every batch's rows to every process (not one collective per batch).
    """
    pending = []
    for local_batch in batches:
        batch = global_batch(local_batch, mesh, EVAL_FIELDS, batch_axes)
        detections = eval_fn(state, batch["image"])
        rows = {name: value for name, value in batch.items() if name != "image"}
        rows.update({f"det_{name}": value for name, value in detections.items()})
        pending.append(rows)
    gathered = multihost_utils.process_allgather(pending, tiled=True)
    arrays = {
        name: np.concatenate([np.asarray(rows[name]) for rows in gathered]) for name in gathered[0]
    }
    return evaluation.coco_metrics(
        gt_boxes=arrays["boxes"],
        gt_labels=arrays["labels"],
        gt_mask=arrays["box_mask"],
        det_boxes=arrays["det_boxes"],
        det_scores=arrays["det_scores"],
        det_classes=arrays["det_classes"],
        image_ids=arrays["image_id"],
        valid=arrays["valid"],
        class_names=class_names,
    )

"""Training and evaluation as a library of small functions.

`train_and_evaluate(config, workdir)` is the whole job; the pieces (state
creation, the jitted sharded train and eval steps, checkpointing, logging) are
separate so that notebooks, tests and later compression stages reuse them.
"""

import concurrent.futures
import dataclasses
import errno
import functools
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import compress, distill, evaluation, paths, prune, quant, report, traced_steps
from jaxcomp.config import validate_config
from jaxcomp.data import pipeline
from jaxcomp.detection import decode_detections, detection_loss
from jaxcomp.detection.distill import DistillSpec, distillation_loss
from jaxcomp.models import OUTPUT_STRIDE, create_model

# Batch fields the train step reads; the rest stay on the host.
TRAIN_FIELDS = ("image", "heatmap", "center_index", "size", "offset", "target_mask")
EVAL_FIELDS = ("image", "boxes", "labels", "box_mask", "image_id", "valid")


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint restores: step, parameters, BatchNorm statistics, optimizer.

    Pruning masks live inside `opt_state` (`prune.pruned_optimizer`); int8 runs add
    their activation observers as `quant_stats`, distillation with a feature adapter
    its parameters and optimizer state as `distill` ({'adapter', 'opt_state'}); both
    are None otherwise. The teacher is not here: it is restored from its own run.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    quant_stats: Any = None
    distill: Any = None


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A frozen teacher and what the student learns from it (`build_distillation`).

    Attributes:
      teacher: the teacher model (its variables are an argument of the step).
      spec: the distillation terms and weights.
      feature_layer: the module path (e.g. 'neck') whose output both networks'
        feature term compares.
      adapter_features: (student, teacher) feature widths when they differ: a 1x1
        adapter maps the student's features to the teacher's width; else None.
      adapter_optimizer: trains the adapter (with `adapter_features`).
    """

    teacher: nn.Module
    spec: DistillSpec
    feature_layer: str = "neck"
    adapter_features: tuple[int, int] | None = None
    adapter_optimizer: optax.GradientTransformation | None = None


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


# ---------------------------------------------------------------------------
# Compilation cache, mesh and data placement


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Keeps compiled XLA programs in `cache_dir`, so a second start skips the compiles.

    Args:
      cache_dir: a directory (created if missing; '~' expanded), or None/'' to disable.
    """
    if not cache_dir:
        return
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: the train step's compile takes seconds, but so do many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_mesh() -> Mesh:
    """A 1-D mesh with a `data` axis over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, fields: Iterable[str]):
    """Assembles each process's rows into global arrays sharded over the `data` axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        name: jax.make_array_from_process_local_data(sharding, local_batch[name]) for name in fields
    }


# ---------------------------------------------------------------------------
# Model, optimizer, state


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; weight decay on conv/dense kernels only.

    Args:
      optim: `config.optim` (learning_rate, warmup_steps, weight_decay, grad_clip_norm).
      total_steps: length of the cosine schedule.

    Returns:
      The optax transformation.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * 0.01,
    )
    decay_mask = functools.partial(paths.map_with_names, lambda name, _: name.endswith("kernel"))
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask),
    )


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    image_size: int,
    rng: jax.Array,
    variables: dict | None = None,
    quant_config: quant.QuantConfig | None = None,
) -> TrainState:
    """Initializes parameters, statistics and optimizer state (call under `jax.jit`).

    Args:
      model: the detector.
      optimizer: the optax transformation.
      image_size: side of the square input; parameters do not depend on it.
      rng: PRNG key for parameter initialization.
      variables: {'params', 'batch_stats'} to start from (fine-tuning) instead of `rng`.
      quant_config: if given, empty activation observers are added as `quant_stats`.

    Returns:
      A TrainState at step 0.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    if variables is None:
        variables = model.init(rng, images, train=False)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    quant_stats = None
    if quant_config is not None:
        quant_stats = quant.init_quant_stats(
            model.apply, variables, images, config=quant_config, train=False
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
        quant_stats=quant_stats,
    )


def init_state(
    model,
    optimizer,
    image_size: int,
    seed: int,
    mesh: Mesh,
    variables: dict | None = None,
    quant_config: quant.QuantConfig | None = None,
) -> TrainState:
    """Creates the replicated initial TrainState in one jitted call (eager init is far slower).

    Args:
      model, optimizer, image_size, seed: as for `create_train_state` (rng from `seed`).
      mesh: the device mesh; the state is replicated over it.
      variables: optional {'params', 'batch_stats'} to start from (see `restore_variables`).
      quant_config: adds activation observers for int8 runs (`compress.make_quant_config`).
    """
    init_fn = jit_init_state(model, optimizer, image_size, mesh, quant_config)
    return init_fn(jax.random.key(seed), variables)


def jit_init_state(
    model, optimizer, image_size: int, mesh: Mesh, quant_config: quant.QuantConfig | None = None
) -> Callable:
    """`create_train_state` jitted: f(rng, variables) -> the TrainState, replicated on `mesh`."""
    return jax.jit(
        functools.partial(
            create_train_state, model, optimizer, image_size, quant_config=quant_config
        ),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def abstract_variables(model: nn.Module, image_size: int) -> dict:
    """Shapes and dtypes of the model's variables, traced without computing anything
    (and kept for the next start: `traced_steps.cached_shapes`)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)

    def shapes():
        return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)

    if not traced_steps.defined_in_jaxcomp(type(model)):
        return shapes()  # the keys do not cover a model's code from elsewhere
    return traced_steps.cached_shapes(shapes, "variables", f"{model!r} {image_size}")


# ---------------------------------------------------------------------------
# Steps


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    teacher_variables: dict | None = None,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    loss_weights: dict[str, float],
    quant_config: quant.QuantConfig | None = None,
    batch_norm_trains: bool = True,
    distillation: Distillation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a (global) batch.

    Args:
      state: the current TrainState.
      batch: the TRAIN_FIELDS of a batch, sharded over the `data` axis.
      teacher_variables: the frozen teacher's {'params', 'batch_stats'} (with
        `distillation`); never updated, no gradient reaches them.
      model: the detector.
      optimizer: the optax transformation the state was created with (pruning
        masks, if any, are applied inside it).
      loss_weights: heatmap_weight, size_weight, offset_weight.
      quant_config: int8 QAT: BN-folded fake-quant weights and fake-quant layer
        inputs, observers updated in `state.quant_stats`.
      batch_norm_trains: False freezes BatchNorm: it normalizes with (and keeps)
        its running statistics, as QAT recipes do for the last part of fine-tuning.
      distillation: the teacher runs (inference mode) on the same batch and the
        distillation terms are added to the detection loss.

    Returns:
      The new state and scalar metrics (loss terms, gradient norm).
    """
    capture = None
    teacher_outputs = teacher_features = None
    if distillation is not None:
        if distillation.spec.uses_features:
            capture = _module_output_filter(distillation.feature_layer)
        teacher_outputs, teacher_features = _teacher_forward(
            distillation, teacher_variables, batch["image"], capture
        )

    def loss_fn(params, adapter):
        outputs, collections = _student_forward(
            model, params, state, batch["image"], quant_config, batch_norm_trains, capture
        )
        loss, terms = detection_loss(outputs, batch, **loss_weights)
        if distillation is not None:
            student_features = None
            if capture is not None:
                student_features = _captured(collections, distillation.feature_layer)
                if adapter is not None:
                    student_features = distill.apply_adapter(adapter, student_features)
            distill_total, distill_terms = distillation_loss(
                outputs,
                teacher_outputs,
                batch,
                distillation.spec,
                student_features,
                teacher_features,
            )
            terms = {**terms, **distill_terms, "detection": loss}
            loss = loss + distill_total
            terms["total"] = loss
        return loss, (terms, collections)

    adapter = None if state.distill is None else state.distill["adapter"]
    (grads, adapter_grads), (terms, collections) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params, adapter
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    distill_state = state.distill
    if adapter is not None:
        adapter_updates, adapter_opt_state = distillation.adapter_optimizer.update(
            adapter_grads, state.distill["opt_state"], adapter
        )
        distill_state = {
            "adapter": optax.apply_updates(adapter, adapter_updates),
            "opt_state": adapter_opt_state,
        }
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=collections["batch_stats"],
        opt_state=opt_state,
        quant_stats=collections.get(quant.QUANT_STATS, state.quant_stats),
        distill=distill_state,
    )
    return new_state, {**terms, "grad_norm": optax.global_norm(grads)}


def _student_forward(model, params, state, images, quant_config, batch_norm_trains, capture):
    """The student's training forward pass: outputs and updated collections."""
    variables = {"params": params, "batch_stats": state.batch_stats}
    mutable = ["batch_stats", "intermediates"] if capture else ["batch_stats"]
    kwargs = {"capture_intermediates": capture} if capture else {}
    if quant_config is None:
        return model.apply(variables, images, train=batch_norm_trains, mutable=mutable, **kwargs)
    return quant.quantized_apply(
        model.apply,
        {**variables, quant.QUANT_STATS: state.quant_stats},
        images,
        config=quant_config,
        mode="qat",
        step=state.step,
        train=batch_norm_trains,
        mutable=mutable,
        **kwargs,
    )


def _teacher_forward(distillation: Distillation, teacher_variables, images, capture):
    """The frozen teacher in inference mode: outputs and (if captured) its feature map."""
    teacher_variables = jax.lax.stop_gradient(teacher_variables)
    if capture is None:
        return distillation.teacher.apply(teacher_variables, images, train=False), None
    outputs, collections = distillation.teacher.apply(
        teacher_variables,
        images,
        train=False,
        capture_intermediates=capture,
        mutable=["intermediates"],
    )
    return outputs, jax.lax.stop_gradient(_captured(collections, distillation.feature_layer))


def _module_output_filter(layer: str) -> Callable:
    """A `capture_intermediates` filter that keeps the output of the module at `layer`."""
    wanted = tuple(layer.split("/"))
    return lambda module, method: method == "__call__" and module.path == wanted


def _captured(collections: dict, layer: str) -> jax.Array:
    """The [B, h, w, C] output of the module at `layer` from the 'intermediates' collection."""
    node = collections.get("intermediates", {})
    for part in layer.split("/"):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    outputs = node.get("__call__") if isinstance(node, dict) else None
    if not outputs or getattr(outputs[0], "ndim", None) != 4:
        raise ValueError(
            f"config.distill.feature_layer={layer!r} is not a module whose output is one "
            "feature map; use 'neck' (the stride-4 map both detectors have)"
        )
    return outputs[0]


def calibration_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    quant_config: quant.QuantConfig,
    loss_weights: dict[str, float],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """Post-training quantization: observes layer input ranges on a batch, no gradient step.

    Returns the state with updated `quant_stats` and the float model's loss terms.
    """
    outputs, updates = quant.quantized_apply(
        model.apply,
        {
            "params": state.params,
            "batch_stats": state.batch_stats,
            quant.QUANT_STATS: state.quant_stats,
        },
        batch["image"],
        config=quant_config,
        mode="calibrate",
        train=False,
    )
    _, terms = detection_loss(outputs, batch, **loss_weights)
    return state.replace(step=state.step + 1, quant_stats=updates[quant.QUANT_STATS]), terms


def eval_step(
    state: TrainState,
    images: jax.Array,
    *,
    model: nn.Module,
    top_k: int,
    quant_config: quant.QuantConfig | None = None,
):
    """Runs the detector in inference mode (fake-quant if configured) and decodes top-k."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if quant_config is None:
        outputs = model.apply(variables, images, train=False)
    else:
        outputs = quant.quantized_apply(
            model.apply,
            {**variables, quant.QUANT_STATS: state.quant_stats},
            images,
            config=quant_config,
            mode="eval",
            train=False,
        )
    return decode_detections(outputs, k=top_k, stride=OUTPUT_STRIDE)


def int8_eval_step(
    int8_tree: dict, images: jax.Array, *, model: nn.Module, top_k: int, quant_config
):
    """The int8 serving path (int8 x int8 -> int32 layers), decoded like `eval_step`."""
    outputs = quant.int8_apply(model, int8_tree, images, config=quant_config, train=False)
    return decode_detections(outputs, k=top_k, stride=OUTPUT_STRIDE)


def jit_train_step(
    model,
    optimizer,
    loss_weights,
    mesh: Mesh,
    quant_config: quant.QuantConfig | None = None,
    batch_norm_trains: bool = True,
    distillation: Distillation | None = None,
) -> Callable:
    """The train step compiled once: state replicated (and donated), batch sharded.

    With `distillation`, the compiled step takes the teacher's variables (replicated,
    not donated) as a third argument.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    in_shardings = (replicated, NamedSharding(mesh, PartitionSpec("data")))
    if distillation is not None:
        in_shardings = (*in_shardings, replicated)
    return jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            loss_weights=loss_weights,
            quant_config=quant_config,
            batch_norm_trains=batch_norm_trains,
            distillation=distillation,
        ),
        in_shardings=in_shardings,
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def jit_calibration_step(model, quant_config, loss_weights, mesh: Mesh) -> Callable:
    """`calibration_step` compiled once, sharded like the train step."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(
            calibration_step, model=model, quant_config=quant_config, loss_weights=loss_weights
        ),
        in_shardings=(replicated, NamedSharding(mesh, PartitionSpec("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def jit_eval_step(
    model, top_k: int, mesh: Mesh, quant_config: quant.QuantConfig | None = None, *, int8=False
) -> Callable:
    """The eval step compiled once; detections stay sharded over the batch.

    With `int8=True` the first argument is the tree of `quant.convert_to_int8`.
    """
    step = int8_eval_step if int8 else eval_step
    return jax.jit(
        functools.partial(step, model=model, top_k=top_k, quant_config=quant_config),
        in_shardings=(
            NamedSharding(mesh, PartitionSpec()),
            NamedSharding(mesh, PartitionSpec("data")),
        ),
    )


def evaluate(
    eval_fn: Callable, state: TrainState, batches: Iterable[dict], mesh: Mesh, class_names=None
) -> dict[str, float]:
    """COCO metrics of `state` over every batch of `batches` (padding rows skipped)."""
    collected: dict[str, list[np.ndarray]] = {}
    for local_batch in batches:
        batch = global_batch(local_batch, mesh, EVAL_FIELDS)
        detections = eval_fn(state, batch["image"])
        rows = {name: value for name, value in batch.items() if name != "image"}
        rows.update({f"det_{name}": value for name, value in detections.items()})
        for name, value in multihost_utils.process_allgather(rows, tiled=True).items():
            collected.setdefault(name, []).append(np.asarray(value))
    arrays = {name: np.concatenate(values) for name, values in collected.items()}
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


# ---------------------------------------------------------------------------
# Checkpoints


def checkpoint_manager(
    workdir: str, train_config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
    """An orbax manager in `workdir/checkpoints` keeping the last `keep_checkpoints` steps."""
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=train_config.keep_checkpoints,
            create=True,
        ),
        # Lets `item_metadata` read shapes before a restore, to check them.
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def _checkpoint_items(state: TrainState) -> dict[str, Any]:
    # A dict of the fields in use: a checkpoint written before a field existed (or by a
    # run that leaves it None) restores into a state that has it.
    return {
        field.name: getattr(state, field.name)
        for field in dataclasses.fields(state)
        if getattr(state, field.name) is not None
    }


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Saves `state` as the checkpoint of its step (asynchronously; orbax finishes it)."""
    manager.save(int(state.step), args=ocp.args.StandardSave(_checkpoint_items(state)), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, state: TrainState) -> TrainState:
    """The checkpoint of `step`, restored into `state`'s structure and sharding."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_items(state))
    _check_same_shapes(
        dict(manager.item_metadata(step)),
        abstract,
        f"the checkpoint of step {step} in {manager.directory} does not fit this config",
        fix="resume it with the config that wrote it (its config.json), or start this config "
        "in a new --workdir",
    )
    return state.replace(**manager.restore(step, args=ocp.args.StandardRestore(abstract)))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """Restores the newest checkpoint that reads back into `state`, or returns `state`.

    Steps are tried newest first. One that does not read back (truncated or missing
    files: a crash on a filesystem without atomic renames, a copy cut short) is skipped
    with a warning naming it and the step used instead; once an older step restored, it
    is moved aside to `<step>.unreadable-<time>`, kept for inspection and out of the way of the
    step's next save. A save interrupted by a crash (orbax's `<step>.orbax-checkpoint-tmp`,
    never listed as a step) is reported too.

    Args:
      manager: the run's `checkpoint_manager`.
      state: a fresh state, whose structure and sharding the restore takes.

    Returns:
      The restored state, or `state` itself when no checkpoint exists yet.

    Raises:
      ValueError: the newest readable checkpoint does not fit this config.
      RuntimeError: checkpoints exist but none reads back (nothing is moved).
    """
    directory = manager.directory
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _checkpoint_items(state))
    unreadable: dict[int, str] = {}
    restored = None
    for step in reversed(manager.all_steps()):
        restored, problem = _read_step(manager, step, abstract)
        if restored is not None:
            break
        unreadable[step] = problem
    if unreadable and restored is None:
        raise RuntimeError(
            f"no checkpoint in {directory} can be restored: "
            + "; ".join(f"step {bad}: {problem}" for bad, problem in unreadable.items())
            + ". Restore a backup of that directory, or start the run in a new --workdir"
        )
    start = "from scratch" if restored is None else f"from the checkpoint of step {step}"
    interrupted = [s for s in _interrupted_saves(directory) if restored is None or s > step]
    if interrupted:
        _warn(
            f"the save of step {max(interrupted)} in {directory} was interrupted (a crash "
            f"left {max(interrupted)}{_TMP_SUFFIX}); resuming {start}"
        )
    if restored is None:
        return state
    if jax.process_index() == 0:
        for bad, problem in unreadable.items():
            aside = f"{bad}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(directory / str(bad), directory / aside)
            _warn(
                f"the checkpoint of step {bad} in {directory} cannot be restored ({problem}); "
                f"moved it to {aside} and resuming from the checkpoint of step {step}"
            )
        if not unreadable:
            print(f"Resuming from the checkpoint of step {step} in {directory}", flush=True)
    if unreadable:
        # Every process must see the moves before the step's next save.
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxcomp.restore_latest")
        manager.reload()
    return state.replace(**restored)


# What orbax appends to a step's directory while it writes it (renamed away when done).
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _read_step(
    manager: ocp.CheckpointManager, step: int, abstract: dict
) -> tuple[dict | None, str]:
    """The checkpoint of `step` restored as `abstract`, or None and why it did not read back."""
    try:
        stored = manager.item_metadata(step)
    except Exception as error:  # noqa: BLE001 - whatever the damage, the step is unreadable
        return None, _first_line(error)
    if stored is None:
        return None, "its item metadata file _METADATA is missing"
    # Outside the try: a checkpoint of another config is for the user to fix, not to skip.
    _check_same_shapes(
        dict(stored),
        abstract,
        f"the checkpoint of step {step} in {manager.directory} does not fit this config",
        fix="resume it with the config that wrote it (its config.json), or start this config "
        "in a new --workdir",
    )
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract)), ""
    except Exception as error:  # noqa: BLE001
        return None, _first_line(error)


def _first_line(error: Exception) -> str:
    # tensorstore's errors go on with a many-line dump of the array spec.
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _interrupted_saves(directory) -> list[int]:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    prefixes = [name.split(_TMP_SUFFIX)[0] for name in names if _TMP_SUFFIX in name]
    return [int(prefix) for prefix in prefixes if prefix.isdigit()]


def _warn(message: str) -> None:
    """Logs `message` as a warning and prints it on process 0 (the CLI hides INFO logs)."""
    logging.warning(message)
    if jax.process_index() == 0:
        print(f"Warning: {message}", flush=True)


def restore_variables(
    workdir: str,
    expected: dict,
    field: str = "config.init_from",
    model_field: str = "config.model.name",
) -> dict:
    """The params and BatchNorm statistics of the newest checkpoint in another run's workdir.

    Args:
      workdir: the workdir of a finished run (`config.init_from`, `config.distill.teacher`).
      expected: the abstract variables of the model they are for, to check shapes against.
      field: the config field that named `workdir`, for error messages.
      model_field: the config field that names the model the variables are for.

    Returns:
      {'params': ..., 'batch_stats': ...} as arrays.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    step = ocp.CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None
    if step is None:
        raise FileNotFoundError(
            f"{field}={workdir!r} holds no checkpoint (looked in {directory}); train "
            "that model first (see its config's docstring), point the field at a "
            f"finished run's workdir, or set --{field}='' to do without it"
        )
    source = f"the checkpoint of step {step} in {directory} ({field})"
    with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
        stored = dict(manager.item_metadata(step))
        missing = [name for name in ("params", "batch_stats") if name not in stored]
        if missing:
            raise ValueError(
                f"{source} has no {missing}: it was not written by jaxcomp's training; point "
                f"{field} at the workdir of a jaxcomp run"
            )
        _check_same_shapes(
            {name: stored[name] for name in ("params", "batch_stats")},
            expected,
            f"{source} does not fit {model_field}",
        )
        # Restored onto this run's devices: without a target, orbax refuses a checkpoint
        # written on another topology (another device or host count).
        replicated = NamedSharding(make_mesh(), PartitionSpec())
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), stored
        )
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return {name: restored[name] for name in ("params", "batch_stats")}


def _check_same_shapes(
    tree: Any,
    expected: Any,
    source: str,
    fix: str = "point it at a run of the same model (and config.model.channels), trained on "
    "the same dataset",
) -> None:
    found = dict(zip(paths.leaf_names(tree), jax.tree.leaves(tree), strict=True))
    wanted = dict(zip(paths.leaf_names(expected), jax.tree.leaves(expected), strict=True))
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    wrong = [
        f"{name}: {tuple(found[name].shape)} != {tuple(wanted[name].shape)}"
        for name in sorted(set(found) & set(wanted))
        if tuple(found[name].shape) != tuple(wanted[name].shape)
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"{source}: missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]}; {fix}"
        )


# ---------------------------------------------------------------------------
# Logging and interruption


class MetricsWriter:
    """Scalars to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self._enabled = jax.process_index() == 0
        if self._enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            # COCO reports nan for size ranges without objects; TensorBoard would warn on each.
            if np.isfinite(value):
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


class StopRequest:
    """Set by SIGTERM (what preemptible VMs send) or a first Ctrl-C: the loop saves and exits.

    A second Ctrl-C interrupts at once, as usual.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        self._event.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
            print(
                "\nStopping after this step with a checkpoint (Ctrl-C again to abort).", flush=True
            )

    def __enter__(self):
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def is_set(self) -> bool:
        return self._event.is_set()


def summarize_metrics(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Fetches buffered step metrics, checks they are finite and averages them.

    Buffering lets steps dispatch asynchronously; the check runs before every
    log and checkpoint, so a non-finite state is never saved.
    """
    fetched = jax.device_get([metrics for _, metrics in pending])
    for (step, _), metrics in zip(pending, fetched, strict=True):
        if not np.isfinite(metrics["total"]):
            raise NonFiniteLossError(
                f"loss became {metrics['total']} at step {step} "
                f"(terms: { {k: float(v) for k, v in metrics.items()} }); the last good "
                "checkpoint is kept. Lower config.optim.learning_rate or "
                "config.optim.grad_clip_norm and resume."
            )
    return {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}


# ---------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class Experiment:
    """What `train_and_evaluate` builds from a config, exposed so tests and notebooks reuse it."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    builder: Any
    model: nn.Module
    variables: Any  # abstract (shapes and dtypes only)
    optimizer: optax.GradientTransformation
    quant_config: quant.QuantConfig | None
    train_step: Callable
    eval_step: Callable
    # The step with BatchNorm frozen, from config.quant.freeze_bn_step on (else None).
    # Two programs switched on the host: a `lax.cond` between two whole forward and
    # backward passes made the QAT step 3x slower on CPU.
    frozen_bn_train_step: Callable | None = None
    distillation: Distillation | None = None
    # The teacher's {'params', 'batch_stats'}, replicated on the mesh (with distillation).
    teacher_variables: Any = None

    def train_step_at(self, step: int) -> Callable:
        """The compiled step that takes the state from `step` to `step + 1`, as f(state, batch)."""
        compiled = self._step_at(step)
        if self.teacher_variables is None:
            return compiled
        return lambda state, batch: compiled(state, batch, self.teacher_variables)

    def compile_step_at(self, step: int, state, batch) -> None:
        """Compiles `train_step_at(step)` ahead of its first call, for the shapes of `state`
        and `batch` (arrays or `jax.ShapeDtypeStruct`s with shardings)."""
        extra = () if self.teacher_variables is None else (self.teacher_variables,)
        traced_steps.compile_ahead(self._step_at(step), state, batch, *extra)

    def _step_at(self, step: int) -> Callable:
        freeze = self.config.quant.freeze_bn_step
        if self.frozen_bn_train_step is not None and step >= freeze:
            return self.frozen_bn_train_step
        return self.train_step


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds dataset builder, model, optimizer and jitted steps."""
    validate_config(config, jax.device_count())
    builder = pipeline.get_builder(config.data.name, config.data.data_dir)
    model = create_model(
        config.model.name,
        num_classes=pipeline.num_classes(builder),
        depthwise_impl=config.model.depthwise_impl,
        channels=config.model.channels,
    )
    variables = abstract_variables(model, config.data.image_size)
    optimizer = compress.wrap_optimizer(
        make_optimizer(config.optim, config.train.steps), config, variables
    )
    quant_config = compress.make_quant_config(config)
    # Checks pruning and quantization rules against the real names now, before any
    # file is written.
    jax.eval_shape(optimizer.init, variables["params"])
    if quant_config is not None:
        quant.quantized_layers(variables["params"], quant_config)
    mesh = make_mesh()
    distillation = teacher_variables = None
    if config.distill.teacher:
        distillation, teacher_variables = build_distillation(config, model, builder, mesh)
    frozen_bn_step = None
    if config.quant.mode == "ptq":
        step = jit_calibration_step(model, quant_config, dict(config.loss), mesh)
    else:
        step = jit_train_step(
            model, optimizer, dict(config.loss), mesh, quant_config, distillation=distillation
        )
        if config.quant.mode == "qat" and config.quant.freeze_bn_step is not None:
            frozen_bn_step = jit_train_step(
                model,
                optimizer,
                dict(config.loss),
                mesh,
                quant_config,
                batch_norm_trains=False,
                distillation=distillation,
            )
    # A second start of this config reads its steps back traced, next to their compiles.
    traced_dir = traced_steps.cache_directory()
    step = traced_steps.cached_step(step, traced_dir, "train_step", config.to_json())
    if frozen_bn_step is not None:
        frozen_bn_step = traced_steps.cached_step(
            frozen_bn_step, traced_dir, "frozen_bn_train_step", config.to_json()
        )
    return Experiment(
        config=config,
        mesh=mesh,
        builder=builder,
        model=model,
        variables=variables,
        optimizer=optimizer,
        quant_config=quant_config,
        train_step=step,
        eval_step=jit_eval_step(model, config.eval.top_k, mesh, quant_config),
        frozen_bn_train_step=frozen_bn_step,
        distillation=distillation,
        teacher_variables=teacher_variables,
    )


def build_distillation(
    config: ml_collections.ConfigDict, model: nn.Module, builder, mesh: Mesh
) -> tuple[Distillation, dict]:
    """The teacher of `config.distill`, checked against the student and restored.

    Head outputs must have equal shapes; feature maps of different widths get a
    1x1 adapter. Raises before anything is trained when the teacher's checkpoint
    is missing or does not fit `config.distill.teacher_model`.

    Returns:
      The `Distillation` and the teacher's variables, replicated on `mesh`.
    """
    settings = config.distill
    teacher = create_model(
        settings.teacher_model,
        num_classes=pipeline.num_classes(builder),
        depthwise_impl=config.model.depthwise_impl,
        channels=settings.teacher_channels,
    )
    spec = compress.make_distill_spec(config)
    size = config.data.image_size
    filter_fn = _module_output_filter(settings.feature_layer) if spec.uses_features else None
    student_out, student_features = _abstract_outputs(model, size, filter_fn, settings)
    teacher_out, teacher_features = _abstract_outputs(teacher, size, filter_fn, settings)
    for head, shape in student_out.items():
        if teacher_out[head].shape != shape.shape:
            raise ValueError(
                f"config.distill.teacher_model={settings.teacher_model!r} predicts "
                f"'{head}' of shape {teacher_out[head].shape} but the student "
                f"{config.model.name!r} {shape.shape}; distil between detectors of the same "
                "dataset (classes) and output stride"
            )
    adapter_features = adapter_optimizer = None
    if spec.uses_features and student_features[-1] != teacher_features[-1]:
        adapter_features = (student_features[-1], teacher_features[-1])
        adapter_optimizer = make_optimizer(config.optim, config.train.steps)
    variables = restore_variables(
        settings.teacher,
        abstract_variables(teacher, size),
        field="config.distill.teacher",
        model_field="config.distill.teacher_model",
    )
    distillation = Distillation(
        teacher=teacher,
        spec=spec,
        feature_layer=settings.feature_layer,
        adapter_features=adapter_features,
        adapter_optimizer=adapter_optimizer,
    )
    return distillation, jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))


def _abstract_outputs(model, image_size, filter_fn, settings):
    """Shapes of a model's head outputs and of its captured feature map (or None)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    variables = abstract_variables(model, image_size)
    if filter_fn is None:
        return jax.eval_shape(functools.partial(model.apply, train=False), variables, images), None

    def run(variables, images):
        return model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=filter_fn,
            mutable=["intermediates"],
        )

    outputs, collections = jax.eval_shape(run, variables, images)
    return outputs, _captured(collections, settings.feature_layer).shape


def init_distill_state(experiment: Experiment, seed: int) -> dict | None:
    """The feature adapter's parameters and optimizer state, replicated (None without one)."""
    distillation = experiment.distillation
    if distillation is None or distillation.adapter_features is None:
        return None
    key = jax.random.fold_in(jax.random.key(seed), 1)
    adapter = distill.init_adapter(key, *distillation.adapter_features)
    state = {"adapter": adapter, "opt_state": distillation.adapter_optimizer.init(adapter)}
    return jax.device_put(state, NamedSharding(experiment.mesh, PartitionSpec()))


def experiment_train_dataset(experiment: Experiment):
    """This process's training batches: `dataset[step]` is its rows of global batch `step`."""
    config = experiment.config
    return pipeline.train_dataset(
        experiment.builder.as_data_source(config.data.train_split),
        image_size=config.data.image_size,
        global_batch_size=config.train.batch_size,
        max_objects=config.data.max_objects,
        num_classes=pipeline.num_classes(experiment.builder),
        seed=config.seed,
        stride=OUTPUT_STRIDE,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def evaluate_experiment(experiment: Experiment, state: TrainState) -> dict[str, float]:
    """COCO metrics of `state` on the config's eval split (this process's shard)."""
    config = experiment.config
    source = experiment.builder.as_data_source(config.data.eval_split)
    batches = pipeline.eval_batches(
        source,
        image_size=config.data.image_size,
        batch_size=config.eval.batch_size // jax.process_count(),
        max_objects=config.data.max_objects,
        num_classes=pipeline.num_classes(experiment.builder),
        stride=OUTPUT_STRIDE,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return evaluate(
        experiment.eval_step,
        state,
        batches,
        experiment.mesh,
        class_names=pipeline.class_names(experiment.builder),
    )


# Less free space than this and the first checkpoint save would fail, after the compile.
MIN_FREE_BYTES = 64 * 2**20
_WORKDIR_FIX = "pass --workdir a directory on a disk you can write to, with space to spare"


def check_workdir(workdir: str, min_free_bytes: int | None = None) -> None:
    """Raises OSError naming `workdir` if it cannot be created or written, or its disk is full.

    Creates nothing: the nearest existing directory at or above `workdir` is checked.

    Args:
      workdir: the run's workdir (need not exist yet).
      min_free_bytes: free space required there; None reads `MIN_FREE_BYTES`.
    """
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"cannot create workdir {workdir!r}: {existing} is a file, not a directory; "
            f"{_WORKDIR_FIX}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write to workdir {workdir!r}: {existing} is not writable by this user; "
            f"{_WORKDIR_FIX}"
        )
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    required = MIN_FREE_BYTES if min_free_bytes is None else min_free_bytes
    if free < required:
        raise OSError(
            errno.ENOSPC,
            f"the disk of workdir {workdir!r} is full: {free / 2**20:.1f} MiB free at "
            f"{existing}, at least {required / 2**20:.0f} MiB needed; {_WORKDIR_FIX}",
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

    Args:
      config: the experiment config (see `jaxcomp.config.default_config`).
      workdir: checkpoints, `metrics.jsonl`, TensorBoard logs and `eval.json` go here.
      stop_at: stop after this step with a checkpoint, exactly as a SIGTERM would
        (for time-boxed jobs); the same call without it later resumes and finishes.

    Returns:
      {'step': last step, 'preempted': bool, 'metrics': COCO metrics or None if preempted,
       'train': last averaged train scalars, 'images_per_second': mean training throughput
       after the first step, 'first_step_seconds': the first step's time (mostly its
       compile), 'params': number of parameters}.
    """
    check_workdir(workdir)
    experiment = build_experiment(config)
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    except OSError as error:
        raise OSError(
            error.errno, f"cannot write to workdir {workdir!r} ({error}); {_WORKDIR_FIX}"
        ) from error

    manager = checkpoint_manager(workdir, config.train)
    end_step = config.train.steps if stop_at is None else min(stop_at, config.train.steps)
    # Started before the state is built so that the data workers start up meanwhile; a
    # resume that falls back to an older checkpoint starts them again at its step.
    expected_start = manager.latest_step() or 0
    batches = _train_batches(experiment, expected_start, end_step)
    try:
        # Made in this process at once (the workers start meanwhile); its shapes let the
        # first step compile while the state is built.
        first = next(batches, None)
        state = _initial_state(experiment, manager, first)
        start_step = int(state.step)
        num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        if start_step >= end_step < config.train.steps:
            manager.close()
            return {
                "step": start_step,
                "preempted": True,
                "metrics": None,
                "train": {},
                "images_per_second": float("nan"),
                "first_step_seconds": float("nan"),
                "params": num_params,
            }
        if start_step != expected_start:
            batches.close()
            batches = _train_batches(experiment, start_step, end_step)
            first = None
        writer = MetricsWriter(workdir)
        result = _train_loop(
            experiment,
            state,
            itertools.chain([] if first is None else [first], batches),
            start_step,
            manager,
            writer,
            workdir,
            end_step,
        )
    finally:
        batches.close()
    writer.close()
    manager.wait_until_finished()
    manager.close()
    state = result.pop("state")
    if result["metrics"] is not None:
        result["compression"] = compression_summary(experiment, state, workdir, result["metrics"])
    return {**result, "params": num_params}


def _initial_state(
    experiment: Experiment, manager: ocp.CheckpointManager, batch: dict | None
) -> TrainState:
    """The state to train from: the newest checkpoint, else a fresh (or `init_from`) state.

    A fresh state comes from the start-up cache when an earlier start of this config
    kept it (`traced_steps.read_state`); otherwise the init program runs, and its
    result is kept. With `batch` (a local batch, for its shapes), the first train
    step is compiled meanwhile: the init program compiles, or loads from the
    compilation cache, in a background thread while this one prepares the step. XLA
    releases the GIL while it compiles and loads, so on 2 cores the two mostly overlap.
    """
    config = experiment.config
    latest_step = manager.latest_step()
    start_variables = None
    if config.init_from and latest_step is None:
        start_variables = restore_variables(config.init_from, experiment.variables)
    distill_state = init_distill_state(experiment, config.seed)
    abstract_state = _abstract_train_state(experiment)
    cache_path = None
    if start_variables is None:
        cache_path = traced_steps.initial_state_path(config.to_json(), abstract_state)
    state = traced_steps.read_state(cache_path, abstract_state) if cache_path else None

    def compile_first_step():
        if batch is not None:
            experiment.compile_step_at(
                latest_step or 0,
                abstract_state.replace(distill=jax.tree.map(_shape_dtype_struct, distill_state)),
                _abstract_global_batch(batch, experiment.mesh),
            )

    if state is not None:
        compile_first_step()
    else:
        init_fn = jit_init_state(
            experiment.model,
            experiment.optimizer,
            config.data.image_size,
            experiment.mesh,
            experiment.quant_config,
        )
        rng = jax.random.key(config.seed)
        traced = init_fn.trace(rng, start_variables)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            compiled_init = pool.submit(lambda: traced.lower().compile())
            compile_first_step()
            state = compiled_init.result()(rng, start_variables)
        if cache_path is not None:
            traced_steps.write_state(cache_path, state)
    return restore_latest(manager, state.replace(distill=distill_state))


def _abstract_train_state(experiment: Experiment) -> TrainState:
    """The fresh TrainState's shapes, dtypes and (replicated) shardings, from the model's
    already known variable shapes: without tracing the model's init again."""
    create = functools.partial(
        create_train_state,
        experiment.model,
        experiment.optimizer,
        experiment.config.data.image_size,
        quant_config=experiment.quant_config,
    )
    shapes = jax.eval_shape(create, jax.random.key(0), experiment.variables)
    replicated = NamedSharding(experiment.mesh, PartitionSpec())
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), shapes
    )


def _shape_dtype_struct(array: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def _abstract_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
    """The shapes `global_batch` gives this process's rows: every process adds as many."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {
        name: jax.ShapeDtypeStruct(
            (local_batch[name].shape[0] * jax.process_count(), *local_batch[name].shape[1:]),
            local_batch[name].dtype,
            sharding=sharding,
        )
        for name in TRAIN_FIELDS
    }


def _train_batches(experiment: Experiment, start_step: int, end_step: int) -> Iterator[dict]:
    return pipeline.iterate_batches(
        experiment_train_dataset(experiment),
        start_step,
        max(end_step - start_step, 0),
        experiment.config.data.num_workers,
    )


def compression_summary(
    experiment: Experiment, state: TrainState, workdir: str, metrics: dict[str, float]
) -> dict[str, Any]:
    """What the trained model costs: non-zeros, FLOPs, bytes on disk; channel-pruned, shrunk.

    Exports the model dense and sparse (`workdir/export/{dense,sparse}`); a
    channel-pruned model is also shrunk into a smaller model (`export/shrunk`),
    evaluated, and its widths recorded as `config.model.channels`; an int8 model is
    converted, exported and evaluated on the int8 serving path. Everything goes to
    `workdir/compression.json`, the per-layer sparsity also to `sparsity.md` and
    `sparsity.png`.
    """
    config = experiment.config
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    export_dir = os.path.join(os.path.abspath(workdir), "export")
    exported = compress.export_report(
        experiment.model, variables, config.data.image_size, export_dir
    )
    masks = prune.masks_of(state.opt_state) if config.prune.method != "none" else None
    summary: dict[str, Any] = {
        "model": {**exported, "AP": metrics["AP"], "AP50": metrics["AP50"]},
        "layers": prune.sparsity_report(variables["params"], jax.device_get(masks)),
    }
    if config.prune.method == "channel":
        model, shrunk_variables, widths = compress.shrink_channels(
            variables, config, pipeline.num_classes(experiment.builder)
        )
        shrunk = dataclasses.replace(
            experiment,
            model=model,
            eval_step=jit_eval_step(model, config.eval.top_k, experiment.mesh),
        )
        replicated = NamedSharding(experiment.mesh, PartitionSpec())
        shrunk_state = TrainState(
            step=state.step,
            params=jax.device_put(shrunk_variables["params"], replicated),
            batch_stats=jax.device_put(shrunk_variables["batch_stats"], replicated),
            opt_state=None,
        )
        shrunk_metrics = evaluate_experiment(shrunk, shrunk_state)
        summary["shrunk"] = {
            **compress.export_report(
                model, shrunk_variables, config.data.image_size, os.path.join(export_dir, "shrunk")
            ),
            "AP": shrunk_metrics["AP"],
            "AP50": shrunk_metrics["AP50"],
            "channels": sorted(widths.items()),
        }
    if experiment.quant_config is not None:
        int8_tree = jax.device_get(
            quant.convert_to_int8(
                state.params, state.batch_stats, state.quant_stats, experiment.quant_config
            )
        )
        int8_experiment = dataclasses.replace(
            experiment,
            eval_step=jit_eval_step(
                experiment.model,
                config.eval.top_k,
                experiment.mesh,
                experiment.quant_config,
                int8=True,
            ),
        )
        replicated = NamedSharding(experiment.mesh, PartitionSpec())
        int8_metrics = evaluate_experiment(int8_experiment, jax.device_put(int8_tree, replicated))
        # Same layers, parameters and FLOPs as the fake-quant model; int8 storage.
        summary["int8"] = {
            **summary["model"],
            **compress.save_and_measure(int8_tree, os.path.join(export_dir, "int8")),
            "AP": int8_metrics["AP"],
            "AP50": int8_metrics["AP50"],
        }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "compression.json"), "w") as f:
            json.dump(summary, f, indent=2, default=_json_default)
        with open(os.path.join(workdir, "sparsity.md"), "w") as f:
            f.write(prune.format_sparsity_table(summary["layers"]) + "\n")
        report.plot_layer_sparsity(summary["layers"], os.path.join(workdir, "sparsity.png"))
        print(compress.format_compression_table(summary), flush=True)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _train_loop(
    experiment, state, batches: Iterator[dict], start_step, manager, writer, workdir, end_step
) -> dict:
    config = experiment.config
    pending: list[tuple[int, dict]] = []
    bad_examples = {"num_bad_boxes": 0, "num_truncated": 0}
    last_scalars: dict[str, float] = {}
    progress = tqdm.tqdm(
        total=config.train.steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    timer_step, timer_start = start_step, time.perf_counter()
    train_seconds = 0.0  # excludes evaluation and the first (compiling) step
    first_step_seconds = float("nan")
    step = start_step
    stopping = False
    with StopRequest() as stop:
        for local_batch in batches:
            for name in bad_examples:
                bad_examples[name] += int(local_batch[name].sum())
            state, metrics = experiment.train_step_at(step)(
                state, global_batch(local_batch, experiment.mesh, TRAIN_FIELDS)
            )
            step += 1
            pending.append((step, metrics))
            progress.update(1)
            if step == start_step + 1:
                # Time the compile on its own so that images/s measures training only.
                jax.block_until_ready(metrics)
                first_step_seconds = time.perf_counter() - timer_start
                timer_step, timer_start = step, time.perf_counter()
            last_step = step == config.train.steps
            stopping = (
                stop.is_set()
                or manager.reached_preemption(step)
                or step == end_step < config.train.steps
            )
            saving = step % config.train.checkpoint_every == 0 or last_step or stopping
            if step % config.train.log_every == 0 or saving:
                last_scalars = summarize_metrics(pending)
                pending.clear()
                elapsed = time.perf_counter() - timer_start
                train_seconds += elapsed
                images_per_second = (step - timer_step) * config.train.batch_size / elapsed
                timer_step, timer_start = step, time.perf_counter()
                last_scalars.update(
                    images_per_second=images_per_second, **_all_processes_sum(bad_examples)
                )
                writer.write(step, last_scalars)
                progress.set_postfix(
                    loss=f"{last_scalars['total']:.3f}", img_s=f"{images_per_second:.1f}"
                )
            if saving:
                save_checkpoint(manager, state)
            if stopping:
                logging.warning("Stop requested: saved step %d to %s", step, manager.directory)
                break
            if config.train.eval_every and step % config.train.eval_every == 0 and not last_step:
                writer.write(
                    step,
                    {f"eval/{k}": v for k, v in evaluate_experiment(experiment, state).items()},
                )
                timer_start = time.perf_counter()  # images/s counts training only
    progress.close()
    metrics = None
    if not stopping:
        metrics = evaluate_experiment(experiment, state)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump({"step": step, **metrics}, f, indent=2)
    return {
        "state": state,
        "step": step,
        "preempted": stopping,
        "metrics": metrics,
        "train": last_scalars,
        "images_per_second": _mean_rate(step - start_step - 1, config, train_seconds),
        "first_step_seconds": first_step_seconds,
    }


def _all_processes_sum(counts: dict[str, int]) -> dict[str, int]:
    """Sums per-process counters over all processes (every process logs at the same steps)."""
    if jax.process_count() == 1:
        return dict(counts)
    totals = multihost_utils.process_allgather(np.array(list(counts.values()))).sum(axis=0)
    return {name: int(total) for name, total in zip(counts, totals, strict=True)}


def _mean_rate(steps: int, config: ml_collections.ConfigDict, seconds: float) -> float:
    return steps * config.train.batch_size / seconds if steps > 0 and seconds else float("nan")

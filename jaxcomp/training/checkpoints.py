"""Checkpoints (orbax) and the checks that come before any work: the workdir, shapes.

A checkpoint holds every field of the `TrainState` in use, the methods' states and
parameters among them, without knowing any method.
"""

import errno
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxcomp import paths
from jaxcomp.sharding import make_mesh
from jaxcomp.training.state import TrainState


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
    # A dict of the fields in use: a run that leaves a field None (no method state)
    # writes nothing for it.
    return {name: value for name, value in vars(state).items() if value is not None}


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

    Raises:
      FileNotFoundError: `workdir` holds no checkpoint.
      ValueError: the run has not reached the steps of its config.json (stopped, or
        still training), or its variables do not fit `expected`.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    step = ocp.CheckpointManager(directory).latest_step() if os.path.isdir(directory) else None
    if step is None:
        raise FileNotFoundError(
            f"{field}={workdir!r} holds no checkpoint (looked in {directory}); train "
            "that model first (see its config's docstring), point the field at a "
            f"finished run's workdir, or set --{field}='' to do without it"
        )
    _check_finished(workdir, step, field)
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


def _check_finished(workdir: str, step: int, field: str) -> None:
    """Refuses a run whose newest checkpoint comes before the steps its config.json asks for.

    Such a run was stopped, or is still training: starting from it would silently start
    from an intermediate model. A workdir without config.json (not written by
    `train_and_evaluate`) is taken as it is.
    """
    config_file = os.path.join(workdir, "config.json")
    if not os.path.exists(config_file):
        return
    with open(config_file) as f:
        steps = json.load(f).get("train", {}).get("steps")
    if isinstance(steps, int) and step < steps:
        raise ValueError(
            f"{field}={workdir!r} is an unfinished run: its newest checkpoint is step {step} "
            f"of the {steps} its config.json asks for (it was stopped, or is still "
            "training); finish it first (python -m jaxcomp.main --config=<its config> "
            f"--workdir={workdir} resumes it), or wait until it ends"
        )


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

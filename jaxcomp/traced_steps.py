"""What a second start of a config reads back instead of recomputing: its train steps,
traced and lowered, its initial state and its model's variable shapes.

JAX's persistent compilation cache spares a second start XLA's compile, but not the
Python tracing and lowering that come before it: 2-3 s for a MobileNetV2 detector's
train step on a 2-core CPU, more than loading its cached executable. `cached_step`
keeps the lowered step (`jax.export`, serialized StableHLO) in a directory. Likewise
the initial state (random parameters, zero optimizer moments) is a pure function of
the config: `initial_state_path`, `read_state` and `write_state` keep it, so that a
second start neither traces, lowers and loads the init program (about 3 s of CPU
for the student) nor runs it; `cached_shapes` keeps the variable shapes that
`jax.eval_shape` of the model's init finds. All are keyed by everything that can
change them:

- the caller's key (the experiment config and which step it is);
- the bytes of jaxcomp's own source files;
- the versions of jax, jaxlib, flax and optax, and JAX's numerics flags;
- the backend and its devices;
- the arguments' (or the state's) tree structure, shapes, dtypes and shardings.

They live in `jaxcomp_traced/` inside JAX's compilation cache directory (`cache_directory`).
Single-process runs only: a multi-process run traces and initializes as usual. So
does a process that registered code of its own in jaxcomp's registries (a new
pruning score in a notebook, say): that code is not in the key, and an edit to it
must not bring back the program traced before the edit.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DIGEST_BYTES = 64  # hex sha256 of the payload, written before it


def cache_directory() -> pathlib.Path | None:
    """`jaxcomp_traced/` in JAX's compilation cache directory; None when that cache is off."""
    cache_dir = jax.config.jax_compilation_cache_dir
    return pathlib.Path(cache_dir) / "jaxcomp_traced" if cache_dir else None


def defined_in_jaxcomp(obj) -> bool:
    """Whether `obj` (a function, class or `functools.partial` of one) is jaxcomp's own
    code, whose bytes the keys cover."""
    obj = getattr(obj, "func", obj)
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "jaxcomp"


def registered_elsewhere() -> list[str]:
    """Entries of jaxcomp's registries whose code lives outside jaxcomp, e.g.
    ["prune.SCORES['movement']"]; while there are any, nothing is read back or kept."""
    from jaxcomp.distill.losses import LOSSES
    from jaxcomp.models import MODELS
    from jaxcomp.prune.schedules import SCHEDULES
    from jaxcomp.prune.scores import SCORES

    registries = {
        "models.MODELS": MODELS,
        "prune.SCORES": SCORES,
        "prune.SCHEDULES": SCHEDULES,
        "distill.LOSSES": LOSSES,
    }
    return [
        f"{registry}[{name!r}]"
        for registry, entries in registries.items()
        for name, entry in entries.items()
        if not defined_in_jaxcomp(entry)
    ]


def _reads_back() -> bool:
    """Whether this process may use the start-up caches (see the module docstring)."""
    if jax.process_count() > 1:
        return False
    elsewhere = tuple(registered_elsewhere())
    if elsewhere:
        _log_caches_off(elsewhere)
    return not elsewhere


@functools.cache
def _log_caches_off(elsewhere: tuple[str, ...]) -> None:
    # Once per set of entries: a cached step asks before every call.
    logging.info("start-up caches off: %s registered outside jaxcomp", ", ".join(elsewhere))


def cached_step(step: Callable, directory: str | None, name: str, key: str) -> Callable:
    """`step`, traced once per key and then read back from `directory` by later processes.

    Args:
      step: a jitted f(state, *args) -> (new_state, metrics) whose new_state has the
        structure of state, and which donates state (argument 0).
      directory: where the lowered steps are kept (created if missing); None returns
        `step` unchanged.
      name: names the files (`<name>-<digest>.exported`).
      key: identifies the program beyond what the arguments show, e.g. the config as
        JSON: two steps with equal keys and equal argument shapes must be the same program.

    Returns:
      A callable like `step`: same results, same donation.
    """
    if directory is None:
        return step
    return _CachedStep(step, pathlib.Path(directory), name, key)


def compile_ahead(step: Callable, *args) -> None:
    """Compiles `step` (jitted, or from `cached_step`) for `args`, arrays or
    `jax.ShapeDtypeStruct`s with shardings, so that its first call on such arguments
    runs without tracing or compiling."""
    if isinstance(step, _CachedStep):
        step = step._program_for(args[0], args[1:])
    step.trace(*args).lower().compile()


class _CachedStep:
    def __init__(self, step: Callable, directory: pathlib.Path, name: str, key: str):
        self._step = step
        self._directory = directory
        self._name = name
        self._key = key
        self._programs: dict[Any, Callable] = {}

    def __call__(self, state, *args):
        return self._program_for(state, args)(state, *args)

    def _program_for(self, state, args: tuple) -> Callable:
        if not _reads_back():
            return self._step
        leaves, structure = jax.tree.flatten((state, args))
        signature = (structure, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        program = self._programs.get(signature)
        if program is None:
            program = self._programs[signature] = self._program(state, args)
        return program

    def _cache_size(self) -> int:
        """Like `jax.jit`'s: how many programs this step has compiled."""
        return sum(program._cache_size() for program in set(self._programs.values()))

    def _program(self, state, args: tuple) -> Callable:
        """A jitted f(state, *args) that calls the exported step, read back or exported now."""
        state_leaves, state_structure = jax.tree.flatten(state)
        path = self._directory / f"{self._name}-{_digest(self._key, (state, args))}.exported"
        exported = _read(path)
        if exported is None:

            def flat_step(leaves, *args):
                new_state, metrics = self._step(jax.tree.unflatten(state_structure, leaves), *args)
                new_leaves, new_structure = jax.tree.flatten(new_state)
                if new_structure != state_structure:
                    raise ValueError(
                        f"it returns a state of structure {new_structure}, not that of its "
                        f"argument, {state_structure}"
                    )
                return new_leaves, metrics

            try:
                exported = jax.export.export(jax.jit(flat_step))(state_leaves, *args)
            except Exception as error:  # noqa: BLE001 (a cache: anything unexportable runs as is)
                logging.warning(
                    "%s is not kept traced (%s); tracing it at every start", self._name, error
                )
                return self._step
            _write(path, exported)

        def run(state, *args):
            new_leaves, metrics = exported.call(jax.tree.leaves(state), *args)
            return jax.tree.unflatten(state_structure, new_leaves), metrics

        # The new state keeps the state's shardings, so that the next call is a cache hit.
        state_shardings = jax.tree.map(lambda leaf: getattr(leaf, "sharding", None), state)
        return jax.jit(run, donate_argnums=0, out_shardings=(state_shardings, None))


def _digest(key: str, tree) -> str:
    arguments = [
        (path, leaf.shape, str(leaf.dtype), str(getattr(leaf, "sharding", None)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]
    described = repr((key, _environment(), str(jax.tree.structure(tree)), arguments))
    return hashlib.sha256(described.encode()).hexdigest()[:32]


@functools.cache
def _environment() -> tuple:
    """What, besides the key and the arguments, decides the traced program."""
    package = pathlib.Path(__file__).parent
    sources = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        sources.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    versions = {
        name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")
    }
    flags = {
        name: getattr(jax.config, name)
        for name in (
            "jax_enable_x64",
            "jax_default_matmul_precision",
            "jax_default_prng_impl",
            "jax_threefry_partitionable",
        )
    }
    devices = [device.device_kind for device in jax.devices()]
    return sources.hexdigest(), sorted(versions.items()), sorted(flags.items()), devices


def _read(path: pathlib.Path) -> jax.export.Exported | None:
    """The step stored at `path`, or None when missing or damaged (then it is re-exported)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    payload = data[_DIGEST_BYTES:]
    if data[:_DIGEST_BYTES] != hashlib.sha256(payload).hexdigest().encode():
        logging.warning("%s is damaged (its checksum does not match); tracing the step again", path)
        return None
    return jax.export.deserialize(bytearray(payload))


def _write(path: pathlib.Path, exported: jax.export.Exported) -> None:
    payload = exported.serialize()

    def write(file):
        file.write(hashlib.sha256(payload).hexdigest().encode())
        file.write(payload)

    _write_atomically(path, write)


def initial_state_path(key: str, abstract_state) -> pathlib.Path | None:
    """Where the initial state of `key` is kept (`initial_state-<digest>.npz`).

    Args:
      key: identifies the state beyond its shapes, e.g. the config as JSON (its seed,
        model and optimizer): equal keys and shapes must mean equal initial states.
      abstract_state: the state's `jax.ShapeDtypeStruct`s, with shardings.

    Returns:
      The path, or None when the compilation cache is off, several processes run or
      code from outside jaxcomp is registered.
    """
    cache = cache_directory()
    if cache is None or not _reads_back():
        return None
    return cache / f"initial_state-{_digest(key, abstract_state)}.npz"


def read_state(path: pathlib.Path, abstract_state):
    """The state kept at `path`, placed with `abstract_state`'s shardings.

    Returns:
      The state, or None when the file is missing, damaged or of other shapes (a
      warning is logged for the last two; the caller initializes as usual).
    """
    expected, structure = jax.tree.flatten(abstract_state)
    try:
        with np.load(path) as stored:
            leaves = [stored[f"leaf_{index}"] for index in range(len(expected))]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logging.warning("%s cannot be read (%s); initializing again", path, error)
        return None
    for leaf, want in zip(leaves, expected, strict=True):
        if leaf.shape != want.shape or leaf.dtype != want.dtype:
            logging.warning(
                "%s holds a %s %s leaf where the state has %s %s; initializing again",
                path,
                leaf.shape,
                leaf.dtype,
                want.shape,
                want.dtype,
            )
            return None
    placed = [
        jax.device_put(leaf, want.sharding) for leaf, want in zip(leaves, expected, strict=True)
    ]
    return jax.tree.unflatten(structure, placed)


def write_state(path: pathlib.Path, state) -> None:
    """Keeps `state` at `path` for `read_state` (compressed: most leaves are zeros)."""
    leaves = jax.device_get(jax.tree.leaves(state))
    _write_atomically(
        path,
        lambda file: np.savez_compressed(
            file, **{f"leaf_{index}": leaf for index, leaf in enumerate(leaves)}
        ),
    )


def _write_atomically(path: pathlib.Path, write: Callable) -> None:
    """`write(file)` into a temporary file renamed to `path`, so that a reader sees the
    whole file or none of it. A cache that cannot be written is logged, not raised:
    the run goes on without it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp")
        try:
            with file:
                write(file)
            os.replace(file.name, path)
        finally:
            if os.path.exists(file.name):  # a write that failed half-way
                os.unlink(file.name)
    except OSError as error:
        logging.warning("cannot keep %s for the next start (%s); going on without it", path, error)


def cached_shapes(compute: Callable[[], dict], name: str, key: str) -> dict:
    """`compute()`, or the copy that an earlier start kept for `key`.

    For shapes that take a trace to find, such as `jax.eval_shape` of a Flax model's
    init (0.5 s for the student, on every start).

    Args:
      compute: returns a nested dict of `jax.ShapeDtypeStruct`s (without shardings).
      name: names the file (`<name>-<digest>.json` in `cache_directory()`).
      key: identifies the result, e.g. the model's repr and the input size.

    Returns:
      The nested dict; computed when caches are off (as for `initial_state_path`), or
      the file is missing or damaged.
    """
    cache = cache_directory()
    if cache is None or not _reads_back():
        return compute()
    path = cache / f"{name}-{_digest(key, None)}.json"
    try:
        return _shapes_from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as error:
        logging.warning("%s cannot be read (%s); computing it again", path, error)
    shapes = compute()
    encoded = json.dumps(_shapes_to_json(shapes))
    _write_atomically(path, lambda file: file.write(encoded.encode()))
    return shapes


def _shapes_to_json(tree):
    if isinstance(tree, dict):
        return {name: _shapes_to_json(subtree) for name, subtree in tree.items()}
    return [str(tree.dtype), list(tree.shape)]


def _shapes_from_json(tree):
    if isinstance(tree, dict):
        return {name: _shapes_from_json(subtree) for name, subtree in tree.items()}
    dtype, shape = tree
    return jax.ShapeDtypeStruct(tuple(int(size) for size in shape), jnp.dtype(dtype))

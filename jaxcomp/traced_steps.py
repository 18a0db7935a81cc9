"""Train steps kept traced and lowered on disk, so that a second start skips tracing them.

JAX's persistent compilation cache spares a second start XLA's compile, but not the
Python tracing and lowering that come before it: 2-3 s for a MobileNetV2 detector's
train step on a 2-core CPU, more than loading its cached executable. `cached_step`
keeps the lowered step (`jax.export`, serialized StableHLO) in a directory, keyed by
everything that can change the program:

- the caller's key (the experiment config and which step it is);
- the bytes of jaxcomp's own source files;
- the versions of jax, jaxlib, flax and optax, and JAX's numerics flags;
- the backend and its devices;
- the arguments' tree structure, shapes, dtypes and shardings.

A second start of the same config reads the step back and goes straight to the
(cached) compile. Single-process runs only: a multi-process run traces as usual.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import jax

_DIGEST_BYTES = 64  # hex sha256 of the payload, written before it


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
        if jax.process_count() > 1:
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
        path = self._directory / f"{self._name}-{self._digest(state, args)}.exported"
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

    def _digest(self, state, args: tuple) -> str:
        arguments = [
            (path, leaf.shape, str(leaf.dtype), str(getattr(leaf, "sharding", None)))
            for path, leaf in jax.tree_util.tree_leaves_with_path((state, args))
        ]
        described = repr(
            (self._key, _environment(), str(jax.tree.structure((state, args))), arguments)
        )
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
    """Writes atomically, so that a reader sees the whole file or none of it."""
    payload = exported.serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(hashlib.sha256(payload).hexdigest().encode())
        file.write(payload)
    os.replace(file.name, path)

"""The device mesh and where each array of the train state lives on it.

`config.mesh` names the mesh's axes and their sizes (one size may be -1: every
device left), the axes each batch is split over, and sharding rules
`[(regex over leaf names, PartitionSpec), ...]` for the train state: the same
path-rule mechanism as pruning and quantization (`jaxcomp.paths`: first rule whose
regex matches the whole leaf name wins, a rule that matches nothing is an error).
Leaves no rule matches are replicated. The default is data parallel: one `data`
axis over every device of every process, the state replicated.

Leaf names are those of the whole `TrainState`, so one rule reaches a kernel and
its optimizer moments and pruning mask alike: `params/backbone/stem/conv/kernel`,
`opt_state/.../mu/backbone/stem/conv/kernel`.

Example (FSDP over 4 devices, data parallel over the rest):

  config.mesh.axes = (("data", -1), ("fsdp", 4))
  config.mesh.batch_axes = ("data", "fsdp")
  config.mesh.rules = ((r".*backbone/.*/kernel", (None, None, None, "fsdp")),)
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxcomp import paths

DATA_PARALLEL = (("data", -1),)


def mesh_shape(axes: Sequence[tuple[str, int]], device_count: int) -> dict[str, int]:
    """{axis name: size} with a -1 size resolved; raises ValueError naming what is wrong.

    Args:
      axes: `config.mesh.axes`, ((name, size), ...); at most one size is -1.
      device_count: the number of devices the mesh spans (every process's).

    Example:
      >>> mesh_shape((("data", -1), ("fsdp", 4)), 8)
      {'data': 2, 'fsdp': 4}
    """
    fix = "e.g. config.mesh.axes = (('data', -1), ('fsdp', 4))"
    if not axes or any(
        not (isinstance(axis, tuple | list) and len(axis) == 2 and isinstance(axis[0], str))
        for axis in axes
    ):
        raise ValueError(f"config.mesh.axes must be ((name, size), ...), got {axes!r}; {fix}")
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh.axes names an axis twice: {names}")
    sizes = [size for _, size in axes]
    if any(not isinstance(size, int) or (size < 1 and size != -1) for size in sizes):
        raise ValueError(f"config.mesh.axes sizes must be >= 1 or -1, got {sizes}; {fix}")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh.axes may have one size of -1, got {sizes}")
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ValueError(
                f"config.mesh.axes {list(axes)}: the {device_count} devices do not divide "
                f"into the fixed sizes' product {fixed}; pick sizes whose product divides "
                f"{device_count}"
            )
        sizes = [device_count // fixed if size == -1 else size for size in sizes]
    elif fixed != device_count:
        raise ValueError(
            f"config.mesh.axes {list(axes)} spans {fixed} devices, but there are "
            f"{device_count}; make one size -1 to take the rest"
        )
    return dict(zip(names, sizes, strict=True))


def make_mesh(axes: Sequence[tuple[str, int]] = DATA_PARALLEL) -> Mesh:
    """The mesh of `config.mesh.axes` over every device of every process.

    Its axes are `Auto`: the rules place the inputs and outputs of each jitted step,
    and XLA propagates shardings through it, gathering FSDP-split kernels where a
    convolution needs them whole (`Explicit` axes would refuse such a convolution).
    """
    shape = mesh_shape(axes, jax.device_count())
    return jax.make_mesh(
        tuple(shape.values()), tuple(shape), axis_types=(AxisType.Auto,) * len(shape)
    )


def batch_split(shape: dict[str, int], batch_axes: Sequence[str]) -> int:
    """How many ways a batch is split: the product of the batch axes' sizes.

    Raises:
      ValueError: a batch axis is not an axis of the mesh.
    """
    unknown = [axis for axis in batch_axes if axis not in shape]
    if unknown or not batch_axes:
        raise ValueError(
            f"config.mesh.batch_axes={tuple(batch_axes)} must name axes of config.mesh.axes "
            f"{tuple(shape)}"
        )
    return math.prod(shape[axis] for axis in batch_axes)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = ("data",)) -> NamedSharding:
    """Rows split over `batch_axes` (together), replicated over the mesh's other axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: paths.Rules = ()) -> Any:
    """A NamedSharding for every leaf of `abstract_state`, chosen by `rules`.

    Args:
      abstract_state: the train state's shapes (`jax.eval_shape`) or arrays.
      mesh: the device mesh.
      rules: [(regex, PartitionSpec or tuple), ...]; unmatched leaves are replicated.

    Raises:
      ValueError: a rule matches no leaf, or a spec does not fit a leaf it matches
        (more dimensions than the leaf, an axis not in the mesh, or a dimension its
        axes do not divide); the message names the leaves.

    Example:
      >>> mesh = make_mesh()
      >>> tree = {"conv": {"kernel": np.zeros((3, 3, 1, 8)), "bias": np.zeros(8)}}
      >>> shardings = state_shardings(tree, mesh, [(".*kernel", (None, None, None, "data"))])
      >>> shardings["conv"]["kernel"].spec, shardings["conv"]["bias"].spec
      (P(None, None, None, 'data'), P())
    """
    names = paths.leaf_names(abstract_state)
    leaves, treedef = jax.tree.flatten(abstract_state)
    # Specs are tuples, so read them back at the state's leaf positions, not as leaves.
    chosen = (
        treedef.flatten_up_to(paths.resolve_rules(abstract_state, rules))
        if rules
        else [None] * len(leaves)
    )
    shardings, problems = [], []
    for name, leaf, spec in zip(names, leaves, chosen, strict=True):
        spec = PartitionSpec() if spec is None else PartitionSpec(*spec)
        problem = _misfit(spec, np.shape(leaf), mesh)
        if problem:
            problems.append(f"{name} {tuple(np.shape(leaf))}: {problem}")
        else:
            shardings.append(NamedSharding(mesh, spec))
    if problems:
        raise ValueError(
            f"config.mesh.rules do not fit {len(problems)} leaves: {problems[:3]}; narrow the "
            "regex to the leaves whose dimensions the mesh axes divide "
            "(jaxcomp.paths.leaf_names(state) lists the names)"
        )
    return jax.tree.unflatten(treedef, shardings)


def _misfit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> str:
    """Why `spec` cannot shard an array of `shape` on `mesh` evenly, or ''."""
    if len(spec) > len(shape):
        return f"{spec} has more dimensions than the leaf"
    for dim, axes in zip(shape, spec, strict=False):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [axis for axis in axes if axis not in mesh.shape]
        if unknown:
            return f"{spec} names {unknown}, not axes of the mesh {dict(mesh.shape)}"
        ways = math.prod(mesh.shape[axis] for axis in axes)
        if dim % ways:
            return f"{spec} splits a dimension of {dim} {ways} ways"
    return ""

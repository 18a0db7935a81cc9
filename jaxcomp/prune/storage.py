"""Pruned params that are really smaller on disk: a bitmask of non-zeros plus their values.

`save_sparse` stores each leaf as `np.packbits` of its non-zero entries and the
non-zero entries themselves; all leaves' bitmasks and all their values are
concatenated into two byte arrays written with orbax (one array per leaf would
cost orbax's per-array metadata, ~1 KB each, which outweighs a small model's
weights), and a small JSON records names, shapes, dtypes, offsets and the tree's
containers. "Non-zero" is decided on the raw bit
pattern, so -0.0 and NaN payloads round-trip bit-exactly; values are stored as
raw bytes for the same reason. A leaf where the bitmask does not pay off (few
zeros) is stored dense. `save_dense` is a plain orbax save of the same tree, so
that `directory_bytes` compares like for like (both go through orbax's
compression). `entropy_coded_bytes` measures the same packed content after zstd
and gzip.
"""

import gzip
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import zstandard

from jaxcomp.paths import leaf_names

_ARRAYS = "arrays"
_METADATA = "sparse_tree.json"
_FORMAT = 2


def _write_orbax(directory: str, tree: Any) -> None:
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.abspath(directory), tree)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def _read_orbax(directory: str) -> Any:
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(os.path.abspath(directory))
    finally:
        checkpointer.close()


def save_dense(directory: str, tree: Any) -> None:
    """Saves `tree` as a plain orbax checkpoint (the baseline for `directory_bytes`).

    Args:
      directory: a path that does not exist yet.
      tree: a pytree of arrays.
    """
    _write_orbax(directory, tree)


def directory_bytes(path: str) -> int:
    """The total size in bytes of the files under `path`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _encode_structure(node: Any) -> Any:
    """JSON for a tree whose leaves were replaced by their indices, or None if not plain."""
    if isinstance(node, int):
        return node
    if node is None:
        return {"none": None}
    if type(node) is dict and all(isinstance(key, str) for key in node):
        children = {key: _encode_structure(child) for key, child in node.items()}
        return None if None in children.values() else {"dict": children}
    if type(node) in (list, tuple):
        children = [_encode_structure(child) for child in node]
        return None if None in children else {type(node).__name__: children}
    return None


def _decode_structure(encoded: Any, leaves: list[Any]) -> Any:
    if isinstance(encoded, int):
        return leaves[encoded]
    ((kind, children),) = encoded.items()
    if kind == "none":
        return None
    if kind == "dict":
        return {key: _decode_structure(child, leaves) for key, child in children.items()}
    decoded = [_decode_structure(child, leaves) for child in children]
    return decoded if kind == "list" else tuple(decoded)


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """The bytes of each entry: shape [size, itemsize], uint8."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8).reshape(flat.size, array.dtype.itemsize)


def _pack(tree: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The packed form of `tree`: its metadata (JSON) and the 'bits' and 'values' bytes."""
    leaves, treedef = jax.tree.flatten(tree)
    records, bit_chunks, value_chunks = [], [], []
    bits_offset = values_offset = 0
    for name, leaf in zip(leaf_names(tree), leaves, strict=True):
        array = np.asarray(leaf)
        record = {"name": name, "shape": list(array.shape), "dtype": array.dtype.name}
        raw = _raw_bytes(array)
        nonzero = raw.any(axis=1)
        count = int(nonzero.sum())
        if count == 0:
            record["kind"] = "zeros"
        elif array.size / 8 + count * array.dtype.itemsize < array.nbytes:
            record["kind"] = "sparse"
            bits = np.packbits(nonzero)
            record["bits"] = [bits_offset, bits.size]
            bit_chunks.append(bits)
            bits_offset += bits.size
            values = raw[nonzero].reshape(-1)
        else:
            record["kind"] = "dense"
            values = raw.reshape(-1)
        if count:
            record["values"] = [values_offset, values.size]
            value_chunks.append(values)
            values_offset += values.size
        records.append(record)
    index_tree = jax.tree.unflatten(treedef, list(range(len(leaves))))
    metadata = {"format": _FORMAT, "structure": _encode_structure(index_tree), "leaves": records}
    arrays = {
        name: np.concatenate(chunks)
        for name, chunks in (("bits", bit_chunks), ("values", value_chunks))
        if chunks
    }
    return metadata, arrays


def save_sparse(directory: str, tree: Any) -> None:
    """Saves `tree` with each leaf as a bitmask of its non-zero entries plus their values.

    Args:
      directory: a path that does not exist yet, or an empty directory.
      tree: a pytree of arrays (any dtype). Trees of dicts, lists, tuples and
        None restore as such; for other containers pass `target=` to `load_sparse`.

    Example:
      >>> pruned = {"kernel": np.where(np.arange(4096) % 10 == 0, 1.5, 0.0).astype(np.float32)}
      >>> save_sparse("/tmp/pruned", pruned)
      >>> np.array_equal(load_sparse("/tmp/pruned")["kernel"], pruned["kernel"])
      True
    """
    metadata, arrays = _pack(tree)
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        raise ValueError(f"save_sparse needs a new or empty directory, {directory!r} has files")
    if arrays:
        _write_orbax(os.path.join(directory, _ARRAYS), arrays)
    with open(os.path.join(directory, _METADATA), "w") as file:
        json.dump(metadata, file)


def entropy_coded_bytes(tree: Any, zstd_level: int = 19) -> dict[str, int]:
    """The bytes of `save_sparse`'s content (metadata, bitmasks, values) after a standard coder.

    The same bytes `save_sparse` writes, without orbax's container, coded whole by zstd
    and by gzip -9 (as TF-MOT's size guides do): what a general-purpose entropy coder
    still finds in the packed values, as Deep Compression's Huffman stage does.

    Args:
      tree: a pytree of arrays.
      zstd_level: zstd's compression level (19: the highest without --ultra).

    Returns:
      {'bytes_zstd': ..., 'bytes_gzip': ...}.

    Example:
      >>> tree = {"kernel": np.where(np.arange(4096) % 10 == 0, 1.5, 0.0).astype(np.float32)}
      >>> entropy_coded_bytes(tree)["bytes_zstd"] < tree["kernel"].nbytes / 10
      True
    """
    metadata, arrays = _pack(tree)
    content = json.dumps(metadata).encode() + b"".join(array.tobytes() for array in arrays.values())
    return {
        "bytes_zstd": len(zstandard.ZstdCompressor(level=zstd_level).compress(content)),
        "bytes_gzip": len(gzip.compress(content, compresslevel=9, mtime=0)),
    }


def _decode_leaf(record: dict, stored: dict) -> np.ndarray:
    dtype = np.dtype(jax.numpy.dtype(record["dtype"]))
    shape = tuple(record["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    raw = np.zeros((size, dtype.itemsize), np.uint8)
    if record["kind"] != "zeros":
        start, length = record["values"]
        values = np.asarray(stored["values"][start : start + length], np.uint8)
        if record["kind"] == "sparse":
            start, length = record["bits"]
            nonzero = np.unpackbits(stored["bits"][start : start + length], count=size)
            raw[nonzero.astype(bool)] = values.reshape(-1, dtype.itemsize)
        else:
            raw = values.reshape(size, dtype.itemsize)
    return raw.reshape(-1).view(dtype).reshape(shape)


def load_sparse(directory: str, target: Any = None) -> Any:
    """Loads a tree written by `save_sparse`: same structure, dtypes and bits.

    Args:
      directory: the directory given to `save_sparse`.
      target: optional tree with the structure to restore into (e.g. an
        `nnx.State` or the output of `jax.eval_shape`); needed when the saved
        tree had containers other than dicts, lists and tuples.

    Returns:
      The tree, with numpy arrays as leaves.
    """
    with open(os.path.join(directory, _METADATA)) as file:
        metadata = json.load(file)
    records = metadata["leaves"]
    arrays_dir = os.path.join(directory, _ARRAYS)
    stored = _read_orbax(arrays_dir) if os.path.exists(arrays_dir) else {}
    leaves = [_decode_leaf(record, stored) for record in records]
    if target is not None:
        names = [record["name"] for record in records]
        if leaf_names(target) != names:
            raise ValueError(
                f"target's leaves {leaf_names(target)[:3]}... do not match the saved leaves "
                f"{names[:3]}...; pass a target with the saved tree's structure"
            )
        return jax.tree.unflatten(jax.tree.structure(target), leaves)
    if metadata["structure"] is None:
        raise ValueError(
            f"{directory!r} holds a tree with custom containers; pass target= with its structure"
        )
    return _decode_structure(metadata["structure"], leaves)

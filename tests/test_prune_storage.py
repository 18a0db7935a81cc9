"""Sparse storage: bit-exact round trips and fewer bytes on disk than a dense checkpoint."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.prune.storage import directory_bytes, load_sparse, save_dense, save_sparse


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _assert_bit_identical(restored, original) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True):
        want = np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _bits(got) == _bits(want)


def _awkward_tree() -> dict:
    signed = np.array([[0.0, -0.0, 1.5], [np.nan, -np.inf, 0.0]], np.float32)
    payload_nan = np.array([0x7FC00123, 0, 0xFFC00000, 0], np.uint32).view(np.float32)
    sparse = np.zeros((64, 32), np.float32)
    sparse[::7, ::5] = -0.0
    sparse[3, 4] = 2.5
    return {
        "signed": signed,
        "payload_nan": payload_nan,
        "sparse": sparse,
        "bf16": jnp.array([0.0, -0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], jnp.bfloat16),
        "ints": np.array([[0, -3, 0, 0], [0, 0, 0, 7]], np.int32),
        "bools": np.array([True, False, False, False, False, False, False, False, True]),
        "zeros": np.zeros((5, 3), np.float16),
        "dense": np.arange(1, 7, dtype=np.float64),
        "scalar": np.float32(-0.0),
        "empty": np.zeros((0, 4), np.float32),
        "nested": [np.array([0, 0, 0, 0, 0, 0, 0, 0, 5], np.uint8), (np.int64(0), np.ones(2))],
    }


def test_sparse_round_trip_is_bit_exact(tmp_path):
    tree = _awkward_tree()
    save_sparse(str(tmp_path / "sparse"), tree)
    restored = load_sparse(str(tmp_path / "sparse"))
    _assert_bit_identical(restored, tree)
    assert isinstance(restored["nested"], list) and isinstance(restored["nested"][1], tuple)
    assert np.signbit(restored["signed"][0, 1]) and np.isnan(restored["signed"][1, 0])


class _Pair(NamedTuple):
    kernel: np.ndarray
    bias: np.ndarray


def test_custom_containers_restore_into_a_target(tmp_path):
    tree = {"layer": _Pair(np.array([[0.0, 2.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32))}
    save_sparse(str(tmp_path / "pair"), tree)
    with pytest.raises(ValueError, match="pass target="):
        load_sparse(str(tmp_path / "pair"))
    restored = load_sparse(str(tmp_path / "pair"), target=jax.eval_shape(lambda: tree))
    assert isinstance(restored["layer"], _Pair)
    _assert_bit_identical(restored, tree)
    with pytest.raises(ValueError, match="do not match the saved leaves"):
        load_sparse(str(tmp_path / "pair"), target={"other": np.zeros(2)})


def test_save_sparse_refuses_a_directory_with_files(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "note.txt").write_text("keep me")
    with pytest.raises(ValueError, match="new or empty directory"):
        save_sparse(str(tmp_path / "used"), {"w": np.zeros(3)})


def test_ninety_percent_sparse_weights_take_fewer_bytes(tmp_path):
    rng = np.random.default_rng(0)
    tree = {}
    for index, shape in enumerate([(512, 1024), (3, 3, 128, 384), (128, 1000)]):
        weights = rng.standard_normal(shape).astype(np.float32)
        weights[rng.random(shape) < 0.9] = 0.0
        tree[f"layer_{index}"] = {"kernel": weights}
    raw_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
    assert 1_000_000 <= raw_bytes // 4 <= 1_200_000
    save_sparse(str(tmp_path / "sparse"), tree)
    save_dense(str(tmp_path / "dense"), tree)
    sparse_bytes = directory_bytes(str(tmp_path / "sparse"))
    dense_bytes = directory_bytes(str(tmp_path / "dense"))
    print(f"raw float32 {raw_bytes} B, orbax dense {dense_bytes} B, sparse {sparse_bytes} B")
    _assert_bit_identical(load_sparse(str(tmp_path / "sparse")), tree)
    # Orbax compresses (zstd) the dense checkpoint's zero runs; the values themselves
    # (10% of random float32s) do not compress, so against it the gain is modest.
    assert sparse_bytes < dense_bytes
    assert 3 * sparse_bytes <= raw_bytes

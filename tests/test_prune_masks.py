"""Mask makers: exact counts, N:M patterns, channels, channel groups, validation, torch parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.prune.masks import (
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
from jaxcomp.prune.report import format_sparsity_table, sparsity_report
from jaxcomp.prune.scores import SCORES, get_score, score_tree

PROPERTY = settings(max_examples=30, deadline=None)
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "torch_prune_reference.json")

# A few shapes, so that compiled kernels are reused across examples.
shapes = st.sampled_from([(1,), (7,), (2, 3), (4, 4), (3, 1, 5), (2, 2, 2)])
sparsities = st.floats(0.0, 0.999, allow_nan=False)


def _integer_scores(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Integer-valued float scores: many ties."""
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.float32)


def _stable_reference(scores: np.ndarray, num_pruned: int) -> np.ndarray:
    """The mask a stable sort gives: lowest scores pruned, lower flat index first on ties."""
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores.ravel(), kind="stable")[:num_pruned]] = False
    return keep.reshape(scores.shape)


def _params() -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 4, 8)), "bias": jnp.ones(8)},
        "depthwise": {"kernel": jax.random.normal(keys[1], (3, 3, 1, 8))},
        "dense": {"kernel": jax.random.normal(keys[2], (8, 12)), "bias": jnp.ones(12)},
        "out": {"kernel": jax.random.normal(keys[3], (12, 4))},
    }


@PROPERTY
@given(seed=st.integers(0, 2**16), shape=shapes, sparsity=sparsities)
def test_unstructured_mask_prunes_exactly_round_s_n_with_stable_ties(seed, shape, sparsity):
    scores = _integer_scores(seed, shape)
    mask = np.asarray(unstructured_mask(jnp.asarray(scores), sparsity))
    assert mask.dtype == bool and mask.shape == shape
    assert (~mask).sum() == round(sparsity * scores.size)
    np.testing.assert_array_equal(mask, _stable_reference(scores, round(sparsity * scores.size)))


def test_unstructured_mask_takes_a_traced_sparsity():
    scores = jnp.asarray(_integer_scores(1, (5, 8)))
    masked = jax.jit(unstructured_mask)
    for sparsity in (0.0, 0.1, 0.25, 0.5, 0.7, 0.95):
        np.testing.assert_array_equal(masked(scores, sparsity), unstructured_mask(scores, sparsity))
    assert masked._cache_size() == 1


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    leaf_shapes=st.lists(shapes, min_size=1, max_size=3),
    sparsity=sparsities,
)
def test_global_unstructured_masks_rank_all_leaves_together(seed, leaf_shapes, sparsity):
    scores = {
        f"leaf_{i}": jnp.asarray(_integer_scores(seed + i, s)) for i, s in enumerate(leaf_shapes)
    }
    tree = {**scores, "left_alone": None}
    masks = global_unstructured_masks(tree, sparsity)
    total = sum(np.prod(s) for s in leaf_shapes)
    pruned = sum(int((~np.asarray(masks[name])).sum()) for name in scores)
    assert pruned == round(sparsity * total)
    assert masks["left_alone"].shape == () and bool(masks["left_alone"])
    flat = np.concatenate([np.ravel(scores[name]) for name in sorted(scores)])
    expected = _stable_reference(flat, round(sparsity * total))
    got = np.concatenate([np.ravel(masks[name]) for name in sorted(scores)])
    np.testing.assert_array_equal(got, expected)


def test_unstructured_mask_matches_torch_l1_unstructured():
    with open(REFERENCE) as file:
        reference = json.load(file)
    assert reference["torch_version"].startswith("2.")
    for case in reference["cases"]:
        values = np.asarray(case["values"], np.float32).reshape(case["shape"])
        mask = np.asarray(unstructured_mask(jnp.abs(jnp.asarray(values)), case["amount"]))
        assert (~mask).sum() == case["num_pruned"], case["name"]
        if not case["has_ties"]:
            torch_mask = np.asarray(case["mask"], bool).reshape(case["shape"])
            np.testing.assert_array_equal(mask, torch_mask, err_msg=case["name"])


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    outer=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    out=st.sampled_from([1, 4]),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (0, 2), (4, 4), (2, 8)]),
)
def test_nm_mask_keeps_n_of_every_m_along_the_input_axis(seed, outer, groups, out, nm):
    n, m = nm
    scores = _integer_scores(seed, (outer, groups * m, out))
    mask = np.asarray(nm_mask(jnp.asarray(scores), n, m, axis=-2))
    assert mask.shape == scores.shape and mask.dtype == bool
    grouped = mask.reshape(outer, groups, m, out)
    assert (grouped.sum(axis=2) == n).all()
    kept_scores = np.where(grouped, scores.reshape(grouped.shape), np.inf).min(axis=2)
    pruned_scores = np.where(grouped, -np.inf, scores.reshape(grouped.shape)).max(axis=2)
    assert (kept_scores >= pruned_scores).all()


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(1, 3), (4, 4), (3, 1, 5), (2, 3, 2, 4)]),
    sparsity=sparsities,
    norm=st.sampled_from(["l1", "l2"]),
    axis=st.sampled_from([-1, 0]),
)
def test_channel_mask_prunes_whole_slices(seed, shape, sparsity, norm, axis):
    scores = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    mask = np.asarray(channel_mask(jnp.asarray(scores), sparsity, axis=axis, norm=norm))
    channels = np.moveaxis(mask, axis, 0).reshape(shape[axis], -1)
    assert (channels.all(axis=1) | ~channels.any(axis=1)).all()
    pruned = ~channels.any(axis=1)
    assert pruned.sum() == round(sparsity * shape[axis])
    values = np.abs(np.moveaxis(scores, axis, 0).reshape(shape[axis], -1))
    norms = values.sum(axis=1) if norm == "l1" else np.sqrt((values**2).sum(axis=1))
    if pruned.any() and not pruned.all():
        assert norms[pruned].max() <= norms[~pruned].min() * (1 + 1e-6)


def test_global_channel_masks_prune_round_s_of_all_channels():
    params = _params()
    scores = {
        "conv": {"kernel": jnp.abs(params["conv"]["kernel"]), "bias": None},
        "depthwise": {"kernel": None},
        "dense": {"kernel": jnp.abs(params["dense"]["kernel"]), "bias": None},
        "out": {"kernel": None},
    }
    masks = global_channel_masks(scores, 0.45)
    conv_pruned = int((~masks["conv"]["kernel"].any(axis=(0, 1, 2))).sum())
    dense_pruned = int((~masks["dense"]["kernel"].any(axis=0)).sum())
    assert conv_pruned + dense_pruned == round(0.45 * 20)
    assert masks["out"]["kernel"].shape == ()


GROUPS = {
    "conv_out": [
        ("params/conv/kernel", -1),
        ("params/conv/bias", 0),
        ("batch_stats/bn/mean", 0),
        ("params/depthwise/kernel", -1),
        ("params/dense/kernel", -2),
    ],
    "dense_out": [("params/dense/kernel", -1), ("params/dense/bias", 0), ("params/out/kernel", -2)],
}


def test_subtree_groups_strips_the_collection_prefix():
    groups = subtree_groups(GROUPS, "params/")
    assert groups["conv_out"][0] == ("conv/kernel", -1)
    assert all(not name.startswith("batch_stats") for name, _ in groups["conv_out"])
    assert len(groups["conv_out"]) == 4
    assert subtree_groups(GROUPS, "batch_stats/") == {"conv_out": [("bn/mean", 0)]}


@PROPERTY
@given(
    sparsity=sparsities,
    scope=st.sampled_from(["layer", "global"]),
    norm=st.sampled_from(["l1", "l2"]),
)
def test_channel_group_masks_mask_every_member_consistently(sparsity, scope, norm):
    params = _params()
    masks = channel_group_masks(params, subtree_groups(GROUPS), sparsity, scope=scope, norm=norm)
    conv = np.asarray(masks["conv"]["kernel"]).any(axis=(0, 1, 2))
    np.testing.assert_array_equal(np.asarray(masks["conv"]["bias"]), conv)
    np.testing.assert_array_equal(
        np.asarray(masks["depthwise"]["kernel"]).all(axis=(0, 1, 2)), conv
    )
    dense_out = np.asarray(masks["dense"]["bias"])
    np.testing.assert_array_equal(masks["dense"]["kernel"], np.outer(conv, dense_out))
    np.testing.assert_array_equal(np.asarray(masks["out"]["kernel"]).all(axis=1), dense_out)
    if scope == "layer":
        assert (~conv).sum() == round(sparsity * 8) and (~dense_out).sum() == round(sparsity * 12)
    else:
        assert (~conv).sum() + (~dense_out).sum() == round(sparsity * 20)


def test_channel_group_rules_match_group_names_and_scores_override():
    params = _params()
    groups = subtree_groups(GROUPS)
    masks = channel_group_masks(params, groups, [("conv_.*", 0.5), ("dense_out", None)])
    assert int((~masks["conv"]["bias"]).sum()) == 4
    assert masks["out"]["kernel"].shape == () and masks["dense"]["bias"].shape == ()
    ranks = jnp.arange(8.0).reshape(1, 1, 1, 8) * jnp.ones((3, 3, 4, 8))
    scores = score_tree(
        params,
        {
            "conv": {"kernel": True, "bias": None},
            "depthwise": {"kernel": None},
            "dense": {"kernel": None, "bias": None},
            "out": {"kernel": None},
        },
        lambda param, grad, key: ranks,
    )
    masks = channel_group_masks(params, groups, 0.25, scores=scores)
    np.testing.assert_array_equal(masks["conv"]["bias"], np.arange(8) >= 2)


def test_channel_groups_validate_member_sizes_and_names():
    params = _params()
    with pytest.raises(ValueError, match="'conv/kernel' has 8.*'dense/kernel' has 12"):
        channel_group_masks(params, {"bad": [("dense/kernel", -1), ("conv/kernel", -1)]}, 0.5)
    with pytest.raises(ValueError, match="no leaf named 'params/conv/kernel'.*subtree_groups"):
        channel_group_masks(params, GROUPS, 0.5)
    with pytest.raises(ValueError, match="rules matched no leaf"):
        channel_group_masks(params, subtree_groups(GROUPS), [("nothing_like_this", 0.5)])


def test_magnitude_masks_select_kernels_and_apply_masks_zeroes_them():
    params = _params()
    params["dense"]["kernel"] = params["dense"]["kernel"].astype(jnp.bfloat16)
    masks = magnitude_masks(params, 0.5)
    assert masks["conv"]["bias"].shape == () and masks["conv"]["bias"].dtype == jnp.bool_
    pruned = apply_masks(params, masks)
    for name in ("conv", "depthwise", "dense", "out"):
        kernel = pruned[name]["kernel"]
        assert kernel.dtype == params[name]["kernel"].dtype
        assert int((kernel == 0).sum()) == round(0.5 * kernel.size)
    np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])


def test_magnitude_masks_rules_global_and_nm():
    params = _params()
    rules = [(".*depthwise.*", None), (".*kernel", 0.75)]
    masks = magnitude_masks(params, rules, scope="global")
    selected = [masks[name]["kernel"] for name in ("conv", "dense", "out")]
    assert sum(int((~mask).sum()) for mask in selected) == round(0.75 * (288 + 96 + 48))
    assert masks["depthwise"]["kernel"].shape == ()
    nm = magnitude_masks(params, rules, method="nm", n=1, m=4)
    assert float(nm["dense"]["kernel"].mean()) == 0.25
    channels = magnitude_masks(params, rules, method="channel")
    assert int((~channels["out"]["kernel"].any(axis=0)).sum()) == 3


def test_masks_survive_jit_and_tree_map():
    params = _params()
    masks = magnitude_masks(params, 0.5)
    doubled = jax.jit(lambda m: jax.tree.map(jnp.logical_not, m))(masks)
    assert jax.tree.structure(doubled) == jax.tree.structure(params)
    assert bool(doubled["conv"]["bias"]) is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity_or_rules": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"sparsity_or_rules": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
        ({"sparsity_or_rules": 1.3}, r"sparsity must be in \[0, 1\), got 1.3"),
        ({"sparsity_or_rules": [(".*kernel", 1.3)]}, r"rule 0.*sparsity must be in \[0, 1\)"),
        ({"sparsity_or_rules": [("conv/(kernel", 0.5)]}, "does not compile"),
        ({"sparsity_or_rules": [("conv/typo", 0.5)]}, "rules matched no leaf"),
        ({"sparsity_or_rules": 0.5, "method": "magic"}, "unknown method 'magic'.*'unstructured'"),
        ({"sparsity_or_rules": 0.5, "scope": "world"}, "unknown scope 'world'"),
        ({"sparsity_or_rules": 0.5, "norm": "l3"}, "unknown norm 'l3'"),
        ({"sparsity_or_rules": 0.5, "method": "nm", "n": 5, "m": 4}, "0 <= n <= m.*n=5, m=4"),
        ({"sparsity_or_rules": 0.5, "method": "nm", "m": 0}, "m >= 1"),
        ({"sparsity_or_rules": 0.5, "method": "nm"}, r"depthwise.*\(3, 3, 1, 8\)"),
        (
            {"sparsity_or_rules": [("conv/kernel", 0.5), ("dense/kernel", 0.2)], "scope": "global"},
            "one sparsity",
        ),
    ],
)
def test_magnitude_masks_reject_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        magnitude_masks(_params(), **kwargs)


def test_a_float_that_selects_no_leaf_is_reported():
    with pytest.raises(ValueError, match="there are none.*pass rules"):
        magnitude_masks({"weights": jnp.ones((4, 4))}, 0.5)
    with pytest.warns(UserWarning, match="there are none"):
        masks = magnitude_masks({"weights": jnp.ones((4, 4))}, 0.5, on_unmatched="warn")
    assert masks["weights"].shape == ()
    with pytest.raises(ValueError, match="unknown on_unmatched 'loud'"):
        magnitude_masks(_params(), 0.5, on_unmatched="loud")


def test_nm_mask_names_the_shape_when_m_does_not_divide_the_axis():
    with pytest.raises(ValueError, match=r"shape \(3, 3, 1, 8\) to be divisible by 4"):
        nm_mask(jnp.ones((3, 3, 1, 8)), 2, 4)
    with pytest.raises(ValueError, match="n=3, m=2"):
        nm_mask(jnp.ones((4, 4)), 3, 2)


def test_apply_masks_names_the_first_leaf_that_does_not_fit():
    params = _params()
    masks = magnitude_masks(params, 0.5)
    del masks["out"]
    with pytest.raises(ValueError, match="first difference at params leaf 'out/kernel'"):
        apply_masks(params, masks)
    masks = magnitude_masks(params, 0.5)
    masks["dense"]["kernel"] = masks["dense"]["kernel"][:4]
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(4, 12\).*\(8, 12\)"):
        apply_masks(params, masks)


def test_scores_registry_and_errors():
    assert set(SCORES) == {"magnitude", "random", "saliency", "movement"}
    with pytest.raises(ValueError, match="unknown score 'fisher'.*'magnitude'"):
        get_score("fisher")
    with pytest.raises(ValueError, match="needs a PRNG key; pass key= to init"):
        SCORES["random"](jnp.ones(3), None, None)
    with pytest.raises(ValueError, match="needs gradients"):
        SCORES["saliency"](jnp.ones(3), None, None)
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    scores = score_tree(params, {"a": True, "b": True}, "random", key=jax.random.key(3))
    assert not np.array_equal(scores["a"], scores["b"])
    saliency = score_tree(
        params, {"a": True, "b": None}, "saliency", grads={"a": -2 * params["a"], "b": params["b"]}
    )
    assert saliency["b"] is None and float(saliency["a"][0, 0]) == 2.0


def test_sparsity_report_counts_and_table():
    params = {
        "dense": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "bias": jnp.array([0.0, 3.0])}
    }
    masks = {
        "dense": {"kernel": jnp.array([[False, True], [True, False]]), "bias": jnp.array(True)}
    }
    report = sparsity_report(params, masks)
    assert report["total"] == {"size": 6, "nonzeros": 3, "sparsity": 0.5}
    assert report["pruned"] == {"size": 4, "nonzeros": 2, "sparsity": 0.5}
    assert [row["name"] for row in report["leaves"]] == ["dense/bias", "dense/kernel"]
    table = format_sparsity_table(report)
    assert table.splitlines()[-1].startswith("| **all leaves** | | 6 | 3 | 50.00%")
    assert "| dense/kernel | 2x2 | 4 | 2 | 50.00% |" in table

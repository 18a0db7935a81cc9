"""Channel shrinking: the model's channel groups, width overrides, and generic slicing."""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.models import CenterNet, channel_groups, channel_widths, create_model
from jaxcomp.models.mobilenet_v2 import MOBILENET_V2_STAGES
from jaxcomp.paths import leaf_names, map_with_names
from jaxcomp.prune.shrink import channel_keep_indices, group_widths, shrink_tree

NUM_CLASSES = 3
IMAGES = jax.random.randint(jax.random.key(1), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
TINY_STAGES = tuple((t, c, 1, s) for t, c, _, s in MOBILENET_V2_STAGES)


def _build(name: str, depthwise_impl: str, channels=()) -> CenterNet:
    if name == "stem_model":
        # centernet_tiny's block_0 adds a residual (8 -> 8 channels), so its stem is
        # not a group; at width 0.5 the stem (16) is, and block_0 outputs 8.
        return CenterNet(
            NUM_CLASSES,
            width=0.5,
            neck_features=16,
            head_features=16,
            stages=TINY_STAGES,
            depthwise_impl=depthwise_impl,
            channels=tuple(sorted(dict(channels).items())),
        )
    return create_model(
        name, num_classes=NUM_CLASSES, depthwise_impl=depthwise_impl, channels=channels
    )


def _shapes(tree):
    leaves = jax.tree.leaves(tree)
    return {name: np.shape(leaf) for name, leaf in zip(leaf_names(tree), leaves, strict=True)}


@functools.cache
def _trained_like_variables(name: str):
    """Initialized variables with random BatchNorm statistics, scales and biases."""
    variables = jax.jit(_build(name, "grouped").init)(jax.random.key(0), IMAGES)
    rng = np.random.default_rng(0)

    def randomize(leaf_name, leaf):
        shape = np.shape(leaf)
        if leaf_name.endswith("bn/mean") or leaf_name.endswith("bn/bias"):
            return jnp.asarray(rng.normal(0.0, 0.2, shape), jnp.float32)
        if leaf_name.endswith("bn/var") or leaf_name.endswith("bn/scale"):
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
        return leaf

    return map_with_names(randomize, variables)


def _mask_channels(variables, groups, rng, *, all_of=(), exact=None):
    """Zeroes random channels of every group in its params members, as a channel mask would.

    Returns the masked variables and the channels each group should keep.
    """
    exact = exact or {}
    shapes = _shapes(variables)
    zeroed = {}
    expected_keep = {}
    for group, members in groups.items():
        producer, axis = members[0]
        size = shapes[producer][axis]
        if group in all_of:
            count = size
        else:
            count = exact.get(group, rng.integers(1, size))
        dropped = rng.choice(size, count, replace=False)
        kept = np.setdiff1d(np.arange(size), dropped)
        # Nothing left: the shrinker keeps the largest-L1 channel, here all zero, so channel 0.
        expected_keep[group] = kept if kept.size else np.array([0])
        for name, member_axis in members:
            if name.startswith("params/"):
                zeroed.setdefault(name, []).append((member_axis, dropped))

    def zero(name, leaf):
        leaf = np.array(leaf)
        for axis, dropped in zeroed.get(name, ()):
            index = [slice(None)] * leaf.ndim
            index[axis] = dropped
            leaf[tuple(index)] = 0.0
        return jnp.asarray(leaf)

    return map_with_names(zero, variables), expected_keep


@functools.cache
def _masked_and_shrunk(name: str):
    variables = _trained_like_variables(name)
    groups = channel_groups(variables)
    exact = {}
    if name == "stem_model":
        # Shrink the stem to block_0's output width: the shrunk model must still not add
        # the residual that equal widths would suggest.
        exact["backbone/stem"] = 8
    masked, expected_keep = _mask_channels(
        variables, groups, np.random.default_rng(1), all_of=("size/hidden",), exact=exact
    )
    keep = channel_keep_indices(masked, groups)
    return masked, keep, expected_keep, shrink_tree(masked, groups, keep)


@pytest.mark.parametrize(
    "name, impl",
    [
        ("centernet_tiny", "grouped"),
        ("centernet_tiny", "shifted"),
        pytest.param("stem_model", "shifted", marks=pytest.mark.slow),  # a width-0.5 model
    ],
)
def test_shrunk_model_has_the_masked_models_outputs(name, impl):
    masked, keep, expected_keep, shrunk = _masked_and_shrunk(name)
    assert keep.keys() == expected_keep.keys()
    for group in keep:
        np.testing.assert_array_equal(keep[group], expected_keep[group], err_msg=group)

    small = _build(name, impl, channels=group_widths(keep))
    small_shapes = jax.eval_shape(small.init, jax.random.key(0), IMAGES)
    assert _shapes(small_shapes) == _shapes(shrunk)

    def evaluate(model, variables):
        return jax.jit(functools.partial(model.apply, train=False))(variables, IMAGES)

    expected = evaluate(_build(name, impl), masked)
    actual = evaluate(small, shrunk)
    for output in expected:
        np.testing.assert_allclose(
            actual[output], expected[output], rtol=1e-4, atol=1e-4, err_msg=output
        )
    # The masked model's outputs must depend on the random BN statistics to mean anything.
    assert float(jnp.std(expected["heatmap"])) > 1e-2

    def count(tree):
        return sum(np.size(leaf) for leaf in jax.tree.leaves(tree["params"]))

    assert count(shrunk) < count(masked)


@pytest.mark.parametrize("name", ["centernet_tiny", "stem_model"])
def test_shrinking_a_shrunk_model_by_nothing_is_the_identity(name):
    _, _, _, shrunk = _masked_and_shrunk(name)
    groups = channel_groups(shrunk)
    if name == "stem_model":
        # The stem now has block_0's width, which channel_groups reads as a possible residual.
        assert "backbone/stem" not in groups
    keep = channel_keep_indices(shrunk, groups)
    shapes = _shapes(shrunk)
    for group, indices in keep.items():
        size = shapes[groups[group][0][0]][-1]
        np.testing.assert_array_equal(indices, np.arange(size), err_msg=group)
    again = shrink_tree(shrunk, groups, keep)
    assert jax.tree.structure(again) == jax.tree.structure(shrunk)
    for before, after in zip(jax.tree.leaves(shrunk), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize(
    "name", ["centernet_tiny", "centernet_student", "centernet_teacher", "stem_model"]
)
def test_channel_groups_are_consistent_with_the_model(name):
    model = _build(name, "auto")
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    shapes = _shapes(variables)
    groups = channel_groups(variables)
    # Every group can be overridden, at the width its producer has.
    widths = channel_widths(model)
    assert groups.keys() == widths.keys()
    for group, members in groups.items():
        producer, axis = members[0]
        assert producer.endswith("conv/kernel") and axis == -1, group
        sizes = {member: shapes[member][member_axis] for member, member_axis in members}
        assert set(sizes.values()) == {widths[group]}, (group, sizes)
    assert ("backbone/stem" in groups) == (name != "centernet_tiny")
    expands = [group for group in groups if group.endswith("/expand")]
    assert len(expands) == len([n for n in shapes if n.endswith("expand/conv/kernel")])


def test_channel_groups_needs_the_variables_dict():
    variables = jax.eval_shape(_build("centernet_tiny", "auto").init, jax.random.key(0), IMAGES)
    with pytest.raises(ValueError, match="variables dict"):
        channel_groups(variables["params"])


def test_channel_overrides_are_validated_and_normalised():
    with pytest.raises(
        ValueError, match=r"unknown channel group 'backbone/block_99/expand'.*valid"
    ):
        create_model("centernet_tiny", num_classes=3, channels={"backbone/block_99/expand": 4})
    # Tied to block_0's residual in the tiny variant, so not a group there.
    with pytest.raises(ValueError, match="unknown channel group 'backbone/stem'"):
        create_model("centernet_tiny", num_classes=3, channels={"backbone/stem": 4})
    with pytest.raises(ValueError, match="must be an int >= 1, got 0"):
        create_model("centernet_tiny", num_classes=3, channels={"size/hidden": 0})
    direct = CenterNet(3, channels=(("neck/features", 8),))
    with pytest.raises(ValueError, match="unknown channel group 'neck/features'"):
        jax.eval_shape(direct.init, jax.random.key(0), IMAGES)

    from_dict = create_model(
        "centernet_tiny", num_classes=3, channels={"size/hidden": 4, "heatmap/hidden": np.int64(5)}
    )
    from_pairs = create_model(
        "centernet_tiny", num_classes=3, channels=[("heatmap/hidden", 5), ("size/hidden", 4)]
    )
    assert from_dict == from_pairs
    assert from_dict.channels == (("heatmap/hidden", 5), ("size/hidden", 4))
    assert create_model("centernet_tiny", num_classes=3).channels == ()
    assert channel_widths(from_dict)["size/hidden"] == 4


def test_group_widths_and_keep_at_least_one():
    tree = {"a": np.array([[0.0, 0.0], [0.0, 0.0]]), "b": np.array([[0.0, 3.0, -1.0]])}
    groups = {"first": [("a", 1)], "second": [("b", -1)], "absent": [("c", 0)]}
    keep = channel_keep_indices(tree, groups)
    assert keep.keys() == {"first", "second"}
    np.testing.assert_array_equal(keep["first"], [0])
    np.testing.assert_array_equal(keep["second"], [1, 2])
    assert group_widths(keep) == {"first": 1, "second": 2}


def test_shrink_tree_errors_name_the_leaf_and_group():
    tree = {"conv": {"kernel": np.ones((2, 4))}, "bn": {"scale": np.ones(3)}}
    keep = {"g": np.array([0, 1])}
    with pytest.raises(ValueError, match="member 'bn/bias' of channel group 'g'"):
        shrink_tree(tree, {"g": [("conv/kernel", -1), ("bn/bias", 0)]}, keep)
    with pytest.raises(ValueError, match="channel group 'g' have different channel counts"):
        shrink_tree(tree, {"g": [("conv/kernel", -1), ("bn/scale", 0)]}, keep)
    with pytest.raises(ValueError, match="keep names groups not in groups: \\['h'\\]"):
        shrink_tree(tree, {"g": [("conv/kernel", -1)]}, {"h": np.array([0])})
    with pytest.raises(ValueError, match="indices outside \\[0, 4\\)"):
        shrink_tree(tree, {"g": [("conv/kernel", -1)]}, {"g": np.array([4])})
    with pytest.raises(ValueError, match="in channel groups 'g' and 'h'"):
        shrink_tree(
            tree,
            {"g": [("conv/kernel", -1)], "h": [("conv/kernel", 1)]},
            {"g": np.array([0]), "h": np.array([1])},
        )


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, (3, 6), elements=st.floats(-2, 2, width=32)),
    hnp.arrays(np.bool_, 6),
)
def test_removing_masked_hidden_units_keeps_an_mlp_function(first, hidden_mask):
    rng = np.random.default_rng(0)
    kernel = first * hidden_mask
    # A unit with a zero column but a non-zero bias is a constant, not pruned: masks zero both.
    bias = rng.normal(size=6) * np.any(kernel != 0, axis=0)
    tree = {
        "dense_0": {"kernel": kernel, "bias": bias},
        "dense_1": {"kernel": rng.normal(size=(6, 2)), "bias": rng.normal(size=2)},
    }
    groups = {
        "hidden": [("dense_0/kernel", -1), ("dense_0/bias", 0), ("dense_1/kernel", 0)],
    }
    keep = channel_keep_indices(tree, groups)
    nonzero = np.flatnonzero(np.any(tree["dense_0"]["kernel"] != 0, axis=0))
    assert set(keep["hidden"]) >= set(nonzero) and keep["hidden"].size == max(nonzero.size, 1)
    shrunk = shrink_tree(tree, groups, keep)
    assert shrunk["dense_1"]["bias"] is tree["dense_1"]["bias"]

    def forward(params, x):
        hidden = np.maximum(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0)
        return hidden @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]

    x = rng.normal(size=(4, 3))
    np.testing.assert_allclose(forward(shrunk, x), forward(tree, x), rtol=1e-6, atol=1e-6)

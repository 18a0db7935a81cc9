"""Layer-wise allocation: LAMP scores and masks, ERK densities, the pruner and the config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.config import default_config, validate_config
from jaxcomp.prune.allocation import erk_densities, erk_pruned_counts, lamp_scores
from jaxcomp.prune.masks import channel_group_masks, magnitude_masks
from jaxcomp.prune.pruner import make_pruner
from jaxcomp.prune.schedules import one_shot_schedule, polynomial_schedule

# A depthwise, a pointwise and a full conv kernel and a dense one, as in a MobileNet.
SHAPES = [(3, 3, 1, 32), (1, 1, 32, 64), (3, 3, 16, 8), (64, 10)]


def _lamp_reference(weights: np.ndarray) -> np.ndarray:
    """LAMP by its definition, in float64: w_u^2 / sum of w_v^2 over v at or after u."""
    flat = np.ravel(weights).astype(np.float64)
    order = np.argsort(np.abs(flat), kind="stable")
    squares = flat[order] ** 2
    scores = np.zeros_like(flat)
    for position, index in enumerate(order):
        scores[index] = squares[position] / squares[position:].sum()
    return scores.reshape(weights.shape)


def _rigl_erk_reference(shapes: list[tuple[int, ...]], sparsity: float) -> list[float]:
    """RigL's get_sparsities_erdos_renyi: clamp the largest raw density, one at a time."""
    dense: set[int] = set()
    while True:
        budget, divisor, raw = 0.0, 0.0, {}
        for index, shape in enumerate(shapes):
            size = np.prod(shape)
            if index in dense:
                budget -= size * sparsity
            else:
                budget += size * (1 - sparsity)
                raw[index] = np.sum(shape) / size
                divisor += raw[index] * size
        eps = budget / divisor
        largest = max(raw.values())
        if largest * eps <= 1:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= {index for index, value in raw.items() if value == largest}


def _weights(seed: int) -> dict:
    """Integer-valued weights with random signs: LAMP scores are exact ratios of integers."""
    rng = np.random.default_rng(seed)
    shapes = {"a": (2, 3), "b": (4, 2), "c": (3, 3)}
    return {
        name: {
            "kernel": jnp.asarray(
                rng.permutation(np.arange(1, math.prod(shape) + 1)).reshape(shape)
                * rng.choice([-1.0, 1.0], shape),
                jnp.float32,
            )
        }
        for name, shape in shapes.items()
    }


def test_lamp_scores_on_a_hand_sized_example():
    np.testing.assert_allclose(
        lamp_scores(jnp.array([1.0, 2.0, 3.0, 4.0])), [1 / 30, 4 / 29, 9 / 25, 16 / 16], rtol=1e-6
    )
    np.testing.assert_allclose(
        lamp_scores(jnp.array([[-3.0, 1.0], [4.0, 2.0]])), [[9 / 25, 1 / 30], [1.0, 4 / 29]]
    )
    # Ties go to the lower flat index, as the masks break them; a zero tail scores 0.
    np.testing.assert_allclose(lamp_scores(jnp.array([2.0, 2.0])), [0.5, 1.0])
    np.testing.assert_array_equal(lamp_scores(jnp.zeros(3)), np.zeros(3))
    weights = np.asarray(_weights(0)["c"]["kernel"])
    np.testing.assert_allclose(lamp_scores(jnp.abs(weights)), _lamp_reference(weights), rtol=1e-6)


@pytest.mark.parametrize("seed, sparsity", [(0, 0.3), (1, 0.5), (2, 0.8), (3, 0.95)])
def test_lamp_masks_are_the_global_ranking_of_lamp_scores(seed, sparsity):
    params = _weights(seed)
    masks = magnitude_masks(params, sparsity, scope="lamp")
    names = sorted(params)
    scores = np.concatenate([_lamp_reference(np.asarray(params[n]["kernel"])) for n in names], None)
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores, kind="stable")[: round(sparsity * scores.size)]] = False
    got = np.concatenate([np.ravel(masks[name]["kernel"]) for name in names])
    np.testing.assert_array_equal(got, keep)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.99])
def test_erk_densities_follow_rigl_and_keep_the_target_count(sparsity):
    densities = erk_densities(SHAPES, sparsity)
    np.testing.assert_allclose(densities, _rigl_erk_reference(SHAPES, sparsity), rtol=1e-12)
    sizes = [math.prod(shape) for shape in SHAPES]
    kept = sum(d * n for d, n in zip(densities, sizes, strict=True))
    assert kept == pytest.approx((1 - sparsity) * sum(sizes))
    counts = erk_pruned_counts(SHAPES, sparsity)
    assert sum(counts) == round(sparsity * sum(sizes))
    for count, density, size in zip(counts, densities, sizes, strict=True):
        assert abs(count - (1 - density) * size) < 1


def test_erk_keeps_dense_what_would_exceed_density_one():
    # At 50% the depthwise kernel would keep more than all its weights; kept dense, it
    # raises eps for the others, which then clamps the dense leaf too.
    densities = erk_densities(SHAPES, 0.5)
    assert densities[0] == 1.0 and densities[3] == 1.0
    assert all(0 < d < 1 for d in densities[1:3])
    np.testing.assert_allclose(densities, _rigl_erk_reference(SHAPES, 0.5), rtol=1e-12)
    # Unclamped, the same eps scales every leaf's raw density.
    densities = erk_densities(SHAPES, 0.99)
    raw = [sum(shape) / math.prod(shape) for shape in SHAPES]
    np.testing.assert_allclose(np.divide(densities, raw), densities[0] / raw[0])
    assert erk_pruned_counts([(2, 2), (10, 10)], 0.5) == [0, 52]
    with pytest.raises(ValueError, match=r"cannot allocate a leaf of shape \(\)"):
        erk_densities([(), (4, 4)], 0.5)


def test_erk_masks_prune_each_leaf_by_magnitude_to_its_share():
    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s))} for i, s in enumerate(SHAPES)}
    masks = magnitude_masks(params, 0.8, scope="erk")
    for name, count in zip(sorted(params), erk_pruned_counts(SHAPES, 0.8), strict=True):
        weights = np.abs(np.asarray(params[name]["kernel"])).ravel()
        keep = np.ones(weights.size, bool)
        keep[np.argsort(weights, kind="stable")[:count]] = False
        np.testing.assert_array_equal(np.ravel(masks[name]["kernel"]), keep)


@pytest.mark.parametrize("scope", ["lamp", "erk"])
def test_pruner_allocation_is_monotone_along_a_schedule(scope):
    rng = np.random.default_rng(1)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s))} for i, s in enumerate(SHAPES)}
    schedule = polynomial_schedule(0.9, begin_step=0, end_step=12, frequency=3)
    pruner = make_pruner(0.9, schedule, scope=scope)
    state = pruner.init(params)
    update = jax.jit(pruner.update)
    for step in range(14):
        # New weights at each step, so that the ranking changes between mask updates.
        moved = jax.tree.map(lambda w, s=step: w + 0.5 * jnp.sin(w * 7.0 + s), params)
        previous = state.masks
        _, state = update(moved, state)
        for name in params:
            was, now = np.asarray(previous[name]["kernel"]), np.asarray(state.masks[name]["kernel"])
            assert not (now & ~was).any(), f"{scope}: an entry of {name} came back at {step}"
    pruned = [int((~np.asarray(state.masks[name]["kernel"])).sum()) for name in sorted(params)]
    assert sum(pruned) == round(0.9 * sum(math.prod(s) for s in SHAPES))
    if scope == "erk":
        assert pruned == erk_pruned_counts(SHAPES, 0.9)
    assert update._cache_size() == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "nm", "scope": "lamp"}, "scope 'lamp' .* needs method='unstructured'"),
        ({"method": "channel", "scope": "erk"}, "scope 'erk' .* got method='channel'"),
        ({"scope": "lamp", "score": "movement"}, "scope='lamp' .* needs score='magnitude'"),
        ({"scope": "spread"}, "unknown scope 'spread'"),
    ],
)
def test_make_pruner_refuses_allocations_it_cannot_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pruner(0.5, one_shot_schedule(0.5), **kwargs)


def test_channel_masks_refuse_entry_allocations():
    params = {"conv": {"kernel": jnp.ones((1, 1, 4, 4))}}
    with pytest.raises(ValueError, match="needs method='unstructured'"):
        channel_group_masks(params, {"g": [("conv/kernel", -1)]}, 0.5, scope="lamp")


def _prune_config(**fields):
    config = default_config()
    config.prune.method = "unstructured"
    for name, value in fields.items():
        config.prune[name] = value
    return config


@pytest.mark.parametrize("scope", ["layer", "global", "lamp", "erk"])
def test_config_accepts_every_allocation_for_unstructured(scope):
    validate_config(_prune_config(scope=scope), device_count=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"method": "nm", "scope": "lamp"},
            r"config.prune.scope='lamp' .* needs config.prune.method='unstructured', got 'nm'",
        ),
        ({"method": "channel", "scope": "erk"}, r"scope='erk' .* got 'channel'"),
        (
            {"scope": "lamp", "score": "movement"},
            r"needs config.prune.score='magnitude', got 'movement'",
        ),
    ],
)
def test_config_refuses_allocations_the_method_cannot_do(fields, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_prune_config(**fields), device_count=1)

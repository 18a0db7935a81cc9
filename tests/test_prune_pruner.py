"""Schedules, the pruner and pruned_optimizer inside one jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxcomp.prune.masks import apply_masks, subtree_groups
from jaxcomp.prune.pruner import (
    PrunedOptState,
    make_pruner,
    masks_of,
    pruned_optimizer,
    pruner_state_of,
)
from jaxcomp.prune.schedules import (
    SCHEDULES,
    iterative_schedule,
    one_shot_schedule,
    polynomial_schedule,
)

STEPS = 20


def _params() -> dict:
    keys = jax.random.split(jax.random.key(42), 3)
    return {
        "hidden": {"kernel": jax.random.normal(keys[0], (8, 16)), "bias": jnp.zeros(16)},
        "middle": {"kernel": jax.random.normal(keys[1], (16, 12)), "bias": jnp.zeros(12)},
        "out": {"kernel": jax.random.normal(keys[2], (12, 4)), "bias": jnp.zeros(4)},
    }


def _loss(params: dict, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(inputs @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    middle = jax.nn.relu(hidden @ params["middle"]["kernel"] + params["middle"]["bias"])
    outputs = middle @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((outputs - targets) ** 2)


def _batch(step: int) -> tuple[jax.Array, jax.Array]:
    key = jax.random.fold_in(jax.random.key(7), step)
    inputs = jax.random.normal(key, (16, 8))
    return inputs, jnp.tanh(inputs[:, :4] * 2.0)


def _pruned(masks: dict) -> dict:
    """Pruned-entry counts of the kernels."""
    return {name: int((~np.asarray(masks[name]["kernel"])).sum()) for name in masks}


def test_polynomial_schedule_values():
    schedule = polynomial_schedule(
        0.8, begin_step=10, end_step=20, frequency=2, initial_sparsity=0.1
    )
    values = {t: float(schedule.sparsity(t)) for t in (0, 9, 10, 11, 15, 16, 20, 25)}
    assert values[0] == values[9] == 0.0
    assert values[10] == values[11] == pytest.approx(0.1)
    middle = 0.8 + (0.1 - 0.8) * (1 - 6 / 10) ** 3  # step 15 holds the value of update step 14
    assert values[15] == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 4 / 10) ** 3)
    assert values[16] == pytest.approx(middle)
    assert values[20] == values[25] == np.float32(0.8)
    updates = [t for t in range(30) if schedule.is_update_step(t)]
    assert updates == [10, 12, 14, 16, 18, 20]
    odd = polynomial_schedule(0.5, begin_step=0, end_step=7, frequency=3)
    assert [t for t in range(10) if odd.is_update_step(t)] == [0, 3, 6, 7]


def test_iterative_and_one_shot_schedules():
    schedule = iterative_schedule(0.875, begin_step=2, end_step=8, num_prunes=3)
    assert [t for t in range(12) if schedule.is_update_step(t)] == [2, 5, 8]
    values = [float(schedule.sparsity(t)) for t in (1, 2, 5, 8, 11)]
    assert values == pytest.approx([0.0, 0.5, 0.75, 0.875, 0.875])
    assert float(iterative_schedule(0.6, 0, 4, 1).sparsity(0)) == pytest.approx(0.6)
    one_shot = one_shot_schedule(0.3, step=4)
    assert [float(one_shot.sparsity(t)) for t in (3, 4, 9)] == pytest.approx([0.0, 0.3, 0.3])
    assert [t for t in range(10) if one_shot.is_update_step(t)] == [4]


@pytest.mark.parametrize(
    "schedule",
    [
        one_shot_schedule(0.5, 3),
        iterative_schedule(0.9, 1, 31, 4),
        polynomial_schedule(0.9, 2, 30, 3, initial_sparsity=0.05),
        polynomial_schedule(0.7, 0, 17, 1, power=1),
    ],
)
def test_schedules_jit_on_traced_steps_and_never_decrease(schedule):
    steps = jnp.arange(40)
    values = jax.jit(jax.vmap(schedule.sparsity))(steps)
    updates = jax.jit(jax.vmap(schedule.is_update_step))(steps)
    assert values.dtype == jnp.float32 and updates.dtype == jnp.bool_
    eager = [schedule.sparsity(int(t)) for t in steps]
    np.testing.assert_allclose(values, eager, rtol=1e-6)
    assert (np.diff(np.asarray(values)) >= 0).all()
    assert values[-1] == np.float32(schedule.final_sparsity)
    # The sparsity only changes on update steps.
    changed = np.flatnonzero(np.diff(np.asarray(values))) + 1
    assert np.asarray(updates)[changed].all()


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (
            "polynomial",
            {"final_sparsity": 0.5, "begin_step": 10, "end_step": 5, "frequency": 1},
            "a schedule whose end is before its start",
        ),
        (
            "polynomial",
            {"final_sparsity": 1.3, "begin_step": 0, "end_step": 5, "frequency": 1},
            r"final_sparsity must be in \[0, 1\), got 1.3",
        ),
        (
            "polynomial",
            {"final_sparsity": 0.5, "begin_step": 0, "end_step": 5, "frequency": 0},
            "frequency must be an integer >= 1",
        ),
        (
            "polynomial",
            {
                "final_sparsity": 0.5,
                "begin_step": 0,
                "end_step": 5,
                "frequency": 1,
                "initial_sparsity": 0.6,
            },
            "must not exceed final_sparsity",
        ),
        (
            "iterative",
            {"final_sparsity": 0.5, "begin_step": 0, "end_step": 5, "num_prunes": 0},
            "num_prunes must be an integer >= 1",
        ),
        (
            "iterative",
            {"final_sparsity": 0.5, "begin_step": 0, "end_step": 2, "num_prunes": 5},
            "at least 4 steps",
        ),
        ("one_shot", {"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
        ("one_shot", {"sparsity": 0.5, "step": -1}, "step must be an integer >= 0"),
    ],
)
def test_schedules_reject_bad_arguments(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SCHEDULES[factory](**kwargs)


OPTIMIZERS = {
    "clip_adamw": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2)),
    "momentum_sgd": optax.sgd(5e-2, momentum=0.9),
}
RULES = [("out/kernel", 0.5), (".*kernel", 0.8)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_optimizer_keeps_params_exactly_masked_in_one_jitted_step(name):
    inner = OPTIMIZERS[name]
    schedule = polynomial_schedule(0.8, begin_step=2, end_step=14, frequency=3)
    tx = pruned_optimizer(inner, make_pruner(RULES, schedule))

    @jax.jit
    def train_step(params, opt_state, inputs, targets):
        grads = jax.grad(_loss)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads, updates

    @jax.jit
    def inner_step(params, inner_state, masks, grads):
        # Fed the step's own gradients: another program may round the backward pass differently.
        return inner.update(apply_masks(grads, masks), inner_state, params)

    params = _params()
    opt_state = tx.init(params)
    assert _pruned(masks_of(opt_state)) == {"hidden": 0, "middle": 0, "out": 0}
    previous = masks_of(opt_state)
    for step in range(STEPS):
        old_params, old_inner = params, opt_state.inner_state
        params, opt_state, grads, updates = train_step(params, opt_state, *_batch(step))
        inner_updates, expected_inner = inner_step(old_params, old_inner, previous, grads)
        masks = masks_of(opt_state)
        leaves = zip(
            *(jax.tree.leaves(tree) for tree in (old_params, params, updates, inner_updates)),
            jax.tree.leaves(masks),
            jax.tree.leaves(previous),
            strict=True,
        )
        for old, new, update, inner_update, mask, was_kept in leaves:
            assert not np.asarray(mask & ~was_kept).any(), "a pruned entry came back"
            old, new, update, inner_update = map(np.asarray, (old, new, update, inner_update))
            mask = np.broadcast_to(np.asarray(mask), new.shape)
            assert (new[~mask] == 0.0).all() and not np.signbit(new[~mask]).any()
            np.testing.assert_array_equal(update[~mask], -old[~mask])
            np.testing.assert_array_equal(update[mask], inner_update[mask])
            # apply_updates is the user's add; XLA may fuse it into a multiply-add (1 ulp).
            np.testing.assert_allclose(new[mask], (old + inner_update)[mask], rtol=2e-7, atol=0)
        jax.tree.map(np.testing.assert_array_equal, opt_state.inner_state, expected_inner)
        previous = masks
    assert _pruned(masks) == {"hidden": round(0.8 * 128), "middle": round(0.8 * 192), "out": 24}
    assert int(opt_state.pruner_state.count) == STEPS
    assert train_step._cache_size() == 1


def test_pruner_state_checkpoints_with_orbax(tmp_path):
    schedule = one_shot_schedule(0.6)
    tx = pruned_optimizer(optax.sgd(0.1, momentum=0.9), make_pruner(0.6, schedule))
    params = _params()
    opt_state = tx.init(params)
    grads = jax.grad(_loss)(params, *_batch(0))
    _, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "opt_state", opt_state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state)
    restored = checkpointer.restore(tmp_path / "opt_state", abstract)
    checkpointer.close()
    assert isinstance(restored, PrunedOptState)
    assert jax.tree.structure(restored) == jax.tree.structure(opt_state)
    jax.tree.map(np.testing.assert_array_equal, masks_of(restored), masks_of(opt_state))
    assert _pruned(masks_of(restored))["middle"] == round(0.6 * 192)


def test_pruner_state_is_found_inside_a_chain():
    tx = optax.chain(
        optax.identity(), pruned_optimizer(optax.sgd(0.1), make_pruner(0.5, one_shot_schedule(0.5)))
    )
    opt_state = tx.init(_params())
    assert pruner_state_of(opt_state).count == 0
    assert masks_of(opt_state)["out"]["bias"].shape == ()
    with pytest.raises(ValueError, match="no PrunedOptState"):
        masks_of(optax.sgd(0.1).init(_params()))
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(_params(), opt_state)


def test_pruner_one_shot_global_and_layer_counts():
    params = _params()
    for scope, expected in (("layer", None), ("global", round(0.7 * (128 + 192 + 48)))):
        pruner = make_pruner(0.7, one_shot_schedule(0.7, step=1), scope=scope)
        state = pruner.init(params)
        update = jax.jit(pruner.update)
        pruned, state = update(params, state)
        assert sum(_pruned(state.masks).values()) == 0
        pruned, state = update(params, state)
        counts = _pruned(state.masks)
        if expected is None:
            assert counts == {
                "hidden": round(0.7 * 128),
                "middle": round(0.7 * 192),
                "out": round(0.7 * 48),
            }
        else:
            assert sum(counts.values()) == expected
        assert int((pruned["middle"]["kernel"] == 0).sum()) == counts["middle"]


def test_pruner_nm_channel_groups_and_scores():
    params = _params()
    nm = make_pruner(
        [("out/kernel", None), (".*kernel", 0.5)], polynomial_schedule(0.5, 2, 6, 2), method="nm"
    )
    state = nm.init(params)
    for _ in range(2):
        _, state = nm.update(params, state)
    assert _pruned(state.masks)["hidden"] == 0
    _, state = nm.update(params, state)
    kept = np.asarray(state.masks["hidden"]["kernel"]).reshape(2, 4, 16).sum(axis=1)
    assert (kept == 2).all()
    assert state.masks["out"]["kernel"].shape == ()

    groups = subtree_groups(
        {
            "hidden": [
                ("params/hidden/kernel", -1),
                ("params/hidden/bias", 0),
                ("params/middle/kernel", -2),
            ],
            "middle": [
                ("params/middle/kernel", -1),
                ("params/middle/bias", 0),
                ("params/out/kernel", -2),
            ],
        }
    )
    pruner = make_pruner(
        0.5, iterative_schedule(0.5, 0, 2, 2), method="channel", channel_groups=groups
    )
    state = pruner.init(params)
    update = jax.jit(pruner.update)
    for _ in range(3):
        previous = state.masks
        pruned, state = update(params, state)
        assert not np.asarray(state.masks["middle"]["kernel"] & ~previous["middle"]["kernel"]).any()
    hidden = np.asarray(state.masks["hidden"]["bias"])
    assert (~hidden).sum() == 8 and (~np.asarray(state.masks["middle"]["bias"])).sum() == 6
    np.testing.assert_array_equal(state.masks["middle"]["kernel"].any(axis=1), hidden)
    assert (np.asarray(pruned["hidden"]["bias"])[~hidden] == 0).all()

    with pytest.raises(ValueError, match="needs a PRNG key; pass key= to init"):
        make_pruner(0.5, one_shot_schedule(0.5), score="random").init(params)
    random = make_pruner(0.5, one_shot_schedule(0.5), score="random")
    first = random.update(params, random.init(params, jax.random.key(1)))[1].masks
    again = random.update(params, random.init(params, jax.random.key(1)))[1].masks
    other = random.update(params, random.init(params, jax.random.key(2)))[1].masks
    jax.tree.map(np.testing.assert_array_equal, first, again)
    assert not np.array_equal(first["middle"]["kernel"], other["middle"]["kernel"])
    saliency = make_pruner(0.5, one_shot_schedule(0.5), score="saliency")
    with pytest.raises(ValueError, match="needs gradients"):
        saliency.update(params, saliency.init(params))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((1.0, one_shot_schedule(0.5)), {}, r"sparsity must be in \[0, 1\), got 1.0"),
        ((0.5, one_shot_schedule(0.5)), {"method": "magic"}, "unknown method 'magic'"),
        ((0.5, one_shot_schedule(0.5)), {"score": "fisher"}, "unknown score 'fisher'"),
        ((0.5, one_shot_schedule(0.5)), {"method": "nm", "n": 3, "m": 2}, "n=3, m=2"),
        (([("(", 0.5)], one_shot_schedule(0.5)), {}, "does not compile"),
        ((0.5, 0.5), {}, "schedule must be a Schedule"),
        ((0.5, one_shot_schedule(0.5)), {"channel_groups": {}}, "need method='channel'"),
    ],
)
def test_make_pruner_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_pruner(*args, **kwargs)


def test_pruner_init_rejects_what_does_not_fit_the_params():
    params = _params()
    with pytest.raises(ValueError, match="rules matched no leaf"):
        make_pruner([("typo/kernel", 0.5)], one_shot_schedule(0.5)).init(params)
    with pytest.raises(ValueError, match=r"'hidden/kernel' of shape \(8, 16\).*divisible by 16"):
        make_pruner(0.5, one_shot_schedule(0.5), method="nm", n=2, m=16).init(params)

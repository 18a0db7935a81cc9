"""`traced_steps`: a later process reads back its train step, initial state and shapes."""

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config_for

from jaxcomp import prune, traced_steps, train


@pytest.fixture
def traced_functions():
    """Names of the functions JAX traces while the test runs (public `jax.monitoring` events)."""
    names = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield names
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def setting(tiny_data_dir):
    config = tiny_config_for(tiny_data_dir)
    experiment = train.build_experiment(config)
    batch = train.global_batch(
        train.experiment_train_dataset(experiment)[0], experiment.mesh, train.TRAIN_FIELDS
    )

    def fresh_state():
        return train.init_state(experiment.model, experiment.optimizer, 64, 0, experiment.mesh)

    # build_experiment keeps its steps traced (the tests enable a compilation cache); the
    # plain jitted step inside is the reference.
    assert isinstance(experiment.train_step, traced_steps._CachedStep)
    plain_step = experiment.train_step._step
    expected = jax.device_get(plain_step(fresh_state(), batch))
    return config, batch, fresh_state, expected


def _assert_equal(got, expected):
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_second_process_reads_the_step_back_without_tracing_it(
    setting, tmp_path, traced_functions
):
    config, batch, fresh_state, expected = setting

    def new_process_step():
        # A new experiment's step is a new jitted function, with nothing traced yet.
        step = train.build_experiment(config).train_step._step
        return traced_steps.cached_step(step, str(tmp_path), "train_step", config.to_json())

    first = new_process_step()
    state = fresh_state()
    _assert_equal(first(state, batch), expected)
    # Traced once, as traced_steps' `flat_step` (the step on its state's leaves).
    assert traced_functions.count("flat_step") == 1
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state)), "state was not donated"
    assert len(list(tmp_path.glob("train_step-*.exported"))) == 1

    second = new_process_step()
    traced_functions.clear()
    _assert_equal(second(fresh_state(), batch), expected)
    _assert_equal(second(fresh_state(), batch), expected)
    assert "flat_step" not in traced_functions, "traced although it was on disk"
    assert second._cache_size() == 1


def _toy_step(counter: list):
    """A real (small) optax step, f(state, batch) -> (state, metrics), that counts its traces."""
    optimizer = optax.adam(0.1)

    def step(state, batch):
        counter.append(1)

        def loss_fn(weights):
            return jnp.mean((batch["x"] @ weights - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["weights"])
        updates, opt_state = optimizer.update(grads, state["opt_state"])
        new_state = {"weights": state["weights"] + updates, "opt_state": opt_state}
        return new_state, {"loss": loss}

    def fresh_state():
        weights = jnp.zeros((3,))
        return {"weights": weights, "opt_state": optimizer.init(weights)}

    return jax.jit(step, donate_argnums=0), fresh_state


_TOY_BATCH = {"x": jnp.eye(3)[:2], "y": jnp.ones((2,))}


def test_another_key_or_batch_shape_is_another_program(tmp_path):
    traces = []
    step, fresh_state = _toy_step(traces)
    cached = traced_steps.cached_step(step, str(tmp_path), "toy", "config")
    cached(fresh_state(), _TOY_BATCH)
    cached(fresh_state(), {"x": jnp.eye(3), "y": jnp.ones((3,))})
    assert len(traces) == 2 and cached._cache_size() == 2
    traced_steps.cached_step(_toy_step(traces)[0], str(tmp_path), "toy", "other config")(
        fresh_state(), _TOY_BATCH
    )
    assert len(traces) == 3
    assert len(list(tmp_path.glob("toy-*.exported"))) == 3


def test_a_damaged_file_is_traced_again(tmp_path, caplog):
    step, fresh_state = _toy_step([])
    expected = jax.device_get(step(fresh_state(), _TOY_BATCH))
    traced_steps.cached_step(_toy_step([])[0], str(tmp_path), "toy", "k")(fresh_state(), _TOY_BATCH)
    (path,) = tmp_path.glob("toy-*.exported")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    traces = []
    cached = traced_steps.cached_step(_toy_step(traces)[0], str(tmp_path), "toy", "k")
    with caplog.at_level(logging.WARNING):
        _assert_equal(cached(fresh_state(), _TOY_BATCH), expected)
    assert len(traces) == 1
    assert "damaged" in caplog.text and path.name in caplog.text
    traced_steps.cached_step(_toy_step(traces)[0], str(tmp_path), "toy", "k")(
        fresh_state(), _TOY_BATCH
    )
    assert len(traces) == 1, "the re-exported file does not read back"


def test_a_step_whose_state_changes_structure_runs_untraced(tmp_path, caplog):
    def step(state, batch):
        return {"grown": state}, {"loss": jnp.sum(batch["x"])}

    state = {"weights": jnp.zeros((3,))}
    with caplog.at_level(logging.WARNING):
        new_state, _ = traced_steps.cached_step(jax.jit(step), str(tmp_path), "odd", "k")(
            state, _TOY_BATCH
        )
    assert "not kept traced" in caplog.text and "structure" in caplog.text
    assert set(new_state) == {"grown"}
    assert not list(tmp_path.glob("odd-*.exported"))


def test_without_a_directory_the_step_is_returned_as_is():
    step = _toy_step([])[0]
    assert traced_steps.cached_step(step, None, "train_step", "config") is step


def test_experiments_key_their_steps_by_config(setting):
    config = setting[0]
    step = train.build_experiment(config).train_step
    assert json.loads(step._key) == json.loads(config.to_json())


@pytest.mark.parametrize("keep_traced", [False, True])
def test_compile_ahead_makes_the_first_call_run_at_once(keep_traced, tmp_path, traced_functions):
    step, fresh_state = _toy_step([])
    step = traced_steps.cached_step(step, str(tmp_path) if keep_traced else None, "toy", "k")
    state = fresh_state()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (state, _TOY_BATCH)
    )
    traced_steps.compile_ahead(step, *abstract)
    traced_functions.clear()
    step(state, _TOY_BATCH)
    assert traced_functions == [] and step._cache_size() == 1


@pytest.fixture
def initial_state_setting(setting, tmp_path, monkeypatch):
    """A fresh experiment, its first batch and a checkpoint manager, with the start-up cache
    in tmp_path/cache."""
    config, batch, fresh_state, _ = setting
    monkeypatch.setattr(traced_steps, "cache_directory", lambda: tmp_path / "cache")
    experiment = train.build_experiment(config)
    local_batch = train.experiment_train_dataset(experiment)[0]
    manager = train.checkpoint_manager(str(tmp_path / "workdir"), config.train)
    yield experiment, local_batch, batch, manager, fresh_state
    manager.close()


def test_a_second_start_reads_the_initial_state_back(initial_state_setting, traced_functions):
    experiment, local_batch, batch, manager, fresh_state = initial_state_setting
    expected = jax.device_get(fresh_state())
    traced_functions.clear()

    # `create_train_state` is traced once for the state's shapes (`jax.eval_shape`, no
    # model init), and once more for the init program when the state is not kept.
    first = train._initial_state(experiment, manager, local_batch)
    _assert_equal(first, expected)
    assert traced_functions.count("create_train_state") == 2
    assert len(list(traced_steps.cache_directory().glob("initial_state-*.npz"))) == 1

    traced_functions.clear()
    second = train._initial_state(experiment, manager, local_batch)
    _assert_equal(second, expected)
    assert traced_functions.count("create_train_state") == 1, "initialized although it was kept"
    # The state read back has the shardings and types of the computed one: the first
    # step's program (compiled ahead) serves both.
    for state in (first, second):
        experiment.train_step(state, batch)
    assert experiment.train_step._cache_size() == 1


def test_a_damaged_initial_state_is_computed_again(initial_state_setting, caplog):
    experiment, local_batch, _, manager, fresh_state = initial_state_setting
    train._initial_state(experiment, manager, None)
    (path,) = traced_steps.cache_directory().glob("initial_state-*.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with caplog.at_level(logging.WARNING):
        state = train._initial_state(experiment, manager, None)
    _assert_equal(state, jax.device_get(fresh_state()))
    assert "cannot be read" in caplog.text and path.name in caplog.text
    _assert_equal(traced_steps.read_state(path, train._abstract_train_state(experiment)), state)


def test_an_unwritable_cache_is_logged_and_the_run_goes_on(
    initial_state_setting, tmp_path, monkeypatch, caplog
):
    experiment, local_batch, batch, manager, fresh_state = initial_state_setting
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(traced_steps, "cache_directory", lambda: tmp_path / "a_file" / "cache")
    with caplog.at_level(logging.WARNING):
        state = train._initial_state(experiment, manager, local_batch)
    _assert_equal(state, jax.device_get(fresh_state()))
    assert "going on without it" in caplog.text
    assert not list(tmp_path.glob("**/*.tmp"))


def test_shapes_are_computed_once_and_read_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(traced_steps, "cache_directory", lambda: tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {
            "params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 8), jnp.float32)}},
            "batch_stats": {"bn": {"mean": jax.ShapeDtypeStruct((8,), jnp.float32)}},
        }

    first = traced_steps.cached_shapes(compute, "variables", "model A")
    assert traced_steps.cached_shapes(compute, "variables", "model A") == first
    assert len(calls) == 1
    traced_steps.cached_shapes(compute, "variables", "model B")
    assert len(calls) == 2

    for path in tmp_path.glob("variables-*.json"):
        path.write_text('{"params": [1, 2, 3]}')
    with caplog.at_level(logging.WARNING):
        assert traced_steps.cached_shapes(compute, "variables", "model A") == first
    assert len(calls) == 3 and "cannot be read" in caplog.text


def test_experiments_read_their_variable_shapes_back(setting, traced_functions):
    config = setting[0]
    expected = train.build_experiment(config).variables
    traced_functions.clear()
    assert train.build_experiment(config).variables == expected
    assert "init" not in traced_functions, "the model's init was traced again"


def test_code_registered_from_elsewhere_turns_the_caches_off(tmp_path, monkeypatch):
    """A score defined in a notebook is not in the key: an edit to it must not read back
    the program traced before the edit, so nothing is read back or kept meanwhile."""

    def movement_score(param, grad, key):
        return -param * grad

    assert traced_steps.registered_elsewhere() == []
    monkeypatch.setitem(prune.SCORES, "movement", movement_score)
    assert traced_steps.registered_elsewhere() == ["prune.SCORES['movement']"]
    monkeypatch.setattr(traced_steps, "cache_directory", lambda: tmp_path)

    traces = []
    step, fresh_state = _toy_step(traces)
    cached = traced_steps.cached_step(step, str(tmp_path), "toy", "k")
    cached(fresh_state(), _TOY_BATCH)
    cached(fresh_state(), _TOY_BATCH)
    assert len(traces) == 1 and cached._step._cache_size() == 1
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh_state())
    assert traced_steps.initial_state_path("k", abstract) is None
    calls = []
    for _ in range(2):
        traced_steps.cached_shapes(lambda: calls.append(1) or {}, "variables", "k")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_model_from_elsewhere_keeps_no_shapes(tmp_path, monkeypatch):
    class Outside(nn.Module):
        @nn.compact
        def __call__(self, images, train):
            return nn.Dense(3)(images.astype(jnp.float32))

    monkeypatch.setattr(traced_steps, "cache_directory", lambda: tmp_path)
    variables = train.abstract_variables(Outside(), 8)
    assert variables["params"]["Dense_0"]["kernel"].shape == (3, 3)
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_half_way_leaves_no_file(tmp_path, caplog):
    def write(file):
        file.write(b"half")
        raise OSError("No space left on device")

    with caplog.at_level(logging.WARNING):
        traced_steps._write_atomically(tmp_path / "entry.npz", write)
    assert "No space left on device" in caplog.text
    assert list(tmp_path.iterdir()) == []

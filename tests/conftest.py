"""Shared fixtures: the tiny embedded dataset, built once per test session."""

import os
import signal

import jax
import pytest

from jaxcomp import training
from jaxcomp.config import default_config
from jaxcomp.data.embedded import prepare_embedded


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared by the tests and their subprocesses.

    Several tests compile the same tiny train step (resume runs, the CLI); with
    the cache each compiles once per session.
    """
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each worker has its own basetemp; their parent is shared, so
    # the workers (and their subprocesses) reuse each other's compiles. JAX writes
    # cache entries atomically, so concurrent writers are safe.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    cache_dir = str(base / "jax_cache")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


@pytest.fixture(autouse=True)
def signal_handlers_unchanged():
    """Fails the test that leaves a SIGINT or SIGTERM handler other than the one it found.

    Handlers are per process, so under pytest-xdist a leaked one reaches whichever
    tests the worker runs next: the notebook test's reset of SIGINT once decided
    whether the Ctrl-C test, run later on the same worker, passed.
    """
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in signals}
    yield
    leaked = {
        signal.Signals(sig).name: handler
        for sig in signals
        if (handler := signal.getsignal(sig)) is not before[sig]
    }
    for sig, handler in before.items():
        if handler is not None:  # None: installed outside Python; nothing to put back
            signal.signal(sig, handler)
    assert not leaked, f"the test left signal handlers {leaked} (it found {before}); restore them"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A data_dir holding `jaxcomp_embedded/tiny`, built offline."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_embedded("tiny", data_dir=data_dir)
    return data_dir


@pytest.fixture
def tiny_config(tiny_data_dir):
    """A config that trains the tiny detector on the tiny dataset in seconds."""
    return tiny_config_for(tiny_data_dir)


def tiny_config_for(data_dir: str):
    """The `tiny_config` fixture's config, for fixtures of a wider scope."""
    config = default_config()
    config.data.name = "jaxcomp_embedded/tiny"
    config.data.data_dir = data_dir
    config.data.image_size = 64
    config.data.max_objects = 8
    config.data.num_workers = 0
    config.model.name = "centernet_tiny"
    config.train.steps = 6
    config.train.batch_size = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.optim.warmup_steps = 2
    config.eval.batch_size = 16
    config.eval.top_k = 20
    return config


@pytest.fixture
def save_initial_checkpoint():
    """Writes a real orbax checkpoint of a freshly initialized run, as training would.

    Cheaper than training a run first when a test only needs a checkpoint to start from.
    """

    def save(config, workdir, seed):
        experiment = training.build_experiment(config)
        state = experiment.init_state(seed=seed)
        with training.checkpoint_manager(str(workdir), config.train) as manager:
            training.save_checkpoint(manager, state)
        return jax.device_get(state)

    return save

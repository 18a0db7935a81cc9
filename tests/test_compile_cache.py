"""`training.enable_compilation_cache` makes a second process reuse the first one's compiles.

Each process is a fresh Python interpreter (the in-memory caches of this one
would hide the persistent cache), and reports JAX's own cache events through
the public `jax.monitoring` listener API. No wall-clock time is asserted.
"""

import json
import os
import subprocess
import sys

import jax

from jaxcomp import training

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"

_PROCESS = """
import json, sys
import jax
import jax.numpy as jnp
from jaxcomp import training

events = []
jax.monitoring.register_event_listener(lambda event, **kwargs: events.append(event))
training.enable_compilation_cache(sys.argv[1])
threshold = jax.config.jax_persistent_cache_min_compile_time_secs
# This function compiles in milliseconds, below the threshold that keeps trivial
# programs out of the cache, so the threshold is lowered for it.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
value = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.arange(12.0).reshape(3, 4))
print(json.dumps({
    "events": events,
    "cache_dir": jax.config.jax_compilation_cache_dir,
    "threshold": threshold,
    "value": float(value),
}))
"""


def _run(cache_dir: str, home: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROCESS, cache_dir],
        env={**os.environ, "HOME": home, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_cache_the_first_one_filled(tmp_path):
    cache_dir = tmp_path / "xla_cache"
    # '~' is expanded and the directory created by enable_compilation_cache.
    first = _run("~/xla_cache", home=str(tmp_path))
    assert first["cache_dir"] == str(cache_dir)
    assert first["threshold"] == 0.5
    assert _MISS in first["events"] and _HIT not in first["events"]
    entries = sorted(os.listdir(cache_dir))
    assert entries, "the first process wrote nothing to the cache"

    second = _run(str(cache_dir), home=str(tmp_path))
    assert _HIT in second["events"] and _MISS not in second["events"]
    assert second["value"] == first["value"]
    assert set(entries) <= set(os.listdir(cache_dir))


def test_empty_cache_dir_leaves_the_configuration_alone():
    before = jax.config.jax_compilation_cache_dir
    training.enable_compilation_cache("")
    training.enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == before

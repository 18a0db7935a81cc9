"""Meshes and sharding rules (`jaxcomp.sharding`), and an FSDP run on 8 simulated devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxcomp import sharding
from jaxcomp.config import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = AbstractMesh((2, 4), ("data", "fsdp"))
TREE = {
    "params": {"conv": {"kernel": np.zeros((3, 3, 8, 16)), "bias": np.zeros(16)}},
    "opt_state": {"mu": {"conv": {"kernel": np.zeros((3, 3, 8, 16)), "bias": np.zeros(16)}}},
    "step": np.zeros(()),
}


def test_mesh_shape_resolves_the_rest_and_refuses_what_does_not_fit():
    assert sharding.mesh_shape((("data", -1),), 8) == {"data": 8}
    assert sharding.mesh_shape((("data", 2), ("fsdp", -1)), 8) == {"data": 2, "fsdp": 4}
    for axes, message in (
        ((("data", 3),), "spans 3 devices, but there are 8"),
        ((("data", -1), ("fsdp", 3)), "do not divide into the fixed sizes' product 3"),
        ((("data", -1), ("fsdp", -1)), "may have one size of -1"),
        ((("data", 2), ("data", 4)), "names an axis twice"),
        ((("data", 0),), "sizes must be >= 1 or -1"),
        (("data",), r"must be \(\(name, size\), ...\)"),
    ):
        with pytest.raises(ValueError, match=message):
            sharding.mesh_shape(axes, 8)
    with pytest.raises(ValueError, match="must name axes of config.mesh.axes"):
        sharding.batch_split({"data": 8}, ("batch",))


def test_first_matching_rule_wins_and_unmatched_leaves_are_replicated():
    rules = [
        (r"opt_state/.*kernel", PartitionSpec(None, None, "fsdp")),
        (r".*kernel", (None, None, None, ("data", "fsdp"))),
    ]
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(TREE, MESH, rules))
    assert specs["params"]["conv"]["kernel"] == PartitionSpec(None, None, None, ("data", "fsdp"))
    assert specs["opt_state"]["mu"]["conv"]["kernel"] == PartitionSpec(None, None, "fsdp")
    assert specs["params"]["conv"]["bias"] == PartitionSpec()
    assert specs["step"] == PartitionSpec()
    no_rules = sharding.state_shardings(TREE, MESH)
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(no_rules))


@pytest.mark.parametrize(
    "rules, message",
    [
        ([(r".*/bias", ("fsdp",)), (r"typo/kernel", ("fsdp",))], r"rules matched no leaf: \['typo"),
        ([(r".*kernel", ("data",))], "splits a dimension of 3 2 ways"),
        ([(r".*bias", (None, "fsdp"))], "has more dimensions than the leaf"),
        ([(r".*bias", ("model",))], r"names \['model'\], not axes of the mesh"),
    ],
)
def test_rules_that_match_nothing_or_do_not_fit_are_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        sharding.state_shardings(TREE, MESH, rules)


def test_config_batch_must_divide_over_the_batch_axes_only(tiny_config):
    tiny_config.mesh.axes = (("data", 2), ("model", 4))
    tiny_config.train.batch_size = 2  # split over `data` only: 2 ways
    tiny_config.eval.batch_size = 2
    validate_config(tiny_config, device_count=8)
    tiny_config.mesh.batch_axes = ("data", "model")
    with pytest.raises(ValueError, match="not divisible by the 8 devices it is split over"):
        validate_config(tiny_config, device_count=8)


@pytest.mark.slow
def test_fsdp_run_on_8_devices_matches_replicated_and_restores_onto_other_meshes(
    tiny_data_dir, tmp_path
):
    out = tmp_path / "sharded.json"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    }
    script = os.path.join(REPO, "tests", "sharded_run.py")
    subprocess.run(
        [sys.executable, script, tiny_data_dir, str(tmp_path / "workdir"), str(out)],
        check=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    result = json.loads(out.read_text())
    assert result["devices"] == 8
    # The same three steps: FSDP only moves where the kernels live (XLA gathers them).
    np.testing.assert_allclose(result["fsdp_losses"], result["replicated_losses"], rtol=1e-5)
    # block_6's expand kernel [1, 1, 40, 240] and its Adam moment, in 4 shards of 60 outputs.
    assert result["kernel_shape"] == [1, 1, 40, 240]
    assert result["kernel_shards"] == [[1, 1, 40, 60]]
    assert result["moment_shards"] == [[1, 1, 40, 60]]
    # The checkpoint restores exactly onto a data=4 x fsdp=2 mesh and onto data=8.
    assert result["restored"]["fsdp2"] == {
        "step": 3,
        "all_equal": True,
        "kernel_shards": [[1, 1, 40, 120]],
    }
    assert result["finished"]["step"] == 6
    assert 0 <= result["finished"]["AP"] <= 1 and result["finished"]["exported_AP"] >= 0
    assert result["restored"]["replicated"] == {
        "step": 3,
        "all_equal": True,
        "kernel_shards": [[1, 1, 40, 240]],
    }

"""Trains the tiny detector on 8 simulated CPU devices under two meshes (test_sharding.py).

Run as `python tests/sharded_run.py DATA_DIR WORKDIR OUT.json` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`: three train steps on the same
batches replicated (`data`=8) and FSDP-sharded (`data`=2 x `fsdp`=4, backbone kernels
split over `fsdp`); the FSDP run's checkpoint is then restored onto a `data`=4 x
`fsdp`=2 mesh and onto the replicated one, and the FSDP run is finished by
`train_and_evaluate` (resumed, evaluated, exported). Writes losses, shard shapes,
the restored values' agreement and the finished run's step and AP to OUT.json.
"""

import json
import sys

import jax
import numpy as np

from jaxcomp import paths, training

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_config_for  # noqa: E402

KERNEL = "backbone/block_6/expand/conv/kernel"
FSDP_RULES = ((r".*backbone/.*/kernel", (None, None, None, "fsdp")),)


def experiment_on(data_dir, axes, batch_axes=("data",), rules=()):
    config = tiny_config_for(data_dir)
    config.mesh.axes, config.mesh.batch_axes, config.mesh.rules = axes, batch_axes, rules
    config.train.batch_size = 8
    return training.build_experiment(config)


def kernel_and_moment(state):
    """The kernel and Adam's first moment of it (the leaf of opt_state named like it)."""
    leaves = dict(zip(paths.leaf_names(state), jax.tree.leaves(state), strict=True))
    moments = [name for name in leaves if name.endswith("mu/" + KERNEL)]
    return leaves["params/" + KERNEL], leaves[moments[0]]


def train(experiment, batches):
    state = experiment.init_state(seed=0)
    losses = []
    for step, batch in enumerate(batches):
        fields = training.global_batch(
            batch, experiment.mesh, training.TRAIN_FIELDS, experiment.batch_axes
        )
        state, metrics = experiment.train_step_at(step)(state, fields)
        losses.append(float(metrics["total"]))
    return state, losses


def shard_shapes(array):
    return sorted({tuple(shard.data.shape) for shard in array.addressable_shards})


def main(data_dir, workdir, out):
    replicated = experiment_on(data_dir, (("data", 8),))
    dataset = training.experiment_train_dataset(replicated)
    batches = [dataset[step] for step in range(3)]
    _, replicated_losses = train(replicated, batches)

    fsdp = experiment_on(data_dir, (("data", 2), ("fsdp", 4)), ("data", "fsdp"), FSDP_RULES)
    state, fsdp_losses = train(fsdp, batches)
    kernel, moment = kernel_and_moment(state)
    with training.checkpoint_manager(workdir, fsdp.config.train) as manager:
        training.save_checkpoint(manager, state)
    saved = jax.device_get(state)

    restored = {}
    for name, experiment in (
        ("fsdp2", experiment_on(data_dir, (("data", 4), ("fsdp", 2)), ("data",), FSDP_RULES)),
        ("replicated", replicated),
    ):
        with training.checkpoint_manager(workdir, experiment.config.train) as manager:
            again = training.restore_latest(manager, experiment.init_state(seed=1))
        same = jax.tree.map(np.array_equal, jax.device_get(again), saved)
        restored[name] = {
            "step": int(again.step),
            "all_equal": all(jax.tree.leaves(same)),
            "kernel_shards": shard_shapes(kernel_and_moment(again)[0]),
        }
    # The CLI's path on the FSDP mesh: resume at step 3, finish, evaluate and export.
    finished = training.train_and_evaluate(fsdp.config, workdir)
    result = {
        "finished": {
            "step": finished["step"],
            "AP": finished["metrics"]["AP"],
            "exported_AP": finished["compression"]["model"]["AP"],
        },
        "devices": jax.device_count(),
        "replicated_losses": replicated_losses,
        "fsdp_losses": fsdp_losses,
        "kernel_shape": list(kernel.shape),
        "kernel_shards": shard_shapes(kernel),
        "moment_shards": shard_shapes(moment),
        "restored": restored,
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

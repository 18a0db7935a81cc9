r"""Command line: train and evaluate one experiment from a config file.

Example:
  python -m jaxcomp.main --config=configs/student.py --workdir=workdirs/student \
      --config.train.steps=200

Started again with the same --workdir, the run resumes from its latest checkpoint.
On several hosts, run the same command on each host with --distributed (see docs/accelerators.md).
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from jaxcomp import huge_pages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval results.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (several GPU hosts or a TPU pod slice). On TPU "
    "VMs, SLURM and Open MPI it finds the other processes itself; elsewhere also pass the "
    "three flags below. On CPU the processes exchange gradients through gloo.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/jaxcomp/xla",
    "Persistent XLA compilation cache ('' disables it); a second start skips the compiles.",
)
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def check_distributed_flags(
    distributed: bool,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """Raises app.UsageError for a multi-process flag combination that cannot work.

    Without --distributed the other three flags would be ignored and every host
    would train alone into the same workdir, so they are refused.

    Args:
      distributed: --distributed.
      coordinator_address: --coordinator_address ('host:port'), or None.
      num_processes: --num_processes, or None.
      process_id: --process_id, or None.
    """
    cluster_flags = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [name for name, value in cluster_flags.items() if value is not None]
    if given and not distributed:
        raise app.UsageError(
            f"{', '.join(given)} given without --distributed, which they need: add "
            "--distributed (or drop them for a single-process run)"
        )
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise app.UsageError(
                f"--coordinator_address must be host:port of process 0, got "
                f"{coordinator_address!r}; e.g. --coordinator_address=10.0.0.2:1234"
            )
    if num_processes is not None and num_processes < 1:
        raise app.UsageError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise app.UsageError(
            f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}; "
            "number the processes 0, 1, ..., n - 1"
        )


def main(argv):
    # Before anything else: it starts this command again when that gives XLA:CPU's
    # per-step temporaries huge pages (jaxcomp/huge_pages.py).
    huge_pages.restart_with_huge_pages()
    # Imported here rather than at the top: each data worker process imports this module
    # again (multiprocessing's spawn) and needs neither, and on 2 cores their imports
    # compete with this process's start-up.
    import jax

    from jaxcomp import training
    from jaxcomp.evaluation import format_metrics_table

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_distributed_flags(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    if not FLAGS["verbosity"].present:
        # orbax and TFDS log every save and read at INFO; `--verbosity=0` brings them back.
        logging.set_verbosity(logging.WARNING)
    training.enable_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.distributed:
        # Must come before anything touches a device: the backend is created knowing its peers.
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.info(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() != 0:
        return
    if result["preempted"]:
        print(
            f"Stopped at step {result['step']}; checkpoint saved in {FLAGS.workdir}. "
            "Run the same command again to resume."
        )
        return
    print(format_metrics_table({FLAGS.config.model.name: result["metrics"]}))
    print(json.dumps({"step": result["step"], **result["metrics"]}))


if __name__ == "__main__":
    app.run(main)

r"""Command line: train and evaluate one experiment from a config file.

Example:
  python -m jaxcomp.main --config=configs/student.py --workdir=workdirs/student \
      --config.train.steps=200

Started again with the same --workdir, the run resumes from its latest checkpoint.
On several hosts, run the same command on each host (see README).
"""

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxcomp import train
from jaxcomp.evaluation import format_metrics_table

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval results.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (several GPU hosts or a TPU pod slice). On TPU "
    "VMs, SLURM and Open MPI it finds the other processes itself; elsewhere also pass the "
    "three flags below.",
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # orbax and TFDS log every save and read at INFO; `--verbosity=0` brings them back.
        logging.set_verbosity(logging.WARNING)
    train.enable_compilation_cache(FLAGS.compilation_cache_dir)
    if FLAGS.distributed:
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
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
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

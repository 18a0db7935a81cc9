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

from jaxcomp import cluster, huge_pages

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval results.")
cluster.define_flags()
flags.DEFINE_string(
    "compilation_cache_dir",
    "~/.cache/jaxcomp/xla",
    "Persistent XLA compilation cache ('' disables it); a second start skips the compiles.",
)
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


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
    cluster.check_flags(FLAGS)
    if not FLAGS["verbosity"].present:
        # orbax and TFDS log every save and read at INFO; `--verbosity=0` brings them back.
        logging.set_verbosity(logging.WARNING)
    cluster.initialize(FLAGS)
    training.enable_compilation_cache(FLAGS.compilation_cache_dir)
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

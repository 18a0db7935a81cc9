"""Training and evaluation as a library of small modules, one job each.

* `state`: the `TrainState`, the optimizer and batch placement (the mesh and the
  state's sharding rules are `jaxcomp.sharding`'s).
* `steps`: the jitted train and eval steps, composing the compression methods.
* `checkpoints`: orbax checkpoints, restoring other runs' variables, workdir checks.
* `metrics`: metrics files, non-finite losses, stop requests.
* `experiment`: everything a config builds (data, model, methods, steps).
* `export`: the compression summary of a trained model and its exported forms.
* `loop`: `train_and_evaluate`, the loop itself.
"""

from jaxcomp.sharding import make_mesh
from jaxcomp.training.checkpoints import (
    MIN_FREE_BYTES,
    check_workdir,
    checkpoint_manager,
    restore_checkpoint,
    restore_latest,
    restore_variables,
    save_checkpoint,
)
from jaxcomp.training.experiment import (
    Experiment,
    build_experiment,
    enable_compilation_cache,
    evaluate_experiment,
    experiment_train_dataset,
    method_context,
)
from jaxcomp.training.export import (
    compression_summary,
    export_report,
    format_compression_table,
    model_flops,
    save_and_measure,
)
from jaxcomp.training.loop import train_and_evaluate
from jaxcomp.training.metrics import (
    MetricsWriter,
    NonFiniteLossError,
    StopRequest,
    summarize_metrics,
)
from jaxcomp.training.state import (
    TrainState,
    abstract_variables,
    create_train_state,
    global_batch,
    init_state,
    jit_init_state,
    make_optimizer,
)
from jaxcomp.training.steps import (
    EVAL_FIELDS,
    TRAIN_FIELDS,
    batch_targets,
    eval_step,
    evaluate,
    jit_eval_step,
    jit_train_step,
    train_step,
)

__all__ = [
    "EVAL_FIELDS",
    "MIN_FREE_BYTES",
    "TRAIN_FIELDS",
    "Experiment",
    "MetricsWriter",
    "NonFiniteLossError",
    "StopRequest",
    "TrainState",
    "abstract_variables",
    "batch_targets",
    "build_experiment",
    "check_workdir",
    "checkpoint_manager",
    "compression_summary",
    "create_train_state",
    "enable_compilation_cache",
    "eval_step",
    "evaluate",
    "evaluate_experiment",
    "experiment_train_dataset",
    "export_report",
    "format_compression_table",
    "global_batch",
    "init_state",
    "jit_eval_step",
    "jit_init_state",
    "jit_train_step",
    "make_mesh",
    "make_optimizer",
    "method_context",
    "model_flops",
    "restore_checkpoint",
    "restore_latest",
    "restore_variables",
    "save_and_measure",
    "save_checkpoint",
    "summarize_metrics",
    "train_and_evaluate",
    "train_step",
]

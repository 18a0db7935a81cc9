"""jaxcomp: compress object detectors in JAX with pure functions over parameter pytrees."""

from jaxcomp import (
    compress,
    data,
    detection,
    distill,
    evaluation,
    flops,
    models,
    paths,
    prune,
    quant,
    report,
    train,
    visualize,
)
from jaxcomp.config import default_config, load_config_file, validate_config
from jaxcomp.evaluation import coco_metrics, format_metrics_table
from jaxcomp.models import create_model
from jaxcomp.paths import leaf_names, map_with_names, resolve_rules
from jaxcomp.train import TrainState, build_experiment, train_and_evaluate

__version__ = "0.1.0"

__all__ = [
    "TrainState",
    "build_experiment",
    "coco_metrics",
    "compress",
    "create_model",
    "data",
    "default_config",
    "detection",
    "distill",
    "evaluation",
    "flops",
    "format_metrics_table",
    "leaf_names",
    "load_config_file",
    "map_with_names",
    "models",
    "paths",
    "prune",
    "quant",
    "report",
    "resolve_rules",
    "train",
    "train_and_evaluate",
    "validate_config",
    "visualize",
]

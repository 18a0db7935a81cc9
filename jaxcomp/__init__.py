"""jaxcomp: compress object detectors in JAX with pure functions over parameter pytrees."""

import importlib

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
)
from jaxcomp.config import default_config, load_config_file, validate_config
from jaxcomp.evaluation import coco_metrics, format_metrics_table
from jaxcomp.models import create_model
from jaxcomp.paths import leaf_names, map_with_names, resolve_rules
from jaxcomp.train import TrainState, build_experiment, train_and_evaluate

__version__ = "0.1.0"


def __getattr__(name: str):
    # `visualize` imports matplotlib, a quarter second of every start; it loads on first use.
    if name == "visualize":
        return importlib.import_module("jaxcomp.visualize")
    raise AttributeError(f"module 'jaxcomp' has no attribute {name!r}")


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

"""jaxcomp: compress object detectors in JAX with pure functions over parameter pytrees.

Submodules and the names below load on first use (PEP 562), so that `import jaxcomp`
is cheap: every data worker process imports the package again, and on a 2-core
machine those imports compete with the main process's start-up.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "config",
    "data",
    "detection",
    "distill",
    "evaluation",
    "flops",
    "huge_pages",
    "methods",
    "models",
    "paths",
    "prune",
    "quant",
    "report",
    "training",
    "transforms",
    "visualize",
)
_NAMES = {
    "Transform": "transforms",
    "TrainState": "training",
    "build_experiment": "training",
    "train_and_evaluate": "training",
    "coco_metrics": "evaluation",
    "format_metrics_table": "evaluation",
    "create_model": "models",
    "default_config": "config",
    "load_config_file": "config",
    "validate_config": "config",
    "leaf_names": "paths",
    "map_with_names": "paths",
    "resolve_rules": "paths",
}

__all__ = sorted([*_SUBMODULES, *_NAMES])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxcomp.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"jaxcomp.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'jaxcomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Detection data: the embedded TFDS dataset and the pipeline for any TFDS detection dataset."""

from jaxcomp.data.embedded import EmbeddedConfig, EmbeddedDetection, prepare_embedded
from jaxcomp.data.pipeline import (
    class_names,
    dataset_report,
    eval_batches,
    get_builder,
    iterate_batches,
    num_classes,
    sanitize_example,
    train_dataset,
)

__all__ = [
    "EmbeddedConfig",
    "EmbeddedDetection",
    "class_names",
    "dataset_report",
    "eval_batches",
    "get_builder",
    "iterate_batches",
    "num_classes",
    "prepare_embedded",
    "sanitize_example",
    "train_dataset",
]

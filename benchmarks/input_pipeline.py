"""Bytes sent to the devices per global batch, and the input pipeline against the train step.

The train step encodes the CenterNet targets from padded boxes on the devices
(`jaxcomp.training.batch_targets`); before, the host encoded them and sent the
heatmaps. This prints, for each config, the bytes of one global batch both ways
(from shapes: no data needed), and for the first config with its dataset at hand,
the host pipeline's images/s in one process (what one data-loader worker gives)
against the train step's images/s, and the host time the NumPy encoding used to add.

  python benchmarks/input_pipeline.py --configs=configs/student.py,configs/coco.py
"""

import functools
import json
import time

import jax
import numpy as np
from absl import app, flags
from common import median_ms

from jaxcomp import training
from jaxcomp.config import load_config_file
from jaxcomp.data import pipeline
from jaxcomp.detection import encode_targets
from jaxcomp.models import OUTPUT_STRIDE

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["configs/student.py", "configs/coco.py"], "Config files.")
flags.DEFINE_integer("steps", 20, "Batches timed for the pipeline and the train step.")
flags.DEFINE_string("json", "", "Also write the results to this JSON file.")

# Class counts of the datasets the configs name, for the shapes-only count when the
# dataset is not prepared here.
_CLASSES = {"jaxcomp_embedded": 14, "voc/2007": 20, "coco/2017": 80}


def batch_bytes(config, num_classes: int) -> dict[str, int]:
    """Bytes of one global batch's train fields, with targets on the host and on device."""
    size, rows, objects = config.data.image_size, config.train.batch_size, config.data.max_objects
    sent = {
        "image": jax.ShapeDtypeStruct((rows, size, size, 3), np.uint8),
        "boxes": jax.ShapeDtypeStruct((rows, objects, 4), np.float32),
        "labels": jax.ShapeDtypeStruct((rows, objects), np.int32),
        "box_mask": jax.ShapeDtypeStruct((rows, objects), np.bool_),
    }
    targets = jax.eval_shape(
        functools.partial(training.batch_targets, num_classes=num_classes), sent
    )
    return {
        "host_targets": _nbytes({"image": sent["image"], **targets}),
        "device_targets": _nbytes(sent),
    }


def _nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def pipeline_vs_step(config) -> dict[str, float]:
    experiment = training.build_experiment(config)
    dataset = training.experiment_train_dataset(experiment)
    num_classes = pipeline.num_classes(experiment.builder)
    rows = config.train.batch_size
    load, encode = [], []
    for step in range(FLAGS.steps):
        start = time.perf_counter()
        batch = dataset[step]
        load.append(time.perf_counter() - start)
        start = time.perf_counter()
        for boxes, labels, mask in zip(
            batch["boxes"], batch["labels"], batch["box_mask"], strict=True
        ):
            encode_targets(
                boxes,
                labels,
                mask,
                image_size=config.data.image_size,
                num_classes=num_classes,
                stride=OUTPUT_STRIDE,
            )
        encode.append(time.perf_counter() - start)
    state = experiment.init_state()
    step_times = []
    for step in range(FLAGS.steps + 1):
        batch = training.global_batch(
            dataset[step], experiment.mesh, training.TRAIN_FIELDS, experiment.batch_axes
        )
        start = time.perf_counter()
        state, metrics = experiment.train_step_at(step)(state, batch)
        jax.block_until_ready(metrics)
        if step:  # the first call compiles
            step_times.append(time.perf_counter() - start)
    return {
        "pipeline_images_per_s": rows / float(np.median(load)),
        "host_encode_ms_per_image": median_ms(encode) / rows,
        "train_step_images_per_s": rows / float(np.median(step_times)),
    }


def main(_):
    results = {"backend": jax.default_backend(), "configs": {}}
    print(
        "| config | image | batch | objects | classes | MB/batch, host targets "
        "| MB/batch, device targets | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for path in FLAGS.configs:
        config = load_config_file(path)
        classes = _CLASSES[config.data.name.removesuffix("/tiny")]
        counts = batch_bytes(config, classes)
        results["configs"][path] = {**counts, "num_classes": classes}
        print(
            f"| {path} | {config.data.image_size} | {config.train.batch_size} "
            f"| {config.data.max_objects} | {classes} | {counts['host_targets'] / 1e6:.2f} "
            f"| {counts['device_targets'] / 1e6:.2f} "
            f"| {counts['host_targets'] / counts['device_targets']:.2f}x |"
        )
    first = load_config_file(FLAGS.configs[0])
    timing = pipeline_vs_step(first)
    results["timing"] = {"config": FLAGS.configs[0], **timing}
    print(
        f"\n{FLAGS.configs[0]} on {jax.default_backend()}, medians of {FLAGS.steps} batches: "
        f"pipeline {timing['pipeline_images_per_s']:.0f} images/s in one process, "
        f"train step {timing['train_step_images_per_s']:.0f} images/s; the NumPy target "
        f"encoding the step replaced cost {timing['host_encode_ms_per_image']:.2f} ms per image"
    )
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)

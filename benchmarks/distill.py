r"""What distillation costs in a train step, and how much of it is the teacher's forward pass.

Run:
  make bench     # runs this after the other benchmarks
  python benchmarks/distill.py --repeats=5

For the student (batch 16, 128x128, this backend's default depthwise conv), timed
alternately so that machine noise hits both sides alike: the plain train step, the
distillation step of configs/distill.py (frozen teacher forward on the same batch,
heatmap soft targets, size/offset imitation at the teacher's peaks, PKD on the neck
features through the 1x1 adapter), and the teacher's inference forward alone.
Prints a table and writes benchmarks/distill.json.
"""

import json
import os
import time

import jax
from absl import app, flags
from common import NUM_CLASSES, alternate, median_ms, paired_ratio, seconds, synthetic_batch
from jax.sharding import NamedSharding, PartitionSpec

from jaxcomp import distill, huge_pages, training
from jaxcomp.config import load_config_file
from jaxcomp.detection import distill as detection_distill
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("student", "centernet_student", "Student variant.")
flags.DEFINE_string("teacher", "centernet_teacher", "Teacher variant.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 9, "Timed calls per measurement (medians are reported).")
flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "distill.json"), "JSON results."
)


def main(argv):
    del argv
    # Measured as the command line trains: with huge pages for XLA's temporaries.
    huge_pages.restart_with_huge_pages()
    mesh = training.make_mesh()
    batch = training.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, training.TRAIN_FIELDS
    )
    config = load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "distill.py")
    )
    student = create_model(FLAGS.student, num_classes=NUM_CLASSES)
    teacher = create_model(FLAGS.teacher, num_classes=NUM_CLASSES)
    optimizer = training.make_optimizer(config.optim, 1000)
    loss_weights = dict(config.loss)
    # Random teacher weights: the cost does not depend on what the teacher learned.
    teacher_state = training.init_state(teacher, optimizer, FLAGS.image_size, 1, mesh)
    teacher_variables = {"params": teacher_state.params, "batch_stats": teacher_state.batch_stats}
    spec = detection_distill.spec_of(config)
    # The same method a run of configs/distill.py builds, with this random teacher.
    method = distill.distillation(
        teacher.apply,
        lambda: teacher_variables,
        lambda *outputs: detection_distill.distillation_loss(*outputs[:3], spec, *outputs[3:]),
        inputs=lambda batch: (batch["image"],),
        layers=spec.layers,
        adapters={layer: (student.neck_features, teacher.neck_features) for layer in spec.layers},
    )
    methods = {"plain": (), "distill": (("distill", method),)}
    states = {
        name: training.init_state(
            student,
            optimizer,
            FLAGS.image_size,
            0,
            mesh,
            methods=methods[name],
            method_optimizer=optimizer,
        )
        for name in methods
    }
    steps = {
        name: training.jit_train_step(
            student, optimizer, loss_weights, mesh, methods[name], method_optimizer=optimizer
        )
        for name in methods
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    constants = {"plain": {}, "distill": {"distill": jax.device_put(teacher_variables, replicated)}}
    teacher_forward = jax.jit(lambda v, x: teacher.apply(v, x, train=False))

    def step_runner(name):
        def run():
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name], batch, constants[name])
            jax.block_until_ready(metrics)
            return time.perf_counter() - start

        return run

    times = alternate(
        {
            **{name: step_runner(name) for name in steps},
            "teacher_forward": lambda: seconds(teacher_forward, teacher_variables, batch["image"]),
        },
        FLAGS.repeats,
    )
    results = {
        "plain_step_ms": median_ms(times["plain"]),
        "distill_step_ms": median_ms(times["distill"]),
        "teacher_forward_ms": median_ms(times["teacher_forward"]),
        "distill_over_plain_step": paired_ratio(times["distill"], times["plain"]),
        "teacher_forward_over_plain_step": paired_ratio(times["teacher_forward"], times["plain"]),
    }
    extra = results["distill_step_ms"] - results["plain_step_ms"]
    results["teacher_share_of_extra"] = results["teacher_forward_ms"] / extra if extra > 0 else 0.0
    print(
        f"\nbackend={jax.default_backend()} student={FLAGS.student} teacher={FLAGS.teacher} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size} repeats={FLAGS.repeats}"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print("| measurement | ms (median) | over the plain step |\n|---|---:|---:|")
    print(f"| plain student train step | {results['plain_step_ms']:.0f} | 1.00 |")
    print(
        f"| distillation train step | {results['distill_step_ms']:.0f} "
        f"| {results['distill_over_plain_step']:.2f} |"
    )
    print(
        f"| teacher forward alone | {results['teacher_forward_ms']:.0f} "
        f"| {results['teacher_forward_over_plain_step']:.2f} |"
    )
    print(
        f"The teacher's forward pass is {100 * results['teacher_share_of_extra']:.0f}% of the "
        "extra time of the distillation step."
    )
    with open(FLAGS.output, "w") as f:
        json.dump({"backend": jax.default_backend(), **results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

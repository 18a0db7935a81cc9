r"""What int8 fake quantization costs in a train step, and the int8 serving path's speed.

Run:
  make bench     # runs this after the other benchmarks
  python benchmarks/quant.py --repeats=5

For the student (batch 16, 128x128, this backend's default depthwise conv), timed
alternately so that machine noise hits both sides alike:
- the QAT train step (BN-folded fake-quant weights, fake-quant layer inputs with
  EMA observers) over the float step (target: at most 1.15), with BatchNorm
  training and frozen (the program QAT switches to at `quant.freeze_bn_step`);
- inference: the fake-quant forward and the real int8 serving forward (int8 x
  int8 -> int32 convolutions) over the float forward. XLA:CPU has no fast int8
  convolution kernels, so on CPU the int8 path runs depthwise layers as int32
  shifted multiply-adds and 1x1 layers as int8 matmuls (`jaxcomp.quant.int8`).
Prints a table and writes benchmarks/quant.json.
"""

import json
import os
import time

import jax
from absl import app, flags
from common import NUM_CLASSES, alternate, median_ms, paired_ratio, seconds, synthetic_batch

from jaxcomp import huge_pages, methods, quant, training
from jaxcomp.config import load_config_file
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "centernet_student", "Model variant.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 9, "Timed calls per measurement (medians are reported).")
flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "quant.json"), "JSON results."
)


def main(argv):
    del argv
    # Measured as the command line trains: with huge pages for XLA's temporaries.
    huge_pages.restart_with_huge_pages()
    mesh = training.make_mesh()
    batch = training.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, training.TRAIN_FIELDS
    )
    # The QAT recipe of configs/qat_int8.py (observers, bits, rules), on synthetic batches.
    config = load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "qat_int8.py")
    )
    quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    optimizer = training.make_optimizer(config.optim, 1000)
    loss_weights = dict(config.loss)
    qat = (("quant", quant.transform.qat(model, FLAGS.image_size, quant_config)),)

    states, steps = {}, {}
    for name, method, phase in (
        ("float", (), ()),
        ("qat", qat, (None,)),
        ("qat_frozen_bn", qat, (quant.FROZEN_BATCH_NORM,)),
    ):
        states[name] = training.init_state(
            model, optimizer, FLAGS.image_size, 0, mesh, methods=method
        )
        compiled = training.jit_train_step(model, optimizer, loss_weights, mesh, method, phase)
        steps[name] = lambda state, batch, compiled=compiled: compiled(state, batch, {})

    def step_runner(name):
        def run():
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name], batch)
            jax.block_until_ready(metrics)
            return time.perf_counter() - start

        return run

    step_times = alternate({name: step_runner(name) for name in steps}, FLAGS.repeats)

    state = states["qat"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    observers = state.methods["quant"][quant.QUANT_STATS]
    int8_tree = quant.convert_to_int8(state.params, state.batch_stats, observers, quant_config)
    images = batch["image"]
    forwards = {
        "float": jax.jit(lambda v, x: model.apply(v, x, train=False)),
        "fake_quant": jax.jit(
            lambda v, x: quant.quantized_apply(
                model.apply, v, x, config=quant_config, mode="eval", train=False
            )
        ),
        "int8": jax.jit(
            lambda tree, x: quant.int8_apply(model, tree, x, config=quant_config, train=False)
        ),
    }
    forward_args = {
        "float": variables,
        "fake_quant": {**variables, quant.QUANT_STATS: observers},
        "int8": int8_tree,
    }
    forward_times = alternate(
        {
            name: (lambda name=name: seconds(forwards[name], forward_args[name], images))
            for name in forwards
        },
        FLAGS.repeats,
    )

    results = {
        "float_step_ms": median_ms(step_times["float"]),
        "qat_step_ms": median_ms(step_times["qat"]),
        "qat_over_float_step": paired_ratio(step_times["qat"], step_times["float"]),
        "qat_frozen_bn_step_ms": median_ms(step_times["qat_frozen_bn"]),
        "qat_frozen_bn_over_float_step": paired_ratio(
            step_times["qat_frozen_bn"], step_times["float"]
        ),
        **{f"{name}_forward_ms": median_ms(times) for name, times in forward_times.items()},
        "fake_quant_over_float_forward": paired_ratio(
            forward_times["fake_quant"], forward_times["float"]
        ),
        "int8_over_float_forward": paired_ratio(forward_times["int8"], forward_times["float"]),
    }
    print(
        f"\nbackend={jax.default_backend()} model={FLAGS.model} batch={FLAGS.batch_size} "
        f"image={FLAGS.image_size} repeats={FLAGS.repeats}"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print("| measurement | ms (median) | over float |\n|---|---:|---:|")
    print(f"| float train step | {results['float_step_ms']:.0f} | 1.00 |")
    print(
        f"| QAT train step | {results['qat_step_ms']:.0f} | {results['qat_over_float_step']:.3f} |"
    )
    print(
        f"| QAT train step, BatchNorm frozen | {results['qat_frozen_bn_step_ms']:.0f} | "
        f"{results['qat_frozen_bn_over_float_step']:.3f} |"
    )
    print(f"| float forward | {results['float_forward_ms']:.1f} | 1.00 |")
    print(
        f"| fake-quant forward | {results['fake_quant_forward_ms']:.1f} | "
        f"{results['fake_quant_over_float_forward']:.2f} |"
    )
    print(
        f"| int8 serving forward | {results['int8_forward_ms']:.1f} | "
        f"{results['int8_over_float_forward']:.2f} |"
    )
    with open(FLAGS.output, "w") as f:
        json.dump({"backend": jax.default_backend(), "model": FLAGS.model, **results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

r"""Inference latency on this CPU: jaxcomp and ONNX Runtime, float and int8.

Run:
  make bench     # runs this after the other benchmarks
  python benchmarks/latency.py --repeats=5
  python benchmarks/latency.py --workdir=workdirs/demo/int8   # a trained run's model

For each input side (128, 320) and batch (1, 16), four ways of running the same
detector, forward pass plus decode (max-pool peaks, top 100 boxes), are timed
alternately in this one process, so that machine noise hits all of them alike,
and their medians reported:
- jaxcomp's jitted float forward (`model.apply` + `decode_detections`);
- jaxcomp's int8 serving path (`quant.int8_apply`, int8 x int8 -> int32);
- ONNX Runtime (CPU) on the float export (`jaxcomp.export.onnx.float_onnx`);
- ONNX Runtime on the int8 QDQ export (`int8_onnx`), which it fuses into integer
  convolutions (QLinearConv) where a layer's output is the next one's input.
Without --workdir the student is randomly initialised and calibrated on random
images (the QAT recipe of configs/qat_int8.py): latency does not depend on the
weights' values. The CPU's vector features (/proc/cpuinfo flags) are printed with
the table: int8 kernels pay where the CPU has int8 dot products (AVX-512 VNNI,
AVX-VNNI, AMX on x86; SDOT/I8MM on ARM). Prints a table and writes
benchmarks/latency.json.
"""

import json
import os
import platform
import re
import time

import jax
import numpy as np
import onnxruntime as ort
from absl import app, flags, logging
from common import NUM_CLASSES, alternate, median_ms, paired_ratio, seconds

from jaxcomp import compress, quant
from jaxcomp.config import load_config_file
from jaxcomp.detection import decode_detections
from jaxcomp.export import check
from jaxcomp.export.onnx import OPSET, float_onnx, int8_onnx
from jaxcomp.export.run import load_run
from jaxcomp.models import OUTPUT_STRIDE, create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished quantized run to time; random weights if unset.")
flags.DEFINE_string("model", "centernet_student", "Model variant (without --workdir).")
flags.DEFINE_list("image_sizes", ["128", "320"], "Input sides, multiples of 32.")
flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
flags.DEFINE_integer("repeats", 9, "Timed rounds per setting (medians are reported).")
flags.DEFINE_integer("top_k", 100, "Detections decoded per image.")
flags.DEFINE_integer("threads", None, "ONNX Runtime intra-op threads (default: physical cores).")
flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "latency.json"), "JSON results."
)

RUNNERS = ("jaxcomp_float", "jaxcomp_int8", "onnxruntime_float", "onnxruntime_int8")


def cpu_features() -> dict[str, object]:
    """The CPU model and the flags of /proc/cpuinfo that matter for int8 and float kernels."""
    model, flag_set = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
        if names := re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE):
            model = names[0]
        if lines := re.findall(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE):
            flag_set = set(lines[0].split())
    wanted = re.compile(r"avx2|avx512.*|.*vnni.*|amx.*|fma|asimddp|i8mm|sve.*")
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": sorted(flag for flag in flag_set if wanted.fullmatch(flag)),
    }


def _random_student():
    """The student with random weights, calibrated on random images (configs/qat_int8.py rules)."""
    config = load_config_file(
        os.path.join(os.path.dirname(__file__), "..", "configs", "qat_int8.py")
    )
    quant_config = compress.make_quant_config(config)
    model = create_model(FLAGS.model, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
    variables = jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(0))
    quant_stats = quant.calibrate(
        model.apply, variables, [images[:4], images[4:]], quant_config, train=False
    )
    int8_tree = quant.convert_to_int8(
        variables["params"], variables["batch_stats"], quant_stats, quant_config
    )
    return model, variables, int8_tree, quant_config


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        # JAX, orbax and TFDS log their start-up at INFO.
        logging.set_verbosity(logging.WARNING)
    if FLAGS.workdir:
        run = load_run(FLAGS.workdir)
        model, variables, quant_config = run.model, run.variables, run.quant_config
        int8_tree = run.int8_tree()
        name = f"{run.config.model.name} ({FLAGS.workdir}, step {run.step})"
    else:
        model, variables, int8_tree, quant_config = _random_student()
        name = f"{FLAGS.model} (random weights, calibrated on random images)"
    k = FLAGS.top_k

    def decoded(forward):
        return jax.jit(lambda weights, x: decode_detections(forward(weights, x), k=k))

    jaxcomp_float = decoded(lambda v, x: model.apply(v, x, train=False))
    jaxcomp_int8 = decoded(
        lambda tree, x: quant.int8_apply(model, tree, x, config=quant_config, train=False)
    )
    rows = []
    for image_size in (int(size) for size in FLAGS.image_sizes):
        sessions = {
            "float": check.make_session(
                float_onnx(model, variables, image_size=image_size, top_k=k),
                threads=FLAGS.threads,
            ),
            "int8": check.make_session(
                int8_onnx(model, int8_tree, config=quant_config, image_size=image_size, top_k=k),
                threads=FLAGS.threads,
            ),
        }
        for batch_size in (int(size) for size in FLAGS.batch_sizes):
            rng = np.random.default_rng(batch_size)
            images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)

            def onnx_runner(session, images=images):
                def run():
                    start = time.perf_counter()
                    check.run_session(session, images)
                    return time.perf_counter() - start

                return run

            runners = {
                "jaxcomp_float": lambda images=images: seconds(jaxcomp_float, variables, images),
                "jaxcomp_int8": lambda images=images: seconds(jaxcomp_int8, int8_tree, images),
                "onnxruntime_float": onnx_runner(sessions["float"]),
                "onnxruntime_int8": onnx_runner(sessions["int8"]),
            }
            times = alternate(runners, FLAGS.repeats)
            row = {
                "image_size": image_size,
                "batch_size": batch_size,
                **{f"{runner}_ms": median_ms(times[runner]) for runner in RUNNERS},
                "onnxruntime_int8_over_float": paired_ratio(
                    times["onnxruntime_int8"], times["onnxruntime_float"]
                ),
                "jaxcomp_int8_over_float": paired_ratio(
                    times["jaxcomp_int8"], times["jaxcomp_float"]
                ),
                "onnxruntime_float_over_jaxcomp_float": paired_ratio(
                    times["onnxruntime_float"], times["jaxcomp_float"]
                ),
            }
            rows.append(row)
            print(
                f"{image_size}x{image_size} batch {batch_size}: "
                + ", ".join(f"{runner} {row[f'{runner}_ms']:.1f} ms" for runner in RUNNERS),
                flush=True,
            )

    cpu = cpu_features()
    header = {
        "model": name,
        "top_k": k,
        "repeats": FLAGS.repeats,
        "cpu": cpu,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "onnxruntime": ort.__version__,
        "onnx_opset": OPSET,
        "onnxruntime_threads": FLAGS.threads or "default (one per physical core)",
        "date": time.strftime("%Y-%m-%d"),
        "output_stride": OUTPUT_STRIDE,
    }
    print(
        f"\n{name}; forward + decode (top {k}); medians of {FLAGS.repeats} alternated rounds\n"
        f"CPU: {cpu['model']}, {cpu['cores']} cores; flags: {' '.join(cpu['flags'])}\n"
        f"jax {jax.__version__} ({jax.default_backend()}), onnxruntime {ort.__version__} "
        f"(CPUExecutionProvider), ONNX opset {OPSET}"
    )
    print(
        "| input | batch | jaxcomp float ms | jaxcomp int8 ms | ORT float ms | ORT int8 (QDQ) ms "
        "| ORT int8 / ORT float (median of paired ratios) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        print(
            f"| {row['image_size']}x{row['image_size']} | {row['batch_size']} "
            f"| {row['jaxcomp_float_ms']:.1f} | {row['jaxcomp_int8_ms']:.1f} "
            f"| {row['onnxruntime_float_ms']:.1f} | {row['onnxruntime_int8_ms']:.1f} "
            f"| {row['onnxruntime_int8_over_float']:.2f} |"
        )
    with open(FLAGS.output, "w") as f:
        json.dump({**header, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)

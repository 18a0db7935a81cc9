r"""Train step speed on whatever backend JAX finds: CPU, GPU or TPU.

Run:
  make bench     # the student's rows, after the other benchmarks
  python benchmarks/accelerator.py --models=centernet_student --steps=5
  python benchmarks/accelerator.py --batch_size=256 --steps=20    # on a GPU or TPU

For each model of --models and each variant of --variants, the train step that
`jaxcomp.main` runs for --config (configs/student.py) with the model, batch and
image size set here: 'float32'; 'bfloat16' (`model.dtype`); 'qat' (`quant.mode`,
float32); 'distill' (float32, from a randomly initialised --distill_teacher
checkpoint written to a temporary directory; the cost does not depend on what the
teacher learned). Each step is built by `jaxcomp.training.build_experiment`, its
state by `Experiment.init_state` and its batch by the experiment's input pipeline,
placed as the training loop places it. Compile time is that of
`.lower(state, batch, constants).compile()` (tracing included, no persistent
cache). All steps then run alternately, one call each per round, so that machine
noise hits every row alike, and each ratio to the float32 step is the median over
rounds of the pair's ratio.

Model FLOP utilisation is the model's FLOPs per step (3x the forward FLOPs of
`jaxcomp.flops`, plus the teacher's forward for 'distill') times steps/s, over
the peak dense FLOP/s of the devices, where `PEAK_FLOPS` knows the chip.
Prints a markdown table and writes benchmarks/accelerator.json.
"""

import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
from absl import app, flags, logging
from common import alternate, median_ms, paired_ratio
from ml_collections import config_flags

from jaxcomp import huge_pages, training
from jaxcomp.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("float32", "bfloat16", "qat", "distill")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "student.py"), "Base experiment config file."
)
flags.DEFINE_list("models", ["centernet_student", "centernet_teacher"], "Model variants.")
flags.DEFINE_list("variants", list(VARIANTS), f"Train step variants, of {list(VARIANTS)}.")
flags.DEFINE_string("distill_teacher", "centernet_teacher", "The model 'distill' learns from.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("steps", 7, "Timed calls of each step (medians are reported).", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed calls of each step after compiling.", lower_bound=1)
flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "accelerator.json"), "JSON results."
)

# The train step does the forward pass, then the input and the weight gradients,
# each about as costly as the forward.
TRAIN_STEP_FORWARDS = 3

# Peak dense FLOP/s of one device, (bfloat16, float32), by a substring of
# `jax.devices()[0].device_kind`, first match wins. float32 is the rate at JAX's
# default matmul precision: TF32 tensor cores on A100/H100/H200, one bfloat16 pass
# on TPU. Vendor specs, dense (without 2:4 sparsity): NVIDIA H100 datasheet (SXM
# 989 / 494.7 TFLOP/s BF16 / TF32, PCIe 756 / 378, NVL 835 / 417.5), H200 datasheet
# (SXM as H100 SXM, NVL as H100 NVL), A100 datasheet (312 / 156); Cloud TPU system
# architecture pages, per chip: v4 275, v5e ('TPU v5 lite') 197, v5p 459 TFLOP/s bfloat16.
PEAK_FLOPS = (
    ("H100 PCIe", (756e12, 378e12)),
    ("H100 NVL", (835e12, 417.5e12)),
    ("H200 NVL", (835e12, 417.5e12)),
    ("H100", (989e12, 494.7e12)),
    ("H200", (989e12, 494.7e12)),
    ("A100", (312e12, 156e12)),
    ("TPU v4", (275e12, 275e12)),
    ("TPU v5 lite", (197e12, 197e12)),
    ("TPU v5", (459e12, 459e12)),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one `device_kind` device computing in `dtype`; None if unknown."""
    for name, peaks in PEAK_FLOPS:
        if name in device_kind:
            return peaks[0] if dtype == "bfloat16" else peaks[1]
    return None


def variant_config(base, model: str, variant: str, teacher_workdir: str):
    """`base` with the model, batch and image size of the flags and the variant's fields."""
    config = base.copy_and_resolve_references()
    config.model.name = model
    config.data.image_size = FLAGS.image_size
    config.train.batch_size = FLAGS.batch_size
    if variant == "bfloat16":
        config.model.dtype = "bfloat16"
    elif variant == "qat":
        config.quant.mode = "qat"
    elif variant == "distill":
        config.distill.teacher = teacher_workdir
        config.distill.teacher_model = FLAGS.distill_teacher
    return config


def forward_flops(experiment: training.Experiment, state: training.TrainState) -> int:
    """FLOPs of one image's forward pass through the experiment's model."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    size = experiment.config.data.image_size
    return training.model_flops(experiment.model, variables, size)["flops"]


def save_random_teacher(config, workdir: str) -> int:
    """Writes a randomly initialised checkpoint of `config`'s model into `workdir`, as
    training would; returns the model's forward FLOPs per image."""
    experiment = training.build_experiment(config)
    state = experiment.init_state()
    with training.checkpoint_manager(workdir, config.train) as manager:
        training.save_checkpoint(manager, state)
    return forward_flops(experiment, state)


def compile_step(config) -> tuple[dict, Callable[[], float]]:
    """Builds and compiles one train step; returns (facts, time one call of it)."""
    experiment = training.build_experiment(config)
    state = experiment.init_state()
    flops_per_image = forward_flops(experiment, state)
    local_batch = experiment_batch(experiment)
    batch = training.global_batch(local_batch, experiment.mesh, training.TRAIN_FIELDS)
    start = time.perf_counter()
    step = experiment.jitted_train_step(0).lower(state, batch, experiment.constants).compile()
    compile_seconds = time.perf_counter() - start
    holder = [state]

    def run() -> float:
        start = time.perf_counter()
        holder[0], metrics = step(holder[0], batch, experiment.constants)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    facts = {"compile_seconds": compile_seconds, "forward_flops_per_image": flops_per_image}
    return facts, run


def experiment_batch(experiment: training.Experiment) -> dict:
    """The first training batch of the experiment's input pipeline (this process's rows)."""
    return next(pipeline.iterate_batches(training.experiment_train_dataset(experiment), 0, 1))


def summarize(facts: dict, times: list[float], dtype: str, device_kind: str) -> dict:
    """One row: step time, throughput and model FLOP utilisation."""
    step_seconds = median_ms(times) / 1000
    step_flops = FLAGS.batch_size * facts["train_step_flops_per_image"]
    peak = peak_flops(device_kind, dtype)
    return {
        **facts,
        "step_ms": 1000 * step_seconds,
        "images_per_second": FLAGS.batch_size / step_seconds,
        "model_flops_per_second": step_flops / step_seconds,
        "peak_flops_per_second": peak * jax.device_count() if peak else None,
        "mfu": step_flops / step_seconds / (peak * jax.device_count()) if peak else None,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | variant | compile s | step ms | images/s | model TFLOP/s | MFU | over float32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "unknown"
        ratio = row["step_over_float32"]
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['compile_seconds']:.1f} "
            f"| {row['step_ms']:.1f} | {row['images_per_second']:.1f} "
            f"| {row['model_flops_per_second'] / 1e12:.3f} | {mfu} "
            f"| {f'{ratio:.2f}' if ratio is not None else '-'} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    # Measured as the command line trains: with huge pages for XLA's temporaries on CPU.
    huge_pages.restart_with_huge_pages()
    if not FLAGS["verbosity"].present:
        # Orbax logs each step of writing and reading the teacher's checkpoint at INFO.
        logging.set_verbosity(logging.WARNING)
    unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants {unknown} are not of {list(VARIANTS)}")
    device_kind = jax.devices()[0].device_kind
    base = FLAGS.config
    keys = [(model, variant) for model in FLAGS.models for variant in FLAGS.variants]
    facts, runners = {}, {}
    with tempfile.TemporaryDirectory(prefix="jaxcomp_teacher_") as teacher_workdir:
        teacher_flops = 0
        if "distill" in FLAGS.variants:
            teacher_config = variant_config(base, FLAGS.distill_teacher, "float32", "")
            teacher_flops = save_random_teacher(teacher_config, teacher_workdir)
        for model, variant in keys:
            config = variant_config(base, model, variant, teacher_workdir)
            facts[model, variant], runners[model, variant] = compile_step(config)
            print(
                f"{model} {variant}: compiled in {facts[model, variant]['compile_seconds']:.1f} s",
                flush=True,
            )
        for run in runners.values():
            for _ in range(FLAGS.warmup - 1):
                run()
        # `alternate` makes the last warm-up call itself.
        times = alternate(runners, FLAGS.steps)
    rows = []
    for model, variant in keys:
        forwards = TRAIN_STEP_FORWARDS * facts[model, variant]["forward_flops_per_image"]
        row = {
            "model": model,
            "variant": variant,
            **facts[model, variant],
            "train_step_flops_per_image": forwards + (teacher_flops if variant == "distill" else 0),
            "step_ms_each": [1000 * seconds for seconds in times[model, variant]],
        }
        dtype = "bfloat16" if variant == "bfloat16" else "float32"
        row = summarize(row, times[model, variant], dtype, device_kind)
        reference = times.get((model, "float32"))
        row["step_over_float32"] = (
            paired_ratio(times[model, variant], reference) if reference else None
        )
        rows.append(row)
    print(
        f"\nbackend={jax.default_backend()} device={device_kind} devices={jax.device_count()} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size} steps={FLAGS.steps} "
        f"warmup={FLAGS.warmup} distill_teacher={FLAGS.distill_teacher}"
    )
    print(format_table(rows))
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "backend": jax.default_backend(),
                "device_kind": device_kind,
                "devices": jax.device_count(),
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "steps": FLAGS.steps,
                "warmup": FLAGS.warmup,
                "distill_teacher": FLAGS.distill_teacher,
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)

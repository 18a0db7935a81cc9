r"""How close the detector's train step comes to the CPU's matmul speed, and how fast a run starts.

Run:
  python benchmarks/efficiency.py
  python benchmarks/efficiency.py --models=centernet_student --impls=shifted --repeats=3 \
      --nostartup

For each model and depthwise implementation it times the jitted train step (as
`jaxcomp.train` builds it: AdamW, donated state, sharded batch) and the jitted
inference forward pass, alternating every timed call with the others and with a
2048x2048 float32 matmul, so that load from other processes hits all of them
alike; medians are reported. FLOPs are counted analytically from the conv
shapes (`jaxcomp.flops.count_flops`: 2 per multiply-add of every kernel;
BatchNorm, activations and adds not counted) and cross-checked with XLA's
`cost_analysis()` of the lowered, not yet optimized, forward (which also counts
elementwise work, and for the 'shifted' implementation sees the depthwise convs
as elementwise multiply-adds). A train step is counted as 3x the forward FLOPs
(forward, plus input and weight gradients of the same size), the usual
estimate. Achieved GFLOP/s is divided by the matmul's GFLOP/s measured in the
same rounds: the share of the machine's dense-math speed the model reaches.

With --startup it also times the command line from launch to the end of its
first and of its fourth train step, with one persistent compilation cache: first
empty (cold), then populated by the first run (warm, --startup_warm_runs times,
median). The end of a step is when `metrics.jsonl` gets its line
(`--config.train.log_every=1`); the run is then stopped with SIGTERM.

Prints a markdown table and writes benchmarks/efficiency.json.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from common import NUM_CLASSES, alternate, median_ms, paired_ratio, seconds, synthetic_batch

from jaxcomp import flops, huge_pages, train
from jaxcomp.config import default_config, load_config_file
from jaxcomp.data import pipeline
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["centernet_student", "centernet_teacher"], "Model variants.")
flags.DEFINE_list("impls", ["shifted", "grouped"], "Depthwise implementations to compare.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 7, "Timed rounds (the median is reported).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square float32 matmul used as yardstick.")
flags.DEFINE_bool(
    "huge_pages",
    True,
    "Restart with glibc's huge pages for large allocations, as the command line does "
    "(jaxcomp/huge_pages.py); --nohuge_pages measures without them, here and in --startup.",
)
flags.DEFINE_bool("startup", True, "Also time command-to-first-step, cold and warm cache.")
flags.DEFINE_list("startup_configs", ["configs/student.py"], "Config files for --startup.")
flags.DEFINE_integer("startup_timeout", 900, "Seconds one command may take to its 4th step.")
flags.DEFINE_integer("startup_warm_runs", 3, "Warm-cache starts timed (the median is reported).")
flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(__file__), "efficiency.json"),
    "Where to write the JSON results.",
)

# The train step does the forward pass, then the input and the weight gradients,
# each about as costly as the forward.
TRAIN_STEP_FORWARDS = 3
# Startup is timed to the end of the first step and of this one: the data workers start
# in the background during the first, so the later steps show whether they were ready.
_TIMED_STEPS = 4
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forward_flops(model, image_size: int, batch_size: int) -> tuple[int, float]:
    """(analytic forward FLOPs from conv shapes, XLA's count for the lowered forward)."""
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), images
    )
    positions = flops.kernel_output_positions(model, variables, images, train=False)
    analytic = flops.count_flops(variables["params"], positions)["total"]
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return analytic, float(cost["flops"])


def step_runner(model_name: str, impl: str) -> tuple[dict, Callable, Callable]:
    """Compiles train step and forward; returns (facts, time one step, time one forward)."""
    config = default_config()
    model = create_model(model_name, num_classes=NUM_CLASSES, depthwise_impl=impl)
    optimizer = train.make_optimizer(config.optim, 1000)
    mesh = train.make_mesh()
    state = train.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    batch = train.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, train.TRAIN_FIELDS
    )
    start = time.perf_counter()
    step = train.jit_train_step(model, optimizer, dict(config.loss), mesh)
    step = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    forward = jax.jit(functools.partial(model.apply, train=False))
    # A copy: the train step donates (and so deletes) the state's buffers.
    variables = jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})
    forward = forward.lower(variables, batch["image"]).compile()
    analytic, xla = forward_flops(model, FLAGS.image_size, FLAGS.batch_size)
    facts = {
        "model": model_name,
        "impl": impl,
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
        "forward_flops": analytic,
        "forward_flops_xla": xla,
        "train_step_flops": TRAIN_STEP_FORWARDS * analytic,
        "compile_seconds": compile_seconds,
    }
    holder = [state]

    def run_step() -> float:
        start = time.perf_counter()
        holder[0], metrics = step(holder[0], batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    return facts, run_step, functools.partial(seconds, forward, variables, batch["image"])


def matmul_runner(size: int) -> Callable:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    return functools.partial(seconds, matmul, a, a)


def measure_steps() -> tuple[list[dict], float]:
    """Rows of step and forward timings, and the matmul's GFLOP/s, from alternated rounds."""
    facts, runners = [], {}
    for model_name in FLAGS.models:
        for impl in FLAGS.impls:
            row, run_step, run_forward = step_runner(model_name, impl)
            facts.append(row)
            runners[(model_name, impl, "step")] = run_step
            runners[(model_name, impl, "forward")] = run_forward
            print(f"compiled {model_name} {impl}: {row['compile_seconds']:.1f} s", flush=True)
    runners["matmul"] = matmul_runner(FLAGS.matmul_size)
    times = alternate(runners, FLAGS.repeats)
    matmul_gflops = 2 * FLAGS.matmul_size**3 / np.median(times["matmul"]) / 1e9
    for row in facts:
        key = (row["model"], row["impl"])
        step_times, forward_times = times[(*key, "step")], times[(*key, "forward")]
        row["step_ms"] = median_ms(step_times)
        row["forward_ms"] = median_ms(forward_times)
        row["step_gflops"] = row["train_step_flops"] / np.median(step_times) / 1e9
        row["forward_gflops"] = row["forward_flops"] / np.median(forward_times) / 1e9
        row["step_fraction_of_matmul"] = row["step_gflops"] / matmul_gflops
        row["forward_fraction_of_matmul"] = row["forward_gflops"] / matmul_gflops
        if ("grouped" in FLAGS.impls) and key[1] != "grouped":
            row["step_speedup_vs_grouped"] = paired_ratio(
                times[(key[0], "grouped", "step")], step_times
            )
    return facts, matmul_gflops


def _step_seconds(config_file: str, cache_dir: str, workdir: str) -> list[float]:
    """Seconds from launching the CLI to the end of each of its first `_TIMED_STEPS` steps.

    The end of a step is when `metrics.jsonl` gets its line for it.
    """
    command = [
        sys.executable,
        "-m",
        "jaxcomp.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
        f"--compilation_cache_dir={cache_dir}",
        f"--config.train.steps={_TIMED_STEPS + 2}",
        "--config.train.log_every=1",
        "--config.optim.warmup_steps=1",
    ]
    metrics = os.path.join(workdir, "metrics.jsonl")
    ends: list[float] = []
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=_REPO,
        env=_command_line_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while len(ends) < _TIMED_STEPS:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(command)} exited with {process.returncode} before step "
                    f"{_TIMED_STEPS}:\n{process.stderr.read()[-2000:]}"
                )
            if time.perf_counter() - start > FLAGS.startup_timeout:
                raise TimeoutError(
                    f"no step {_TIMED_STEPS} after {FLAGS.startup_timeout} s; raise "
                    "--startup_timeout"
                )
            lines = 0
            if os.path.exists(metrics):
                with open(metrics) as f:
                    lines = sum(1 for line in f if line.endswith("\n"))
            now = time.perf_counter() - start
            ends.extend([now] * (min(lines, _TIMED_STEPS) - len(ends)))
            time.sleep(0.02)
        return ends
    finally:
        # SIGTERM makes the loop save a checkpoint and exit; the workdir is thrown away.
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def _command_line_environment() -> dict[str, str]:
    """This environment without the huge-pages tunable, so that the command line's own
    restart for it is timed; with --nohuge_pages, with the tunable's opt-out."""
    return huge_pages.with_hugetlb(os.environ, None if FLAGS.huge_pages else "0")


def measure_startup(config_file: str) -> dict:
    """Command-to-step times with an empty, then a populated persistent compilation cache."""
    config = load_config_file(os.path.join(_REPO, config_file))
    # Build the dataset now if needed, so that neither run pays for it.
    pipeline.get_builder(config.data.name, config.data.data_dir)
    with tempfile.TemporaryDirectory(prefix="jaxcomp_startup_") as root:
        cache_dir = os.path.join(root, "cache")
        cold = _step_seconds(config_file, cache_dir, os.path.join(root, "cold"))
        entries = len(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else 0
        warm = [
            _step_seconds(config_file, cache_dir, os.path.join(root, f"warm{run}"))
            for run in range(FLAGS.startup_warm_runs)
        ]
    warm_first, warm_last = zip(*[(ends[0], ends[-1]) for ends in warm], strict=True)
    return {
        "config": config_file,
        "cold_seconds": cold[0],
        "cold_seconds_to_last_step": cold[-1],
        "warm_seconds": float(np.median(warm_first)),
        "warm_seconds_to_last_step": float(np.median(warm_last)),
        "warm_runs": len(warm),
        "timed_steps": _TIMED_STEPS,
        "cache_entries": entries,
    }


def format_table(rows: list[dict], matmul_gflops: float) -> str:
    lines = [
        "| model | depthwise | fwd GFLOP (analytic / XLA) | step ms | fwd ms | step GFLOP/s "
        "| step % of matmul | fwd GFLOP/s | fwd % of matmul | vs grouped | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = row.get("step_speedup_vs_grouped")
        lines.append(
            f"| {row['model']} | {row['impl']} | {row['forward_flops'] / 1e9:.2f} / "
            f"{row['forward_flops_xla'] / 1e9:.2f} | {row['step_ms']:.0f} "
            f"| {row['forward_ms']:.0f} | {row['step_gflops']:.1f} "
            f"| {100 * row['step_fraction_of_matmul']:.1f}% "
            f"| {row['forward_gflops']:.1f} | {100 * row['forward_fraction_of_matmul']:.1f}% "
            f"| {f'{speedup:.2f}x' if speedup else '-'} | {row['compile_seconds']:.1f} |"
        )
    lines.append(
        f"\nmatmul {FLAGS.matmul_size}x{FLAGS.matmul_size} f32: {matmul_gflops:.1f} GFLOP/s; "
        f"train step counted as {TRAIN_STEP_FORWARDS}x forward FLOPs"
    )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.huge_pages:
        huge_pages.restart_with_huge_pages()
    rows, matmul_gflops = measure_steps()
    print(
        f"\nbackend={jax.default_backend()} devices={jax.device_count()} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size} repeats={FLAGS.repeats} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print(format_table(rows, matmul_gflops))
    startup = []
    if FLAGS.startup:
        startup = [measure_startup(config_file) for config_file in FLAGS.startup_configs]
        print(
            f"\n| config | cold cache: step 1 s | step {_TIMED_STEPS} s | warm cache: step 1 s "
            f"| step {_TIMED_STEPS} s | cache entries |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for entry in startup:
            print(
                f"| {entry['config']} | {entry['cold_seconds']:.1f} | "
                f"{entry['cold_seconds_to_last_step']:.1f} | {entry['warm_seconds']:.1f} | "
                f"{entry['warm_seconds_to_last_step']:.1f} | {entry['cache_entries']} |"
            )
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "repeats": FLAGS.repeats,
                "matmul_gflops": matmul_gflops,
                "train_step_forwards": TRAIN_STEP_FORWARDS,
                "rows": rows,
                "startup": startup,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)

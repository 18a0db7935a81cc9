r"""How close the detector's train step comes to the CPU's matmul speed, and how fast a run starts.

Run:
  python benchmarks/efficiency.py
  python benchmarks/efficiency.py --models=centernet_student --impls=shifted --repeats=3 \
      --process_rounds=1 --nostartup

For each model and depthwise implementation a child process of its own times the
jitted train step (as `jaxcomp.train` builds it: AdamW, donated state, sharded
batch), the jitted inference forward pass and a 2048x2048 float32 matmul,
alternating every timed call with the others, so that load from other processes
hits all three alike; the children run one after another, --process_rounds times.
One model per process, as in training: alternating in one process with the
grouped-conv step slowed the shifted one by 1.3-1.5x, its kernel CPU time per step
doubling (student 112-135 ms alone, 166-188 ms with it, 3 pairs of processes).
FLOPs are counted analytically from the conv shapes (`jaxcomp.flops.count_flops`:
2 per multiply-add of every kernel; BatchNorm, activations and adds not counted)
and cross-checked with XLA's `cost_analysis()` of the lowered, not yet optimized,
forward (which also counts elementwise work, and for the 'shifted' implementation
sees the depthwise convs as elementwise multiply-adds). A train step is counted as
3x the forward FLOPs (forward, plus input and weight gradients of the same size),
the usual estimate. The share of the matmul's speed is taken round by round (the
step's GFLOP/s over the matmul's in the same round of the same process), and the
median over all rounds is reported; times are medians over all rounds. Page
faults and kernel CPU time per step show whether the huge pages took
(`jaxcomp/huge_pages.py`).

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
import resource
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
from common import (
    NUM_CLASSES,
    alternate,
    median_ms,
    run_json_child,
    seconds,
    synthetic_batch,
)

from jaxcomp import flops, huge_pages, training
from jaxcomp.config import default_config, load_config_file
from jaxcomp.data import pipeline
from jaxcomp.models import create_model

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["centernet_student", "centernet_teacher"], "Model variants.")
flags.DEFINE_list("impls", ["shifted", "grouped"], "Depthwise implementations to compare.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("image_size", 128, "Input side.")
flags.DEFINE_integer("repeats", 7, "Timed rounds per process (medians are reported).")
flags.DEFINE_integer(
    "process_rounds", 2, "Times each (model, implementation) gets a process of its own."
)
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
flags.DEFINE_string("child", None, "Internal: time MODEL:IMPL in this process, print JSON.")
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
    """Compiles train step and forward; returns (facts, time one step, time one forward).

    Timing a step also records its minor page faults and kernel CPU seconds in
    `facts['step_faults']` and `facts['step_kernel_seconds']`.
    """
    config = default_config()
    model = create_model(model_name, num_classes=NUM_CLASSES, depthwise_impl=impl)
    optimizer = training.make_optimizer(config.optim, 1000)
    mesh = training.make_mesh()
    state = training.init_state(model, optimizer, FLAGS.image_size, 0, mesh)
    batch = training.global_batch(
        synthetic_batch(FLAGS.batch_size, FLAGS.image_size), mesh, training.TRAIN_FIELDS
    )
    start = time.perf_counter()
    step = training.jit_train_step(model, optimizer, dict(config.loss), mesh)
    step = step.lower(state, batch, {}).compile()
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
        "temporaries_bytes": step.memory_analysis().temp_size_in_bytes,
        "step_faults": [],
        "step_kernel_seconds": [],
    }
    holder = [state]

    def run_step() -> float:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        holder[0], metrics = step(holder[0], batch, {})
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        facts["step_faults"].append(after.ru_minflt - before.ru_minflt)
        facts["step_kernel_seconds"].append(after.ru_stime - before.ru_stime)
        return elapsed

    return facts, run_step, functools.partial(seconds, forward, variables, batch["image"])


def matmul_runner(size: int) -> Callable:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    return functools.partial(seconds, matmul, a, a)


def time_in_this_process(model_name: str, impl: str) -> dict:
    """One model's step, forward and the matmul, alternated for `FLAGS.repeats` rounds."""
    facts, run_step, run_forward = step_runner(model_name, impl)
    times = alternate(
        {"step": run_step, "forward": run_forward, "matmul": matmul_runner(FLAGS.matmul_size)},
        FLAGS.repeats,
    )
    # The untimed first call of `alternate` is not a round.
    for key in ("step_faults", "step_kernel_seconds"):
        facts[key] = facts[key][1:]
    return {**facts, "times": times}


def summarize(runs: list[dict]) -> dict:
    """One row from the processes that timed the same model and implementation."""
    facts = {key: value for key, value in runs[0].items() if not isinstance(value, list | dict)}
    step, forward, matmul = (
        np.concatenate([run["times"][key] for run in runs]) for key in ("step", "forward", "matmul")
    )
    matmul_gflops = 2 * FLAGS.matmul_size**3 / matmul / 1e9
    step_gflops = facts["train_step_flops"] / step / 1e9
    forward_gflops = facts["forward_flops"] / forward / 1e9
    return {
        **facts,
        "processes": len(runs),
        "compile_seconds": float(np.median([run["compile_seconds"] for run in runs])),
        "step_ms": median_ms(step),
        "forward_ms": median_ms(forward),
        "matmul_gflops": float(np.median(matmul_gflops)),
        "step_gflops": float(np.median(step_gflops)),
        "forward_gflops": float(np.median(forward_gflops)),
        "step_fraction_of_matmul": float(np.median(step_gflops / matmul_gflops)),
        "forward_fraction_of_matmul": float(np.median(forward_gflops / matmul_gflops)),
        "step_faults": float(np.median(np.concatenate([run["step_faults"] for run in runs]))),
        "step_kernel_ms": 1000
        * float(np.median(np.concatenate([run["step_kernel_seconds"] for run in runs]))),
        "step_ms_per_process": [median_ms(run["times"]["step"]) for run in runs],
    }


def measure_steps() -> list[dict]:
    """Rows of step and forward timings, each (model, impl) timed in processes of its own."""
    keys = [(model_name, impl) for model_name in FLAGS.models for impl in FLAGS.impls]
    runs = {key: [] for key in keys}
    for process_round in range(FLAGS.process_rounds):
        for key in keys:
            # One process at a time: they would compete for the cores.
            runs[key].append(run_json_child(__file__, f"--child={key[0]}:{key[1]}"))
            step_ms = median_ms(runs[key][-1]["times"]["step"])
            print(
                f"round {process_round + 1}, {key[0]} {key[1]}: step {step_ms:.0f} ms", flush=True
            )
    rows = {key: summarize(key_runs) for key, key_runs in runs.items()}
    for (model_name, impl), row in rows.items():
        grouped = rows.get((model_name, "grouped"))
        if grouped and impl != "grouped":
            # Processes of the same round ran back to back: their ratio is a pair.
            row["step_speedup_vs_grouped"] = float(
                np.median(
                    np.array(grouped["step_ms_per_process"]) / np.array(row["step_ms_per_process"])
                )
            )
    return list(rows.values())


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
        "warm_seconds_each": list(warm_first),
        "warm_seconds_to_last_step": float(np.median(warm_last)),
        "warm_runs": len(warm),
        "timed_steps": _TIMED_STEPS,
        "cache_entries": entries,
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | depthwise | fwd GFLOP (analytic / XLA) | step ms | fwd ms | step GFLOP/s "
        "| matmul GFLOP/s | step % of matmul | fwd % of matmul | vs grouped | faults / step "
        "| kernel ms / step | temporaries MB | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = row.get("step_speedup_vs_grouped")
        lines.append(
            f"| {row['model']} | {row['impl']} | {row['forward_flops'] / 1e9:.2f} / "
            f"{row['forward_flops_xla'] / 1e9:.2f} | {row['step_ms']:.0f} "
            f"| {row['forward_ms']:.0f} | {row['step_gflops']:.1f} | {row['matmul_gflops']:.0f} "
            f"| {100 * row['step_fraction_of_matmul']:.1f}% "
            f"| {100 * row['forward_fraction_of_matmul']:.1f}% "
            f"| {f'{speedup:.2f}x' if speedup else '-'} | {row['step_faults']:.0f} "
            f"| {row['step_kernel_ms']:.0f} | {row['temporaries_bytes'] / 1e6:.0f} "
            f"| {row['compile_seconds']:.1f} |"
        )
    lines.append(
        f"\nmatmul {FLAGS.matmul_size}x{FLAGS.matmul_size} f32, timed in each model's process; "
        f"train step counted as {TRAIN_STEP_FORWARDS}x forward FLOPs; step times per process "
        + ", ".join(
            f"{row['model']} {row['impl']} "
            + "/".join(f"{ms:.0f}" for ms in row["step_ms_per_process"])
            for row in rows
        )
        + " ms"
    )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.huge_pages:
        huge_pages.restart_with_huge_pages()
    if FLAGS.child:
        model_name, impl = FLAGS.child.split(":")
        print(json.dumps(time_in_this_process(model_name, impl)))
        return
    rows = measure_steps()
    print(
        f"\nbackend={jax.default_backend()} devices={jax.device_count()} "
        f"batch={FLAGS.batch_size} image={FLAGS.image_size} repeats={FLAGS.repeats} "
        f"process_rounds={FLAGS.process_rounds} "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print(format_table(rows))
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
        for entry in startup:
            each = ", ".join(f"{seconds:.1f}" for seconds in entry["warm_seconds_each"])
            print(f"{entry['config']}, warm starts to step 1: {each} s")
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                "batch_size": FLAGS.batch_size,
                "image_size": FLAGS.image_size,
                "repeats": FLAGS.repeats,
                "process_rounds": FLAGS.process_rounds,
                "train_step_forwards": TRAIN_STEP_FORWARDS,
                "rows": rows,
                "startup": startup,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    app.run(main)

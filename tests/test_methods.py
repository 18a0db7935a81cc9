"""The method protocol: a user's method plugs in through the config, and the three methods
written on it (LSQ, movement pruning, distillation from several layers) train, resume
exactly and export."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxcomp import methods, paths, prune, quant, training, transforms
from jaxcomp.config import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_CHANNELS = (("heatmap/hidden", 8),)


def kernel_penalty(config, context):
    """A method defined here, not in jaxcomp: a learned-strength L2 penalty on kernels that
    counts its steps. It has state, a trainable parameter and a loss term."""
    del context
    strength = config.kernel_penalty.strength

    def init(variables, key):
        del variables, key
        return {"steps": jnp.zeros((), jnp.int32)}

    def init_params(variables, key):
        del variables, key
        return {"log_scale": jnp.zeros((), jnp.float32)}

    def loss(view, inputs):
        kernels = [
            leaf
            for name, leaf in zip(
                paths.leaf_names(inputs.params), jax.tree.leaves(inputs.params), strict=True
            )
            if name.endswith("kernel")
        ]
        penalty = sum(jnp.sum(kernel**2) for kernel in kernels)
        scale = jnp.exp(view.params["log_scale"])
        # The scale's own term pulls it towards 1/strength: something to learn.
        value = strength * scale * penalty + (scale * strength - 1.0) ** 2
        return value, {"kernel_penalty": penalty}

    def update(view, info):
        del info
        return {"steps": view.state["steps"] + 1}, view.params

    return transforms.Transform(init=init, init_params=init_params, loss=loss, update=update)


@pytest.fixture
def registered():
    methods.METHODS["kernel_penalty"] = kernel_penalty
    yield
    del methods.METHODS["kernel_penalty"]


def test_a_method_defined_outside_jaxcomp_trains_through_the_config(
    registered, tiny_config, tmp_path
):
    config = tiny_config
    config.methods = ("prune", "kernel_penalty")
    config.kernel_penalty = ml_collections.ConfigDict({"strength": 1e-3})
    config.prune.method = "unstructured"
    config.prune.sparsity = 0.5
    config.prune.end_step = 4
    config.prune.frequency = 2
    result = training.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and np.isfinite(result["train"]["kernel_penalty"])

    experiment = training.build_experiment(config)
    template = experiment.init_state(seed=1)
    assert float(template.method_params["kernel_penalty"]["log_scale"]) == 0.0
    with training.checkpoint_manager(str(tmp_path), config.train) as manager:
        state = jax.device_get(training.restore_latest(manager, template))
    # Its state and parameter came back from the checkpoint, next to the pruning masks.
    assert int(state.methods["kernel_penalty"]["steps"]) == 6
    assert float(state.method_params["kernel_penalty"]["log_scale"]) != 0.0
    masks = jax.tree.leaves(prune.masks_of(state.opt_state))
    assert not all(np.all(mask) for mask in masks)


def test_unregistered_method_is_refused_naming_the_registry(tiny_config):
    tiny_config.methods = ("prune", "kernel_penalty")
    with pytest.raises(ValueError, match="config.methods names 'kernel_penalty'.*METHODS"):
        validate_config(tiny_config, 1)


def test_methods_section_typos_are_still_refused(registered, tiny_config):
    tiny_config.methods = ("kernel_penalty",)
    tiny_config.kernel_penalty = ml_collections.ConfigDict({"strength": 1.0})
    validate_config(tiny_config, 1)
    tiny_config.kernal_penalty = ml_collections.ConfigDict({"strength": 1.0})
    with pytest.raises(ValueError, match="config.kernal_penalty is not a field"):
        validate_config(tiny_config, 1)


def test_lsq_fake_quant_values_and_gradients_follow_the_paper():
    x = jnp.array([-3.0, -0.26, 0.25, 0.74, 0.75, 9.0])
    step, zero_point, qmin, qmax = jnp.float32(0.5), 1.0, -4, 3

    def quantized(x, step):
        return quant.lsq.lsq_fake_quant(x, step, zero_point, qmin, qmax, gradient_scale=0.1)

    # clip(round(x / s) + z, qmin, qmax) - z, times s; round half to even (0.5 -> 0, 1.5 -> 2).
    codes = np.round(np.asarray(x) / 0.5) + 1.0
    np.testing.assert_array_equal(quantized(x, step), (np.clip(codes, qmin, qmax) - 1.0) * 0.5)
    inside = (codes >= qmin) & (codes <= qmax)
    dx = jax.grad(lambda x: quantized(x, step).sum())(x)
    np.testing.assert_array_equal(dx, inside.astype(np.float32))
    ds = jax.grad(lambda s: quantized(x, s).sum())(step)
    v = np.asarray(x) / 0.5
    per_element = np.where(
        codes < qmin, qmin - 1.0, np.where(codes > qmax, qmax - 1.0, np.round(v) - v)
    )
    np.testing.assert_allclose(ds, 0.1 * per_element.sum(), rtol=1e-6)


def test_movement_score_accumulates_minus_w_times_g():
    score = prune.SCORES["movement"]
    params = {"kernel": jnp.array([1.0, -2.0, 3.0])}
    grads = {"kernel": jnp.array([0.5, 0.5, -1.0])}
    scores = score.update(score.update(score.init(params), params, grads), params, grads)
    np.testing.assert_array_equal(scores["kernel"], [-1.0, 2.0, 6.0])


def _tiny_fields(data_dir: str) -> dict:
    return {
        "data.name": "jaxcomp_embedded/tiny",
        "data.data_dir": data_dir,
        "data.image_size": 64,
        "data.max_objects": 8,
        "data.num_workers": 0,
        "model.name": "centernet_tiny",
        "train.steps": 6,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "optim.warmup_steps": 2,
        "eval.batch_size": 16,
        "eval.top_k": 20,
    }


METHOD_FIELDS = {
    "lsq": {"quant.mode": "lsq"},
    "movement": {
        "prune.method": "unstructured",
        "prune.score": "movement",
        "prune.sparsity": 0.5,
        "prune.begin_step": 1,
        "prune.end_step": 4,
        "prune.frequency": 1,
    },
    "two_layer_distillation": {
        "distill.teacher_model": "centernet_tiny",
        "distill.teacher_channels": TEACHER_CHANNELS,
        "distill.feature_layers": (("heatmap/conv", 0.5), ("neck", 1.0)),
    },
}


@pytest.fixture(scope="module")
def teacher_workdir(tiny_data_dir, tmp_path_factory):
    config = _config({**_tiny_fields(tiny_data_dir), "model.channels": TEACHER_CHANNELS})
    workdir = tmp_path_factory.mktemp("teacher")
    state = training.build_experiment(config).init_state(seed=7)
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        training.save_checkpoint(manager, state)
    return str(workdir)


def _config(fields: dict):
    from jaxcomp.config import default_config

    config = default_config()
    config.update_from_flattened_dict(fields)
    return config


def _method_fields(method, data_dir, teacher_workdir):
    fields = {**_tiny_fields(data_dir), **METHOD_FIELDS[method]}
    if method == "two_layer_distillation":
        fields["distill.teacher"] = teacher_workdir
    return fields


def _final_state(config, workdir):
    template = training.build_experiment(config).init_state(seed=1)
    with training.checkpoint_manager(str(workdir), config.train) as manager:
        assert manager.latest_step() == config.train.steps
        return jax.device_get(training.restore_latest(manager, template))


# ~1 min each: a CLI run, then an interrupted and resumed run in-process.
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_FIELDS))
def test_method_trains_through_the_cli_resumes_exactly_and_exports(
    method, tiny_data_dir, teacher_workdir, tmp_path, compilation_cache
):
    fields = _method_fields(method, tiny_data_dir, teacher_workdir)
    command = [
        sys.executable,
        "-m",
        "jaxcomp.main",
        f"--config={REPO}/configs/student.py",
        f"--workdir={tmp_path / 'cli'}",
        f"--compilation_cache_dir={compilation_cache}",
        *(f"--config.{name}={value}" for name, value in fields.items()),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    config = _config(fields)
    cli = _final_state(config, tmp_path / "cli")
    with open(tmp_path / "cli" / "compression.json") as f:
        summary = json.load(f)

    stopped = training.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at=3)
    assert stopped["preempted"]
    training.train_and_evaluate(config, str(tmp_path / "resumed"))
    resumed = _final_state(config, tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(cli), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    if method == "lsq":
        assert "int8" in summary
        steps = jax.tree.leaves(resumed.method_params["quant"])
        assert steps and all(np.all(np.isfinite(leaf)) for leaf in steps)
        assert bool(resumed.methods["quant"]["initialized"])
        _check_lsq_onnx_export(str(tmp_path / "cli"), resumed, config, tmp_path)
    if method == "movement":
        scores = jax.tree.leaves(resumed.methods["prune"]["scores"])
        assert any(np.any(leaf != 0) for leaf in scores)
        assert summary["model"]["sparsity"] > 0.2
    if method == "two_layer_distillation":
        assert jax.tree.leaves(resumed.method_params["distill"]["heatmap"])
        metrics = [json.loads(line) for line in open(tmp_path / "cli" / "metrics.jsonl")]
        logged = [m for m in metrics if "distill_feature_neck" in m]
        assert logged and "distill_feature_heatmap_conv" in logged[-1]


def _check_lsq_onnx_export(workdir, state, config, tmp_path):
    """The int8 ONNX export of an LSQ run carries its learned steps and serves its codes."""
    from jaxcomp.export import check
    from jaxcomp.export.onnx import export_run

    exported = export_run(workdir, int8=True, raw_heads=True, output=str(tmp_path / "lsq.onnx"))
    tree = exported.run.int8_tree()
    layer = "size/out"
    entry = paths.lookup(tree["int8"], layer)
    learned = state.method_params["quant"]
    np.testing.assert_allclose(
        entry["input_scale"], np.exp(paths.lookup(learned["inputs"], layer)), rtol=1e-6
    )
    np.testing.assert_allclose(
        entry["kernel_scale"], np.exp(paths.lookup(learned["weights"], layer)), rtol=1e-6
    )
    images = check.eval_images(config, image_size=64, count=8)
    codes, _ = check.int8_reference(
        exported.run.model, tree, exported.run.quant_config, images, raw_heads=True
    )
    served, _ = check.run_with_codes(exported.proto, images, codes, optimize=False)
    differences = check.code_differences(served, codes)
    assert len(differences) == exported.int8_layers > 0
    assert max(differences.values()) <= 1, {k: v for k, v in differences.items() if v > 1}


def test_lsq_int8_export_serves_what_lsq_fake_quant_computes(tiny_data_dir):
    """The int8 tree carries the learned steps: the serving path matches LSQ's eval forward."""
    config = _config(_tiny_fields(tiny_data_dir))
    model = training.build_experiment(config).model
    quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    method = quant.lsq.lsq(model, 64, quant_config)
    images = jax.random.randint(jax.random.key(0), (4, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(1), images, train=False)
    state = method.init(variables, jax.random.key(2))
    params = method.init_params(variables, jax.random.key(3))
    # The first training forward observes each input's range; `update` keeps it.
    view = transforms.View(state, params, jnp.int32(0))
    _, collections = jax.jit(
        lambda v, x: method.apply(model.apply, view)(v, x, train=False, mutable=["batch_stats"])
    )(variables, images)
    info = transforms.StepInfo(variables["params"], variables["params"], {}, collections, {})
    state, params = method.update(view, info)
    assert bool(state["initialized"])
    eval_view = transforms.View(state, params, jnp.int32(1), training=False)
    fake_quant = jax.jit(lambda v, x: method.apply(model.apply, eval_view)(v, x, train=False))(
        variables, images
    )
    export = method.export(eval_view, transforms.ExportInputs(variables, None))["int8"]
    served = jax.jit(export.apply)(export.tree, images)
    # Integer codes agree; float sums in another order move a few inputs across a rounding
    # boundary (one step), and such flips propagate through the layers after them: on this
    # random model 1-5% of a head's values move by more than 1% of its range. A wrong
    # scale, zero point or kernel code would move most of them.
    for head in ("heatmap", "size", "offset"):
        expected, actual = np.asarray(fake_quant[head]), np.asarray(served[head])
        scale = np.abs(expected).max()
        assert scale > 1e-3, f"{head} is near zero: the check would mean nothing"
        close = np.abs(actual - expected) <= 1e-2 * scale
        assert close.mean() > 0.9, f"{head}: only {close.mean():.1%} of the values agree"
        assert np.abs(actual - expected).max() < 0.5 * scale, head

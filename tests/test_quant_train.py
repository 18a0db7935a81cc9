"""Int8 QAT and PTQ in the real training run, alone and composed with pruning."""

import functools
import itertools

import jax
import numpy as np
import pytest

from jaxcomp import methods, paths, prune, quant, training
from jaxcomp.config import default_config, validate_config
from jaxcomp.data import pipeline
from jaxcomp.models import create_model


def _observers(state):
    return state.methods["quant"][quant.QUANT_STATS]


def _restore(config, workdir, step=None):
    experiment = training.build_experiment(config)
    template = experiment.init_state(seed=1)
    manager = training.checkpoint_manager(str(workdir), config.train)
    step = manager.latest_step() if step is None else step
    return experiment, jax.device_get(training.restore_checkpoint(manager, step, template))


def test_pruned_qat_run_keeps_zeros_through_quantization_and_serves_int8(tiny_config, tmp_path):
    config = tiny_config
    config.prune.method = "unstructured"
    config.prune.sparsity = 0.5
    config.prune.schedule = "one_shot"
    config.quant.mode = "qat"
    config.quant.observer = "ema"
    config.quant.freeze_observers_step = 4
    config.quant.freeze_bn_step = 4
    result = training.train_and_evaluate(config, str(tmp_path))
    summary = result["compression"]
    assert set(summary) >= {"model", "int8"}
    # After 6 steps AP is ~0 on either path, so the two paths are compared on their
    # outputs instead (test_int8_serving_path_gives_the_outputs_and_detections_of_fake_quant).
    assert summary["int8"]["bytes_raw"] < summary["model"]["bytes_raw"] / 2

    experiment, final = _restore(config, tmp_path)
    _, at_4 = _restore(config, tmp_path, step=4)
    counts = {
        name: int(leaf)
        for name, leaf in zip(
            paths.leaf_names(_observers(final)), jax.tree.leaves(_observers(final)), strict=True
        )
        if name.endswith("count")
    }
    assert counts and set(counts.values()) == {4}, "observers must stop at step 4"
    # From step 4 on, observers and BatchNorm statistics are frozen; the weights still train.
    for frozen in (_observers, lambda state: state.batch_stats):
        for before, after in zip(
            jax.tree.leaves(frozen(at_4)),
            jax.tree.leaves(frozen(final)),
            strict=True,
        ):
            np.testing.assert_array_equal(before, after, err_msg=str(frozen))
    assert any(
        not np.array_equal(before, after)
        for before, after in zip(
            jax.tree.leaves(at_4.params), jax.tree.leaves(final.params), strict=True
        )
    )

    masks = prune.masks_of(final.opt_state)
    quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    quantized = quant.quantize_weights(final.params, final.batch_stats, quant_config)
    for name, mask, weight in zip(
        paths.leaf_names(final.params),
        jax.tree.leaves(masks),
        jax.tree.leaves(quantized),
        strict=True,
    ):
        mask = np.broadcast_to(np.asarray(mask), np.shape(weight))
        assert (np.asarray(weight)[~mask] == 0).all(), f"{name}: a pruned weight became non-zero"


def test_ptq_calibrates_without_changing_the_weights(
    tiny_config, tmp_path, save_initial_checkpoint
):
    save_initial_checkpoint(tiny_config, tmp_path / "float", seed=7)
    config = tiny_config
    config.init_from = str(tmp_path / "float")
    config.quant.mode = "ptq"
    config.train.steps = 3
    config.optim.warmup_steps = 0
    result = training.train_and_evaluate(config, str(tmp_path / "ptq"))
    assert "int8" in result["compression"]

    experiment, calibrated = _restore(config, tmp_path / "ptq")
    float_variables = training.restore_variables(str(tmp_path / "float"), experiment.variables)
    for expected, actual in zip(
        jax.tree.leaves(float_variables),
        jax.tree.leaves({"batch_stats": calibrated.batch_stats, "params": calibrated.params}),
        strict=True,
    ):
        np.testing.assert_array_equal(actual, expected)
    counts = {
        int(leaf)
        for name, leaf in zip(
            paths.leaf_names(_observers(calibrated)),
            jax.tree.leaves(_observers(calibrated)),
            strict=True,
        )
        if name.endswith("count")
    }
    assert counts == {3}


def _images(builder, split: str, batches: int) -> list[np.ndarray]:
    source = builder.as_data_source(split)
    num_classes = pipeline.num_classes(builder)
    batch_iterator = pipeline.eval_batches(
        source, image_size=64, batch_size=16, max_objects=8, num_classes=num_classes
    )
    return [batch["image"] for batch in itertools.islice(batch_iterator, batches)]


def _with_spread_heads(params: dict, key: jax.Array) -> dict:
    """The heads' output kernels re-drawn at the fan-in scale of the other layers.

    They start at normal(0.01) (CenterNet's init), so their outputs barely vary; the
    size head's bias is raised so that the decoded boxes have an extent.
    """
    params = jax.tree.map(np.asarray, params)
    for index, head in enumerate(("heatmap", "size", "offset")):
        kernel = params[head]["out"]["kernel"]
        scale = np.sqrt(2.0 / kernel.shape[-2])
        params[head]["out"]["kernel"] = scale * jax.random.normal(
            jax.random.fold_in(key, index), kernel.shape
        )
    params["size"]["out"]["bias"] = np.full_like(params["size"]["out"]["bias"], 4.0)
    return params


def _output_steps(int8_tree: dict, params: dict) -> dict[str, np.ndarray]:
    """What one quantization step of the last quantized layer is worth in each head's output.

    The size and offset outputs come from int8 layers: one step is input_scale *
    kernel_scale. The heatmap's output layer stays float, so one step of each of its
    (int8) hidden conv's channels, carried through the float output kernel.
    """
    layers = int8_tree["int8"]
    steps = {
        head: np.asarray(layers[head]["out"]["input_scale"] * layers[head]["out"]["kernel_scale"])
        for head in ("size", "offset")
    }
    hidden = layers["heatmap"]["conv"]
    hidden_step = np.asarray(hidden["input_scale"] * hidden["kernel_scale"]).reshape(-1)
    kernel = np.asarray(params["heatmap"]["out"]["kernel"])
    steps["heatmap"] = np.abs(kernel.reshape(len(hidden_step), -1)).T @ hidden_step
    return steps


def _share_found(detections: dict, other: dict, count: int) -> float:
    """The share of `detections`' best `count` per image that `other` also has anywhere in
    the image's list: the same class, a box within a pixel, a score within 0.01."""
    found = []
    for image in range(len(detections["boxes"])):
        for index in range(count):
            same_class = other["classes"][image] == detections["classes"][image, index]
            box_error = np.abs(other["boxes"][image] - detections["boxes"][image, index]).max(-1)
            score_error = np.abs(other["scores"][image] - detections["scores"][image, index])
            found.append(np.any(same_class & (box_error < 1.0) & (score_error < 0.01)))
    return float(np.mean(found))


def test_int8_serving_path_gives_the_outputs_and_detections_of_fake_quant(tiny_data_dir):
    builder = pipeline.get_builder("jaxcomp_embedded/tiny", data_dir=tiny_data_dir)
    model = create_model(
        "centernet_tiny", num_classes=pipeline.num_classes(builder), depthwise_impl="grouped"
    )
    images = _images(builder, "test", 1)[0]
    variables = jax.jit(model.init)(jax.random.key(0), images)
    variables = {**variables, "params": _with_spread_heads(variables["params"], jax.random.key(1))}
    config = default_config()
    config.quant.mode = "ptq"
    # The detector's rules, as training uses them.
    quant_config = quant.quant_config_of(config.quant, methods.default_quant_rules())
    quant_stats = quant.calibrate(
        model.apply, variables, _images(builder, "train", 2), quant_config, train=False
    )
    int8_tree = quant.convert_to_int8(
        variables["params"], variables["batch_stats"], quant_stats, quant_config
    )

    float_outputs = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    fake_quant = jax.jit(
        lambda v, x: quant.quantized_apply(
            model.apply, v, x, config=quant_config, mode="eval", train=False
        )
    )({**variables, "quant_stats": quant_stats}, images)
    served = jax.jit(
        lambda tree, x: quant.int8_apply(model, tree, x, config=quant_config, train=False)
    )(int8_tree, images)
    steps = _output_steps(int8_tree, variables["params"])
    for head, step in steps.items():
        expected, actual = np.asarray(fake_quant[head]), np.asarray(served[head])
        difference = np.abs(actual - expected)
        # Quantization is active: the float model is far from fake quant; int8 is not.
        assert difference.mean() < 1e-2 * np.abs(np.asarray(float_outputs[head]) - expected).mean()
        # Within one step, except where a tie in some earlier layer's rounding went the
        # other way (float32 sums vs exact int32 sums) and shifted what follows it.
        assert np.mean(difference <= step) > 0.99, head
        assert difference.max() < 0.1 * expected.std(), head

    state = training.TrainState(
        step=0,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=None,
        methods={"quant": {quant.QUANT_STATS: quant_stats}},
    )
    method = (("quant", quant.transform.ptq(model, 64, quant_config)),)
    fake_quant_step = jax.jit(
        functools.partial(training.eval_step, model=model, methods=method, top_k=20)
    )
    int8_step = jax.jit(
        functools.partial(
            training.steps.export_eval_step,
            apply=lambda tree, x: quant.int8_apply(
                model, tree, x, config=quant_config, train=False
            ),
            top_k=20,
        )
    )
    detected = jax.device_get(fake_quant_step(state, images))
    served_detections = jax.device_get(int8_step(int8_tree, images))
    # Most boxes have an extent (measured 88% over 4 px): not a comparison of empty boxes.
    extents = detected["boxes"][..., 2:] - detected["boxes"][..., :2]
    assert np.mean(extents > 4.0) > 0.75
    # The same detections, but where a rounding tie upstream moved a peak to a neighbouring
    # cell of a near-equal score (2 of the 160 here, in one image).
    assert _share_found(detected, served_detections, count=10) > 0.95
    assert _share_found(served_detections, detected, count=10) > 0.95


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("quant.mode", "int4", r"config.quant.mode='int4'; use one of"),
        ("quant.weight_bits", 9, r"config.quant.weight_bits must be an integer in \[2, 8\]"),
        ("quant.activation_bits", 1, r"activation_bits must be an integer in \[2, 8\], got 1"),
        ("quant.freeze_bn_step", 99, r"config.quant.freeze_bn_step=99 must be None or in"),
        ("quant.observer", "histogram", "config.quant.observer='histogram'"),
    ],
)
def test_bad_quant_configs_name_the_field(tiny_config, field, value, message):
    tiny_config.quant.mode = "qat"
    section, name = field.split(".")
    tiny_config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(tiny_config, 1)


def test_ptq_without_a_trained_model_is_refused(tiny_config):
    tiny_config.quant.mode = "ptq"
    with pytest.raises(ValueError, match="set config.init_from"):
        validate_config(tiny_config, 1)

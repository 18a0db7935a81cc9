"""ONNX export: float and int8 (QDQ) exports run in ONNX Runtime against jaxcomp; refusals."""

import functools
import json
import operator
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from conftest import tiny_config_for

from jaxcomp import quant, training
from jaxcomp.detection import decode_detections
from jaxcomp.export import check
from jaxcomp.export.onnx import export_run as export_run_to
from jaxcomp.export.onnx import float_onnx, int8_onnx
from jaxcomp.models import create_model


@pytest.fixture(scope="module")
def test_images(tiny_data_dir):
    """16 images of the tiny dataset's test split, letterboxed to 64x64."""
    return check.eval_images(tiny_config_for(tiny_data_dir), image_size=64, count=16)


@pytest.fixture(scope="module")
def qat_run(tiny_data_dir, test_images, tmp_path_factory):
    """A finished int8 QAT run of the tiny detector (6 steps) and 16 of its test images."""
    config = tiny_config_for(tiny_data_dir)
    config.quant.mode = "qat"
    workdir = str(tmp_path_factory.mktemp("qat_run"))
    training.train_and_evaluate(config, workdir)
    return workdir, test_images


def _float_forward(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def export_run(workdir, tmp_path, **kwargs):
    return export_run_to(workdir, output=str(tmp_path / "model.onnx"), **kwargs)


def test_float_export_matches_the_float_forward(qat_run, tmp_path):
    workdir, images = qat_run
    exported = export_run(workdir, tmp_path, raw_heads=True)
    assert exported.size_bytes == os.path.getsize(tmp_path / "model.onnx") > 0
    run = exported.run
    reference = _float_forward(run.model, run.variables, images)
    outputs = check.run_session(check.make_session(str(tmp_path / "model.onnx")), images)
    for head in ("heatmap", "size", "offset"):
        np.testing.assert_allclose(outputs[head], reference[head], rtol=1e-5, atol=1e-5)


def test_float_export_decodes_the_same_detections(qat_run, tmp_path):
    workdir, images = qat_run
    exported = export_run(workdir, tmp_path, top_k=20)
    run = exported.run
    reference = decode_detections(_float_forward(run.model, run.variables, images), k=20)
    outputs = check.run_session(check.make_session(exported.proto), images)
    assert outputs["classes"].dtype == np.int32
    np.testing.assert_array_equal(outputs["classes"], reference["classes"])
    np.testing.assert_allclose(outputs["scores"], reference["scores"], atol=1e-6)
    np.testing.assert_allclose(outputs["boxes"], reference["boxes"], atol=1e-3)


def _differing_fraction(served, codes):
    """The fraction of all int8 layers' input codes that differ from the reference."""
    differing = sum(int(np.count_nonzero(served[layer] != codes[layer])) for layer in codes)
    return differing / sum(layer_codes.size for layer_codes in codes.values())


def _step(tree, layer):
    """One quantization step of an int8 layer's output: input_scale * kernel_scale (smallest)."""
    entry = functools.reduce(operator.getitem, layer.split("/"), tree["int8"])
    return float(entry["input_scale"] * np.min(entry["kernel_scale"]))


@pytest.mark.parametrize("optimize", [False, True], ids=["as_specified", "integer_kernels"])
def test_int8_export_is_the_int8_serving_path_within_one_step_per_output(
    qat_run, tmp_path, optimize
):
    """Each int8 layer, fed jaxcomp's codes of its input, gives its codes to within one step.

    As specified (QDQ as float arithmetic) the export computes what quant.int8_apply does;
    ONNX Runtime's integer kernels (QLinearConv) requantize with an int32 bias and their
    own rounding, so a layer's codes may differ by one. Feeding every layer the reference
    codes keeps one layer's rounding from compounding through the next ones, as
    tests/test_quant_int8.py compares int8 layers with their fake-quant twins.
    """
    workdir, images = qat_run
    exported = export_run(workdir, tmp_path, int8=True, raw_heads=True)
    run = exported.run
    tree = run.int8_tree()
    codes, reference = check.int8_reference(
        run.model, tree, run.quant_config, images, raw_heads=True
    )
    served, outputs = check.run_with_codes(exported.proto, images, codes, optimize=optimize)
    differences = check.code_differences(served, codes)
    assert len(differences) == exported.int8_layers == 38
    assert max(differences.values()) <= 1, {k: v for k, v in differences.items() if v > 1}
    if not optimize:
        # Float32 rounding (of the convolution sums, and x / scale against jaxcomp's
        # x * (1 / scale)) flips a code only where a value lies a hair from a rounding edge.
        assert _differing_fraction(served, codes) < 1e-4
    # The heads' last layers run in float in both (size/out, offset/out are int8 layers
    # whose output no QuantizeLinear follows; heatmap/out is a float layer).
    last_int8 = {"heatmap": "heatmap/conv", "size": "size/out", "offset": "offset/out"}
    for head, layer in last_int8.items():
        difference = float(np.abs(outputs[head] - reference[head]).max())
        assert difference <= _step(tree, layer), f"{head}: {difference}"
    if optimize:
        fused = check.optimized_op_counts(exported.proto)["QLinearConv"]
        assert fused >= exported.int8_layers // 2, f"only {fused} int8 layers fused"


def test_int8_export_decodes_the_same_detections(qat_run, tmp_path):
    workdir, images = qat_run
    exported = export_run(workdir, tmp_path, int8=True, top_k=20)
    run = exported.run
    codes, reference = check.int8_reference(
        run.model, run.int8_tree(), run.quant_config, images, raw_heads=False, top_k=20
    )
    _, outputs = check.run_with_codes(exported.proto, images, codes, optimize=False)
    np.testing.assert_array_equal(outputs["classes"], reference["classes"])
    np.testing.assert_allclose(outputs["scores"], reference["scores"], atol=1e-6)
    np.testing.assert_allclose(outputs["boxes"], reference["boxes"], atol=1e-3)


def test_int8_graph_holds_qdq_with_per_channel_kernels(qat_run, tmp_path):
    workdir, _ = qat_run
    exported = export_run(workdir, tmp_path, int8=True)
    nodes = exported.proto.graph.node
    initializers = {tensor.name: tensor for tensor in exported.proto.graph.initializer}
    kernels = [
        node
        for node in nodes
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers
    ]
    activations = [node for node in nodes if node.op_type == "QuantizeLinear"]
    assert len(kernels) == len(activations) == exported.int8_layers == 38
    assert exported.float_layers == 2  # the first conv and the heatmap's last conv
    for node in kernels:
        codes, scales = (initializers[name] for name in node.input[:2])
        assert codes.data_type == onnx.TensorProto.INT8
        assert [a.i for a in node.attribute if a.name == "axis"] == [0]
        assert list(scales.dims) == [codes.dims[0]]  # one scale per output channel
    for node in activations:
        scale, zero_point = (initializers[name] for name in node.input[1:])
        assert list(scale.dims) == [] and zero_point.data_type == onnx.TensorProto.INT8


def test_int8_map_in_onnxruntime_is_within_0_2_ap_of_the_serving_path(qat_run, tmp_path):
    # The 6-step tiny model scores every cell ~0.1 (AP 0), so this checks the evaluation
    # path end to end, not accuracy; the decoded boxes are compared exactly above, and the
    # demo's int8 model (docs/deployment.md) is where the AP difference means something.
    workdir, _ = qat_run
    exported = export_run(workdir, tmp_path, int8=True)
    result = check.check_export(exported, num_images=8, with_map=True)
    ours, theirs = result["map"]["jaxcomp"], result["map"]["onnxruntime"]
    assert abs(theirs["AP"] - ours["AP"]) <= 0.002
    assert abs(theirs["AP50"] - ours["AP50"]) <= 0.002
    assert max(result["as_specified"]["code_difference"].values()) <= 1
    assert max(result["integer_kernels"]["code_difference"].values()) <= 1


# Trains a second run (a channel-pruned QAT run): the shrunk export itself is tested fast by
# test_channel_shrunk_model_with_pruned_zeros_exports, the shrink by tests/test_shrink.py.
@pytest.mark.slow
def test_channel_pruned_run_exports_shrunk_float_and_int8(tiny_data_dir, test_images, tmp_path):
    """A channel-pruned QAT run exports without its zero channels, in float and in int8."""
    config = tiny_config_for(tiny_data_dir)
    config.prune.method = "channel"
    config.prune.sparsity = 0.5
    config.prune.schedule = "one_shot"
    config.quant.mode = "qat"
    workdir = str(tmp_path / "run")
    training.train_and_evaluate(config, workdir)
    images = test_images[:8]
    exported = export_run(workdir, tmp_path, raw_heads=True)
    run = exported.run
    assert run.shrunk_widths and run.shrunk_widths["size/hidden"] == 8  # half of 16
    reference = _float_forward(run.model, run.variables, images)
    outputs = check.run_session(check.make_session(exported.proto), images)
    for head in ("heatmap", "size", "offset"):
        np.testing.assert_allclose(outputs[head], reference[head], rtol=1e-4, atol=1e-4)
    # The observers are per tensor, so they fit the shrunk layers as they are.
    exported = export_run(workdir, tmp_path, int8=True, raw_heads=True)
    run = exported.run
    codes, reference = check.int8_reference(
        run.model, run.int8_tree(), run.quant_config, images, raw_heads=True
    )
    served, outputs = check.run_with_codes(exported.proto, images, codes, optimize=False)
    assert max(check.code_differences(served, codes).values()) <= 1
    assert _differing_fraction(served, codes) < 1e-4
    for head in ("heatmap", "size", "offset"):
        np.testing.assert_allclose(outputs[head], reference[head], rtol=1e-4, atol=1e-4)


def _centernet_variables(model, image_size=64, seed=0):
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    return jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(seed))


def _random_batch_norm(variables, seed=1):
    """Running statistics and affine parameters away from identity, so the fold is exercised."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    values = []
    for index, (path, leaf) in enumerate(leaves):
        name = getattr(path[-1], "key", "")
        key = jax.random.key(seed + index)
        if "bn" in str(path) and name in ("mean", "bias"):
            leaf = jax.random.uniform(key, leaf.shape, minval=-0.3, maxval=0.3)
        elif "bn" in str(path) and name in ("var", "scale"):
            leaf = jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
        values.append(leaf)
    return jax.tree.unflatten(treedef, values)


def test_channel_shrunk_model_with_pruned_zeros_exports(test_images):
    images = test_images
    model = create_model(
        "centernet_tiny",
        num_classes=14,
        depthwise_impl="grouped",
        channels={"backbone/block_2/expand": 20, "size/hidden": 5, "heatmap/hidden": 7},
    )
    variables = _random_batch_norm(_centernet_variables(model))
    kernel = variables["params"]["backbone"]["block_3"]["expand"]["conv"]["kernel"]
    pruned = kernel * (jnp.abs(kernel) > jnp.median(jnp.abs(kernel)))
    variables["params"]["backbone"]["block_3"]["expand"]["conv"]["kernel"] = pruned
    proto = float_onnx(model, variables, image_size=64, raw_heads=True)
    reference = _float_forward(model, variables, images)
    outputs = check.run_session(check.make_session(proto), images)
    for head in ("heatmap", "size", "offset"):
        np.testing.assert_allclose(outputs[head], reference[head], rtol=1e-4, atol=1e-4)


def test_symmetric_activations_and_unfolded_batch_norm(test_images):
    """Symmetric int8 activations keep to [-127, 127] (QuantizeLinear alone would give -128),
    and BatchNorms left unfolded run in float after their int8 layer, as in jaxcomp."""
    images = test_images
    model = create_model("centernet_tiny", num_classes=14, depthwise_impl="grouped")
    variables = _random_batch_norm(_centernet_variables(model))
    config = quant.QuantConfig(activation_symmetric=True, fold_batch_norm=False)
    quant_stats = quant.calibrate(model.apply, variables, [images[:4]], config, train=False)
    # Halved ranges put many layer inputs beyond them, where the narrow range clips.
    quant_stats = jax.tree.map(
        lambda leaf: leaf / 2 if leaf.dtype == np.float32 else leaf, quant_stats
    )
    tree = quant.convert_to_int8(variables["params"], variables["batch_stats"], quant_stats, config)
    proto = int8_onnx(model, tree, config=config, image_size=64, raw_heads=True)
    codes, reference = check.int8_reference(model, tree, config, images, raw_heads=True)
    assert min(int(layer_codes.min()) for layer_codes in codes.values()) == -127
    served, outputs = check.run_with_codes(proto, images, codes, optimize=False)
    assert max(check.code_differences(served, codes).values()) <= 1
    assert _differing_fraction(served, codes) < 1e-4
    for head in ("heatmap", "size", "offset"):
        np.testing.assert_allclose(outputs[head], reference[head], rtol=1e-4, atol=1e-4)
    outputs_of = [node.output[0] for node in proto.graph.node]
    assert any(name.endswith("/input_clipped") for name in outputs_of)
    assert "backbone/block_1/expand/bn" in outputs_of  # the float BatchNorm's Add


# ---------------------------------------------------------------------------
# Refusals


def _copy_run(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def test_refuses_an_input_size_not_a_multiple_of_32(qat_run, tmp_path):
    workdir, _ = qat_run
    with pytest.raises(ValueError, match=r"multiple of 32.*got 100; use 96"):
        export_run(workdir, tmp_path, image_size=100)
    assert not (tmp_path / "model.onnx").exists()


def test_refuses_a_run_without_a_final_checkpoint(qat_run, tmp_path):
    workdir, _ = qat_run
    copy = _copy_run(workdir, tmp_path)
    shutil.rmtree(copy / "checkpoints" / "6")
    os.remove(copy / "eval.json")
    with pytest.raises(ValueError, match=r"did not finish: its newest checkpoint is step 4 of"):
        export_run(str(copy), tmp_path)


def test_refuses_a_run_without_eval_json(qat_run, tmp_path):
    workdir, _ = qat_run
    copy = _copy_run(workdir, tmp_path)
    os.remove(copy / "eval.json")
    with pytest.raises(ValueError, match=r"did not finish: it has no eval.json.*resume it"):
        export_run(str(copy), tmp_path)


def test_refuses_int8_for_a_run_without_quantization(qat_run, tmp_path):
    workdir, _ = qat_run
    copy = _copy_run(workdir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["quant"]["mode"] = "none"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no quantization.*without --int8, or quantize it"):
        export_run(str(copy), tmp_path, int8=True)


def test_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json.*--workdir"):
        export_run(str(tmp_path), tmp_path)


class _Doubling(nn.Module):
    """A detector-shaped model of a layer type the exporter has no emitter for."""

    @nn.compact
    def __call__(self, images, train=False):
        features = nn.Conv(3, (1, 1), name="conv")(images.astype(jnp.float32)) * 2
        return {"heatmap": features, "size": features[..., :2], "offset": features[..., :2]}


def test_refuses_a_layer_type_it_does_not_know():
    model = _Doubling()
    variables = _centernet_variables(model, image_size=32)
    with pytest.raises(ValueError, match=r"_Doubling, which the ONNX exporter does not know"):
        float_onnx(model, variables, image_size=32)


def test_command_line_exports(qat_run, tmp_path):
    workdir, _ = qat_run
    output = tmp_path / "cli.onnx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcomp.export",
            f"--workdir={workdir}",
            "--format=onnx",
            "--int8",
            f"--output={output}",
            "--nocheck",  # check_export is tested above
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert output.exists()
    assert f"{os.path.getsize(output):,} bytes" in result.stdout
    assert "38 int8 layers (QDQ), 2 float" in result.stdout

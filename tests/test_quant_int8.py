"""The int8 serving path: agreement with fake-quant, int8 x int8 -> int32 jaxpr, size, errors."""

import functools
import operator
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcomp import ops
from jaxcomp.models import centernet_teacher, centernet_tiny
from jaxcomp.paths import leaf_names
from jaxcomp.quant import int8, qat
from jaxcomp.quant.qat import QuantConfig

CONFIG = QuantConfig()
# The int8 path reads the depthwise geometry, not the implementation; 'grouped'
# compiles the float and fake-quant models faster than CPU's default 'shifted'.
DEPTHWISE_IMPL = "grouped"


def _perturb_batch_norm(variables, key):
    """Random BatchNorm parameters and statistics, so that folding is not the identity."""
    ranges = {"mean": (-0.2, 0.2), "var": (0.5, 2.0), "scale": (0.5, 1.5), "bias": (-0.2, 0.2)}
    paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = []
    for index, (path, leaf) in enumerate(paths):
        names = [getattr(entry, "key", None) for entry in path]
        if "bn" in names and names[-1] in ranges:
            low, high = ranges[names[-1]]
            leaf = jax.random.uniform(
                jax.random.fold_in(key, index), leaf.shape, minval=low, maxval=high
            )
        leaves.append(leaf)
    return jax.tree.unflatten(treedef, leaves)


@functools.cache
def _tiny(dtype: str = "float32"):
    """The tiny detector (computing in `dtype`), perturbed BatchNorms, observers, int8 tree."""
    model = centernet_tiny(num_classes=3, depthwise_impl=DEPTHWISE_IMPL, dtype=jnp.dtype(dtype))
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), maxval=255.0)
    variables = _perturb_batch_norm(
        jax.jit(model.init)(jax.random.key(1), images), jax.random.key(2)
    )
    batches = [jax.random.uniform(jax.random.key(i), (2, 64, 64, 3), maxval=255.0) for i in (3, 4)]
    quant_stats = qat.calibrate(model.apply, variables, batches, CONFIG, train=False)
    tree = int8.convert_to_int8(variables["params"], variables["batch_stats"], quant_stats, CONFIG)
    return model, variables, quant_stats, tree, images


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _capturing(fn, inputs=None):
    """Wraps `fn` to return instead each module's (call input, array output), by path.

    With `inputs`, the first argument of the modules named there is replaced first.
    """

    def run(*args):
        captured = {}

        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__" or not call_args:
                return next_fun(*call_args, **call_kwargs)
            path = "/".join(context.module.path)
            if inputs is not None and path in inputs:
                call_args = (inputs[path], *call_args[1:])
            out = next_fun(*call_args, **call_kwargs)
            if isinstance(out, jax.Array):
                captured[path] = (call_args[0], out)
            return out

        with nn.intercept_methods(interceptor):
            fn(*args)
        return captured

    return run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_layers_agree_with_fake_quant_within_one_step(dtype):
    # In bfloat16 the fake-quant layers convolve integer codes and sum them in float32.
    model, variables, quant_stats, tree, images = _tiny(dtype)
    layers = qat.quantized_layers(variables["params"], CONFIG)
    pairs = qat.conv_bn_pairs(variables["params"])
    # The module whose output is the layer's result: its BatchNorm when folded.
    output_of = {layer: pairs.get(f"{layer}/kernel", layer) for layer in layers}
    fake_quant = jax.jit(
        _capturing(
            lambda v, x: qat.quantized_apply(
                model.apply, v, x, config=CONFIG, mode="eval", train=False
            )
        )
    )({**variables, "quant_stats": quant_stats}, images)
    # Each int8 layer gets exactly the input its fake-quant twin got.
    layer_inputs = {layer: fake_quant[layer][0] for layer in layers}
    served = jax.jit(
        lambda t, x, inputs: _capturing(
            lambda t, x: int8.int8_apply(model, t, x, config=CONFIG, train=False), inputs
        )(t, x)
    )(tree, images, layer_inputs)

    kernels = [name for name in leaf_names(variables["params"]) if name.endswith("/kernel")]
    assert len(layers) == len(kernels) and len(pairs) > 0
    worst = 0.0
    for layer in layers:
        entry = functools.reduce(operator.getitem, layer.split("/"), tree["int8"])
        step = np.asarray(entry["input_scale"] * entry["kernel_scale"])
        expected = np.asarray(fake_quant[output_of[layer]][1])
        actual = np.asarray(served[output_of[layer]][1])
        assert actual.shape == expected.shape
        steps = np.abs(actual - expected) / step
        worst = max(worst, float(steps.max()))
        assert steps.max() <= 1.0, f"{layer}: off by {steps.max():.3f} steps"
    # Integer accumulation is exact; what is left is float32 rounding of the fake-quant
    # path's sums (up to ~1e4 steps, relative error ~1e-7 per add) and of the BN fold.
    assert worst < 0.25


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fake_quant_model_output_agrees_with_int8_serving_within_one_step(dtype):
    """End to end, each layer requantizing the previous one's output, as served."""
    model, variables, quant_stats, tree, images = _tiny(dtype)
    fake_quant = jax.jit(
        lambda v, x: qat.quantized_apply(model.apply, v, x, config=CONFIG, mode="eval", train=False)
    )({**variables, "quant_stats": quant_stats}, images)
    served = jax.jit(lambda t, x: int8.int8_apply(model, t, x, config=CONFIG, train=False))(
        tree, images
    )
    # The heads' last layers are quantized: their step is the outputs' step. Measured on
    # these inputs: float32 within 0.07 steps; bfloat16 (sums of codes, exact) equal.
    for head in ("heatmap", "size", "offset"):
        entry = tree["int8"][head]["out"]
        step = np.asarray(entry["input_scale"] * entry["kernel_scale"])
        assert fake_quant[head].dtype == served[head].dtype == jnp.float32
        off = np.abs(np.asarray(fake_quant[head]) - np.asarray(served[head])) / step
        assert off.max() <= 1.0, (head, off.max())


def _products(text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every convolution and dot in a StableHLO text."""
    pattern = (
        r"stablehlo\.(?:convolution|dot_general)\b.*: \(tensor<[^>]*x(\w+)>, "
        r"tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
    )
    return re.findall(pattern, text)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_int8_program_holds_int8_operands_and_int32_accumulation(tiny, platform):
    model, variables, _, tree, images = tiny
    exported = jax.export.export(
        jax.jit(lambda t, x: int8.int8_apply(model, t, x, config=CONFIG, train=False)),
        platforms=[platform],
    )(tree, images)
    text = exported.mlir_module()
    products = _products(text)
    params = variables["params"]
    layers = qat.quantized_layers(params, CONFIG)
    kernels = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
    depthwise = [name for name in layers if kernels[f"{name}/kernel"].shape[-2] == 1]
    assert depthwise, "the tiny model should have depthwise layers"
    assert products and set(products) == {("i8", "i8", "i32")}
    grouped = [int(n) > 1 for n in re.findall(r"feature_group_count = (\d+)", text)]
    if platform == "cpu":
        # Depthwise layers run as int32 multiply-adds of the int8 codes in CPU programs.
        assert len(products) == len(layers) - len(depthwise)
        assert not any(grouped)
        widened = re.findall(r"stablehlo\.convert .*xi8>\) -> tensor<[^>]*xi32>", text)
        assert len(widened) >= 2 * len(depthwise)
    else:
        assert len(products) == len(layers)
        assert sum(grouped) == len(depthwise)


@pytest.mark.parametrize("impl", ["auto", "cpu", "xla"])
@pytest.mark.parametrize(
    "kernel_shape, strides, groups",
    [
        ((3, 3, 1, 6), (1, 1), 6),
        ((3, 3, 1, 6), (2, 2), 6),
        ((1, 1, 6, 5), (1, 1), 1),
        ((3, 3, 6, 5), (2, 2), 1),
        ((1, 1, 6, 4), (2, 2), 1),
        ((3, 3, 1, 12), (1, 1), 6),
    ],
)
def test_int8_conv_routes_give_the_same_integers_as_xla_conv(kernel_shape, strides, groups, impl):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-128, 128, (2, 9, 8, 6)), jnp.int8)
    kernel = jnp.asarray(rng.integers(-128, 128, kernel_shape), jnp.int8)
    numbers = jax.lax.conv_dimension_numbers(q.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    expected = jax.lax.conv_general_dilated(
        q,
        kernel,
        strides,
        "VALID",
        dimension_numbers=numbers,
        feature_group_count=groups,
        preferred_element_type=jnp.int32,
    )
    actual = ops.integer_conv(
        q,
        kernel,
        window_strides=strides,
        rhs_dilation=(1, 1),
        feature_group_count=groups,
        dimension_numbers=numbers,
        impl=impl,
    )
    assert actual.dtype == jnp.int32
    np.testing.assert_array_equal(actual, expected)


def test_int8_tree_mismatch_is_a_clear_error(tiny):
    model, _, _, tree, images = tiny
    run = lambda t, m=model: jax.eval_shape(  # noqa: E731
        lambda t, x: int8.int8_apply(m, t, x, config=CONFIG, train=False), t, images
    )
    with pytest.raises(ValueError, match="does not match the model"):
        run(tree, centernet_tiny(num_classes=5))
    layers = dict(tree["int8"])
    del layers["heatmap"]
    with pytest.raises(ValueError, match="heatmap/depthwise is neither in the int8 tree"):
        run({"int8": layers, "float": tree["float"]})
    extra = {**tree["int8"], "extra": tree["int8"]["heatmap"]}
    with pytest.raises(ValueError, match="never called: \\['extra/conv', 'extra/depthwise'"):
        run({"int8": extra, "float": tree["float"]})
    with pytest.raises(ValueError, match="int8_tree must be the"):
        run({"params": tree["float"]["params"]})


def test_convert_needs_calibrated_observers(tiny):
    _, variables, quant_stats, _, _ = tiny
    with pytest.raises(ValueError, match="observer for backbone/block_0/depthwise/conv was never"):
        int8.convert_to_int8(variables["params"], variables["batch_stats"], {}, CONFIG)


def test_int8_checkpoint_is_about_four_times_smaller(tmp_path: pathlib.Path):
    # Teacher-shaped (2M weights), so that orbax's per-array metadata (~250 KB for
    # ~350 arrays) does not dominate as it does for the tiny and student models.
    model = centernet_teacher(num_classes=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: np.abs(rng.standard_normal(s.shape, np.float32)) + 0.5, shapes
    )
    observed = {"min": jnp.float32(-1.0), "max": jnp.float32(1.0), "count": jnp.int32(1)}
    quant_stats = {}
    for layer in qat.quantized_layers(variables["params"], CONFIG):
        node = quant_stats
        for key in layer.split("/"):
            node = node.setdefault(key, {})
        node["input"] = observed
    tree = int8.convert_to_int8(variables["params"], variables["batch_stats"], quant_stats, CONFIG)
    assert tree["float"] == {"params": {}, "batch_stats": {}}

    def saved_bytes(name, state):
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / name, state)
        checkpointer.wait_until_finished()
        return sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())

    float_bytes = saved_bytes("float", variables)
    int8_bytes = saved_bytes("int8", tree)
    assert float_bytes / int8_bytes > 3.0, (float_bytes, int8_bytes)
    assert 3.5 < int8.int8_size_bytes(variables) / int8.int8_size_bytes(tree) < 4.0

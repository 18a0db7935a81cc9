"""ONNX export of a trained detector: float, or int8 as a QDQ graph with the trained scales.

The graph is written with the `onnx` package's helper API by walking the
model's module calls, not by tracing its jaxpr. A jaxpr of the model on CPU
holds what XLA:CPU wants (nine shifted multiply-adds per depthwise layer, 1x1
convolutions as matmuls, NHWC), which would reach ONNX Runtime as hundreds of
slices instead of one `Conv`; and tracers know nothing of quantization, so no
`QuantizeLinear`/`DequantizeLinear` would come out. (jax2onnx, which converts
jaxprs, emits neither, and its current release needs orbax-checkpoint < 0.11.37,
below what jaxcomp requires.)

How it works: `jax.eval_shape` runs the model once under a
`flax.linen.intercept_methods` interceptor that records every module call (the
module with its attributes, its inputs' shapes, its output). Each module class
the detectors are built from has an emitter here that mirrors its `__call__` in
ONNX nodes (NCHW): `CenterNet`, `MobileNetV2`, `InvertedResidual`,
`TopDownNeck`, `Head`, `ConvBN`, `DepthwiseBN` and the leaf layers `nn.Conv`,
`DepthwiseConv3x3` and BatchNorm (folded into the convolution before it). A
module of another class, or a module call no emitter used, is refused by name.
The widths come from the recorded calls, so channel-shrunk models export as
they are; pruned zeros stay zeros in dense kernels. (The module is longer than
jaxcomp's usual 600 lines: the float and QDQ graphs are one walk over the recorded
calls with one emitter per module class, kept together.)

The int8 graph is jaxcomp's int8 serving path (`jaxcomp.quant.int8_apply`)
written as QDQ: the input of each quantized layer goes through
`QuantizeLinear -> DequantizeLinear` with its observer's per-tensor scale and
zero point, its BatchNorm-folded int8 kernel through `DequantizeLinear` with the
per-output-channel scales (axis 0 of the OIHW kernel), its folded bias stays
float. Layers the run kept float (by default the first conv and the heatmap's
last conv) are float `Conv`s. ONNX Runtime fuses `DequantizeLinear -> Conv ->
QuantizeLinear` into an integer convolution wherever a layer's output is the
next quantized layer's input (a ReLU6/ReLU in between folds into the
quantization's range); outputs that also feed a float add or the heads stay
float, as in jaxcomp.

`export_run` reads a finished run's workdir (its `config.json`, the final orbax
checkpoint, `eval.json`) and writes the file; `python -m jaxcomp.export` is its
command line.
"""

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from flax.linen.linear import canonicalize_padding
from jax import lax
from onnx import TensorProto, helper, numpy_helper

from jaxcomp import quant
from jaxcomp.export.run import FinishedRun, load_run, read_config, require_quantization
from jaxcomp.models import OUTPUT_STRIDE, CenterNet, MobileNetV2
from jaxcomp.models.centernet import HEADS, Head, TopDownNeck, normalize_images
from jaxcomp.models.layers import ConvBN, DepthwiseBN, DepthwiseConv3x3
from jaxcomp.models.mobilenet_v2 import InvertedResidual
from jaxcomp.quant.qat import bn_multiplier

# Opset 17 (onnx 1.12, 2022) is old enough for the runtimes in use and has all this graph
# needs: per-axis QuantizeLinear/DequantizeLinear (13), Clip with tensor bounds (11), TopK
# with a tensor k (10). Tested with onnxruntime 1.32.
OPSET = 17
FORMATS = ("onnx",)
IMAGE_INPUT = "images"
DETECTION_OUTPUTS = ("boxes", "scores", "classes")


# ---------------------------------------------------------------------------
# Recording the model's module calls


@dataclasses.dataclass(eq=False)
class _Call:
    """One module call: the module (with its attributes), input shapes, output, sub-calls."""

    module: nn.Module
    input_shapes: tuple[tuple[int, ...], ...]
    output: Any
    children: list["_Call"] = dataclasses.field(default_factory=list)

    @property
    def path(self) -> str:
        return "/".join(self.module.path)


def _record_calls(model: nn.Module, variables: Any, image_size: int) -> _Call:
    """The tree of module calls of `model.apply(variables, images, train=False)`, traced only."""
    stack: list[_Call] = []
    roots: list[_Call] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        # A subclass calling its parent's __call__ (jaxcomp's BatchNorm) is one call.
        if context.method_name != "__call__" or (stack and stack[-1].module is module):
            return next_fun(*args, **kwargs)
        shapes = tuple(tuple(arg.shape) for arg in args if hasattr(arg, "shape"))
        call = _Call(module, shapes, None)
        (stack[-1].children if stack else roots).append(call)
        stack.append(call)
        try:
            call.output = next_fun(*args, **kwargs)
        finally:
            stack.pop()
        return call.output

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return roots[0]


# ---------------------------------------------------------------------------
# The graph


class _Graph:
    """Nodes and initializers of one ONNX graph under construction, with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: dict[str, int] = {}

    def name(self, base: str) -> str:
        count = self._used.get(base, 0)
        self._used[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], base: str | Sequence[str], **attrs):
        """Adds a node; returns its output's name, or a tuple of names for several `base`s."""
        bases = [base] if isinstance(base, str) else list(base)
        names = [self.name(name) for name in bases]
        node_name = self.name(f"{bases[0]}/{op_type}")
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        return names[0] if isinstance(base, str) else tuple(names)


@dataclasses.dataclass(frozen=True)
class _Weights:
    """Where the layers' weights come from: float variables, or the int8 serving tree.

    Attributes:
      params: the float params (`int8_tree['float']['params']` for an int8 export).
      batch_stats: the BatchNorm statistics left float.
      int8_layers: {layer path: int8 entry} of `convert_to_int8`; empty for a float export.
      qrange: the activations' integer range (qmin, qmax), for an int8 export.
    """

    params: Mapping[str, Any]
    batch_stats: Mapping[str, Any]
    int8_layers: Mapping[str, Mapping[str, Any]]
    qrange: tuple[int, int] = (-128, 127)


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _int8_entries(tree: Any, prefix: str = "") -> dict[str, Mapping[str, Any]]:
    if isinstance(tree, Mapping) and "kernel_scale" in tree:
        return {prefix.rstrip("/"): tree}
    entries = {}
    for key, value in (tree or {}).items():
        entries.update(_int8_entries(value, f"{prefix}{key}/"))
    return entries


def _float(value: Any) -> np.ndarray:
    return np.asarray(value, np.float32)


def _oihw(kernel: np.ndarray) -> np.ndarray:
    """HWIO (Flax) -> OIHW (ONNX)."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _channel_shape(vector: np.ndarray) -> np.ndarray:
    return vector.reshape(1, -1, 1, 1)


class _Emitter:
    """Writes module calls as ONNX nodes; one emitter function per known module class."""

    def __init__(self, graph: _Graph, weights: _Weights):
        self.graph = graph
        self.weights = weights
        self.emitted: set[int] = set()
        self.symbols: dict[int, str] = {}
        self.int8_written: set[str] = set()

    def emit(self, call: _Call, *inputs: Any) -> Any:
        emitter = _EMITTERS.get(type(call.module))
        if emitter is None:
            raise ValueError(
                f"cannot export layer {call.path or '<root>'}: it is a "
                f"{type(call.module).__name__}, which the ONNX exporter does not know (it knows "
                f"{sorted(cls.__name__ for cls in _EMITTERS)}); build the model from these "
                "layers, or add an emitter for it in jaxcomp/export/onnx.py"
            )
        self.emitted.add(id(call))
        out = emitter(self, call, *inputs)
        if not isinstance(out, list | dict):
            self.symbols[id(call.output)] = out
        return out

    # -- convolutions ---------------------------------------------------------

    def conv(self, call: _Call, x: str, bn: _Call | None = None) -> str:
        """A conv layer (nn.Conv or a module with `conv_geometry`), its BatchNorm folded in."""
        self.emitted.add(id(call))
        if bn is not None:
            self.emitted.add(id(bn))
        path = call.path
        attrs = _conv_attributes(call)
        entry = self.weights.int8_layers.get(path)
        if entry is None:
            return self._float_conv(path, x, attrs, bn)
        self.int8_written.add(path)
        return self._int8_conv(path, x, attrs, entry, bn)

    def _float_conv(self, path: str, x: str, attrs: dict, bn: _Call | None) -> str:
        kernel = _lookup(self.weights.params, f"{path}/kernel")
        if kernel is None:
            raise ValueError(
                f"layer {path} has no kernel in the variables: they do not fit the model; "
                "export the variables of this model (its config.json's model and channels)"
            )
        kernel = _float(kernel)
        bias = _lookup(self.weights.params, f"{path}/bias")
        bias = np.zeros(kernel.shape[-1], np.float32) if bias is None else _float(bias)
        if bn is not None:
            multiplier, shift = self._bn_affine(bn)
            kernel, bias = kernel * multiplier, bias * multiplier + shift
        graph = self.graph
        inputs = [x, graph.constant(f"{path}/kernel", _oihw(kernel))]
        inputs.append(graph.constant(f"{path}/bias", bias))
        return graph.op("Conv", inputs, path, **attrs)

    def _int8_conv(self, path: str, x: str, attrs: dict, entry, bn: _Call | None) -> str:
        graph = self.graph
        kernel = np.asarray(entry["kernel"])
        if kernel.dtype != np.int8:
            raise ValueError(f"int8 layer {path} has a {kernel.dtype} kernel; expected int8")
        scale, zero_point = _float(entry["input_scale"]), int(entry["input_zero_point"])
        qmin, qmax = self.weights.qrange
        if (qmin, qmax) != (-128, 127):
            # QuantizeLinear saturates to int8's [-128, 127]; a narrower range (symmetric
            # activations, fewer bits) is clipped in float first, which gives the same codes.
            low = graph.constant(f"{path}/input_min", (qmin - zero_point) * scale)
            high = graph.constant(f"{path}/input_max", (qmax - zero_point) * scale)
            x = graph.op("Clip", [x, low, high], f"{path}/input_clipped")
        qparams = [
            graph.constant(f"{path}/input_scale", scale),
            graph.constant(f"{path}/input_zero_point", np.int8(zero_point)),
        ]
        codes = graph.op("QuantizeLinear", [x, *qparams], f"{path}/input_q")
        x = graph.op("DequantizeLinear", [codes, *qparams], f"{path}/input_dq")
        out_channels = kernel.shape[-1]
        weight = graph.op(
            "DequantizeLinear",
            [
                graph.constant(f"{path}/kernel_q", _oihw(kernel)),
                graph.constant(f"{path}/kernel_scale", _float(entry["kernel_scale"])),
                graph.constant(f"{path}/kernel_zero_point", np.zeros(out_channels, np.int8)),
            ],
            f"{path}/kernel_dq",
            axis=0,
        )
        bias = graph.constant(f"{path}/bias", _float(entry["bias"]))
        out = graph.op("Conv", [x, weight, bias], path, **attrs)
        if bn is not None and _lookup(self.weights.params, f"{bn.path}/scale") is not None:
            # Quantized without folding (QuantConfig.fold_batch_norm=False): the BatchNorm
            # runs in float after the int8 layer, as in jaxcomp.
            multiplier, shift = self._bn_affine(bn)
            out = graph.op(
                "Mul",
                [out, graph.constant(f"{bn.path}/multiplier", _channel_shape(multiplier))],
                f"{bn.path}/scaled",
            )
            shift_name = graph.constant(f"{bn.path}/shift", _channel_shape(shift))
            out = graph.op("Add", [out, shift_name], bn.path)
        return out

    def _bn_affine(self, bn: _Call) -> tuple[np.ndarray, np.ndarray]:
        """gamma / sqrt(var + eps) and beta - mean * that, as `quant.fold_batch_norm` computes."""
        if not isinstance(bn.module, nn.BatchNorm):
            raise ValueError(
                f"layer {bn.path} is a {type(bn.module).__name__} where the exporter expects a "
                "BatchNorm; add an emitter for it in jaxcomp/export/onnx.py"
            )
        path = bn.path
        found = {
            "scale": _lookup(self.weights.params, f"{path}/scale"),
            "bias": _lookup(self.weights.params, f"{path}/bias"),
            "mean": _lookup(self.weights.batch_stats, f"{path}/mean"),
            "var": _lookup(self.weights.batch_stats, f"{path}/var"),
        }
        missing = sorted(name for name, value in found.items() if value is None)
        if missing:
            raise ValueError(
                f"BatchNorm {path} has no {missing} in the variables; export the "
                "{'params', 'batch_stats'} of this model"
            )
        multiplier = bn_multiplier(found["scale"], found["var"], bn.module.epsilon)
        shift = found["bias"] - found["mean"] * multiplier
        return _float(multiplier), _float(shift)

    # -- element-wise -----------------------------------------------------------

    def relu6(self, x: str, base: str) -> str:
        graph = self.graph
        low = graph.constant(f"{base}/zero", np.float32(0.0))
        high = graph.constant(f"{base}/six", np.float32(6.0))
        return graph.op("Clip", [x, low, high], base)


def _conv_attributes(call: _Call) -> dict[str, Any]:
    """ONNX Conv attributes (NCHW) of a conv-like module, from its Flax geometry."""
    module, path = call.module, call.path
    in_features = call.input_shapes[0][-1]
    spatial = len(call.input_shapes[0]) - 2
    if hasattr(module, "conv_geometry"):
        geometry = dict(module.conv_geometry(in_features))
        kernel_size = (3,) * spatial if isinstance(module, DepthwiseConv3x3) else None
    elif isinstance(module, nn.Conv):
        if module.mask is not None or module.input_dilation not in (None, 1, (1,) * spatial):
            raise ValueError(
                f"cannot export layer {path}: masked or input-dilated convolutions have no "
                "ONNX Conv; fold the mask into the kernel first"
            )
        size = module.kernel_size
        kernel_size = tuple(size) if isinstance(size, Sequence) else (size,) * spatial
        strides = module.strides
        dilation = module.kernel_dilation
        geometry = {
            "window_strides": (strides,) * spatial if isinstance(strides, int) else strides,
            "padding": canonicalize_padding(module.padding, spatial),
            "rhs_dilation": (dilation,) * spatial if isinstance(dilation, int) else dilation,
            "feature_group_count": module.feature_group_count,
        }
    else:
        raise ValueError(
            f"cannot export layer {path}: a {type(module).__name__} is neither nn.Conv nor a "
            "module declaring conv_geometry(); add an emitter for it in jaxcomp/export/onnx.py"
        )
    strides = tuple(int(s) for s in (geometry["window_strides"] or (1,) * spatial))
    dilation = tuple(int(d) for d in (geometry.get("rhs_dilation") or (1,) * spatial))
    padding = geometry["padding"]
    if isinstance(padding, str):
        if kernel_size is None or padding not in ("SAME", "VALID"):
            raise ValueError(f"cannot export layer {path}: padding {padding!r} is not supported")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
        padding = lax.padtype_to_pads(call.input_shapes[0][1:-1], dilated, strides, padding)
    low, high = zip(*(tuple(pair) for pair in padding), strict=True)
    return {
        "strides": list(strides),
        "dilations": list(dilation),
        "pads": [int(p) for p in (*low, *high)],
        "group": int(geometry["feature_group_count"]),
    }


# ---------------------------------------------------------------------------
# One emitter per module class, each mirroring that class's __call__


def _children(call: _Call) -> dict[str, _Call]:
    return {child.module.name: child for child in call.children}


def _child(call: _Call, name: str) -> _Call:
    children = _children(call)
    if name not in children:
        raise ValueError(
            f"{type(call.module).__name__} {call.path or '<root>'} called no submodule {name!r} "
            f"(it called {sorted(children)}): the exporter's emitter no longer matches the model"
        )
    return children[name]


def _emit_conv_bn(emitter: _Emitter, call: _Call, x: str) -> str:
    out = emitter.conv(_child(call, "conv"), x, _child(call, "bn"))
    return emitter.relu6(out, f"{call.path}/relu6") if call.module.activation else out


def _emit_depthwise_bn(emitter: _Emitter, call: _Call, x: str) -> str:
    out = emitter.conv(_child(call, "conv"), x, _child(call, "bn"))
    return emitter.relu6(out, f"{call.path}/relu6")


def _emit_inverted_residual(emitter: _Emitter, call: _Call, x: str) -> str:
    module = call.module
    y = x
    if module.expansion != 1:
        y = emitter.emit(_child(call, "expand"), y)
    y = emitter.emit(_child(call, "depthwise"), y)
    y = emitter.emit(_child(call, "project"), y)
    residual = module.residual
    if residual is None:
        residual = module.stride == 1 and call.input_shapes[0][-1] == module.features
    if residual:
        y = emitter.graph.op("Add", [y, x], f"{call.path}/residual")
    return y


def _emit_mobilenet(emitter: _Emitter, call: _Call, x: str) -> list[str]:
    for child in call.children:
        x = emitter.emit(child, x)
    taps = []
    for index, feature in enumerate(call.output):
        name = emitter.symbols.get(id(feature))
        if name is None:
            raise ValueError(
                f"feature map {index} of {call.path} is no block's output: the exporter's "
                "MobileNetV2 emitter no longer matches the model"
            )
        taps.append(name)
    return taps


def _upsample2x(graph: _Graph, x: str, base: str) -> str:
    """Nearest-neighbour 2x, out[i] = in[floor(i / 2)], as `jnp.repeat` twice."""
    roi = graph.constant(f"{base}/roi", np.zeros(0, np.float32))
    scales = graph.constant(f"{base}/scales", np.array([1, 1, 2, 2], np.float32))
    return graph.op(
        "Resize",
        [x, roi, scales],
        base,
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )


def _emit_neck(emitter: _Emitter, call: _Call, feature_maps: list[str]) -> str:
    *finer, coarsest = feature_maps
    x = emitter.emit(_child(call, "lateral_3"), coarsest)
    for level in reversed(range(len(finer))):
        lateral = emitter.emit(_child(call, f"lateral_{level}"), finer[level])
        up = _upsample2x(emitter.graph, x, f"{call.path}/upsample_{level}")
        x = emitter.graph.op("Add", [up, lateral], f"{call.path}/merge_{level}")
        x = emitter.emit(_child(call, f"smooth_{level}_dw"), x)
        x = emitter.emit(_child(call, f"smooth_{level}_pw"), x)
    return x


def _emit_head(emitter: _Emitter, call: _Call, x: str) -> str:
    x = emitter.conv(_child(call, "depthwise"), x)
    x = emitter.conv(_child(call, "conv"), x)
    x = emitter.graph.op("Relu", [x], f"{call.path}/relu")
    return emitter.conv(_child(call, "out"), x)


def _emit_centernet(emitter: _Emitter, call: _Call, images: str) -> dict[str, str]:
    graph = emitter.graph
    x = graph.op("Cast", [images], "pixels", to=TensorProto.FLOAT)
    # normalize_images is per channel x * a + b; reading a and b from it keeps one source.
    zero, full = np.asarray(normalize_images(jnp.array([[0.0] * 3, [255.0] * 3])))
    gain = graph.constant("pixel_gain", ((full - zero) / 255.0).astype(np.float32))
    x = graph.op("Mul", [x, gain], "pixels_scaled")
    x = graph.op("Add", [x, graph.constant("pixel_offset", zero.astype(np.float32))], "normalized")
    x = graph.op("Transpose", [x], "normalized_nchw", perm=[0, 3, 1, 2])
    features = emitter.emit(_child(call, "backbone"), x)
    neck = emitter.emit(_child(call, "neck"), features)
    return {head: emitter.emit(_child(call, head), neck) for head in HEADS}


_EMITTERS: dict[type, Callable[..., Any]] = {
    CenterNet: _emit_centernet,
    MobileNetV2: _emit_mobilenet,
    InvertedResidual: _emit_inverted_residual,
    TopDownNeck: _emit_neck,
    Head: _emit_head,
    ConvBN: _emit_conv_bn,
    DepthwiseBN: _emit_depthwise_bn,
}


def _all_calls(call: _Call) -> list[_Call]:
    return [call, *(nested for child in call.children for nested in _all_calls(child))]


# ---------------------------------------------------------------------------
# Decode: heatmap peaks -> top-k boxes, as jaxcomp.detection.decode_detections


def _emit_decode(graph: _Graph, heads: Mapping[str, str], shape: tuple[int, int, int], k: int):
    """Nodes computing boxes [B, k, 4], scores [B, k], classes int32 [B, k] from NCHW heads."""
    num_classes, height, width = shape
    stride = OUTPUT_STRIDE
    heat = graph.op("Sigmoid", [heads["heatmap"]], "decode/heat")
    pooled = graph.op(
        "MaxPool", [heat], "decode/pooled", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]
    )
    is_peak = graph.op("Equal", [heat, pooled], "decode/is_peak")
    zero = graph.constant("decode/zero", np.float32(0.0))
    peaks = graph.op("Where", [is_peak, heat, zero], "decode/peaks")
    # Flat index over (y, x, class) in row-major order, as decode_detections ranks cells.
    peaks = graph.op("Transpose", [peaks], "decode/peaks_nhwc", perm=[0, 2, 3, 1])
    flat = graph.op(
        "Reshape", [peaks, graph.constant("decode/flat_shape", np.array([0, -1]))], "decode/flat"
    )
    scores, index = graph.op(
        "TopK", [flat, graph.constant("decode/k", np.array([k]))], ["scores", "decode/index"]
    )
    classes_constant = graph.constant("decode/num_classes", np.int64(num_classes))
    width_constant = graph.constant("decode/width", np.int64(width))
    pixel = graph.op("Div", [index, classes_constant], "decode/pixel")
    classes = graph.op("Mod", [index, classes_constant], "decode/classes_int64")
    classes = graph.op("Cast", [classes], "classes", to=TensorProto.INT32)
    last_axis = graph.constant("decode/last_axis", np.array([-1]))
    row = graph.op("Div", [pixel, width_constant], "decode/row")
    column = graph.op("Mod", [pixel, width_constant], "decode/column")
    cell = graph.op(
        "Concat",
        [
            graph.op("Unsqueeze", [row, last_axis], "decode/row_1"),
            graph.op("Unsqueeze", [column, last_axis], "decode/column_1"),
        ],
        "decode/cell_int64",
        axis=-1,
    )
    cell = graph.op("Cast", [cell], "decode/cell", to=TensorProto.FLOAT)
    pixel_1 = graph.op("Unsqueeze", [pixel, last_axis], "decode/pixel_1")
    pixel_2 = graph.op("Concat", [pixel_1, pixel_1], "decode/pixel_2", axis=-1)
    cells_shape = graph.constant("decode/cells_shape", np.array([0, -1, 2]))

    def gather(head: str) -> str:
        nhwc = graph.op("Transpose", [heads[head]], f"decode/{head}_nhwc", perm=[0, 2, 3, 1])
        cells = graph.op("Reshape", [nhwc, cells_shape], f"decode/{head}_cells")
        return graph.op("GatherElements", [cells, pixel_2], f"decode/{head}_at_peaks", axis=1)

    size = graph.op("Max", [gather("size"), zero], "decode/size")
    centre = graph.op("Add", [cell, gather("offset")], "decode/centre_cells")
    centre = graph.op(
        "Mul", [centre, graph.constant("decode/stride", np.float32(stride))], "decode/centre"
    )
    half = graph.op(
        "Mul", [size, graph.constant("decode/half_stride", np.float32(stride / 2))], "decode/half"
    )
    corners = graph.op(
        "Concat",
        [
            graph.op("Sub", [centre, half], "decode/top_left"),
            graph.op("Add", [centre, half], "decode/bottom_right"),
        ],
        "decode/corners",
        axis=-1,
    )
    image_height, image_width = height * stride, width * stride
    upper = np.array([image_height, image_width, image_height, image_width], np.float32)
    boxes = graph.op("Max", [corners, zero], "decode/corners_low")
    boxes = graph.op("Min", [boxes, graph.constant("decode/upper", upper)], "boxes")
    return {"boxes": boxes, "scores": scores, "classes": classes}


# ---------------------------------------------------------------------------
# Public API: model -> ModelProto


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < 32 or image_size % 32:
        nearest = max(32, round(image_size / 32) * 32)
        raise ValueError(
            f"image_size must be a positive multiple of 32 (the backbone's stride), got "
            f"{image_size}; use {nearest}"
        )


def _build(
    model: nn.Module,
    shapes_from: Any,
    weights: _Weights,
    *,
    image_size: int,
    raw_heads: bool,
    top_k: int,
    doc: str,
) -> onnx.ModelProto:
    root = _record_calls(model, shapes_from, image_size)
    if not isinstance(root.output, Mapping) or not set(HEADS) <= set(root.output):
        raise ValueError(
            f"cannot export a {type(model).__name__}: the exporter writes detectors whose "
            f"output is a dict with {HEADS}, as CenterNet's"
        )
    grid = image_size // OUTPUT_STRIDE
    head_shapes = {name: tuple(root.output[name].shape) for name in HEADS}
    num_classes = head_shapes["heatmap"][-1]
    if not raw_heads and not 0 < top_k <= grid * grid * num_classes:
        raise ValueError(
            f"top_k must be in [1, {grid * grid * num_classes}] (cells x classes at "
            f"{image_size}x{image_size}), got {top_k}; lower top_k (--top_k)"
        )
    graph = _Graph()
    emitter = _Emitter(graph, weights)
    heads = emitter.emit(root, IMAGE_INPUT)
    skipped = [call.path for call in _all_calls(root) if id(call) not in emitter.emitted]
    if skipped:
        raise ValueError(
            f"the model called layers the exporter did not write: {skipped[:5]}; the "
            "exporter's emitters no longer match the model (see jaxcomp/export/onnx.py)"
        )
    if raw_heads:
        outputs = {
            name: graph.op("Transpose", [heads[name]], name, perm=[0, 2, 3, 1]) for name in HEADS
        }
        specs = {
            name: (TensorProto.FLOAT, ["batch", grid, grid, head_shapes[name][-1]])
            for name in HEADS
        }
    else:
        outputs = _emit_decode(graph, heads, (num_classes, grid, grid), top_k)
        specs = dict(
            zip(
                DETECTION_OUTPUTS,
                [
                    (TensorProto.FLOAT, ["batch", top_k, 4]),
                    (TensorProto.FLOAT, ["batch", top_k]),
                    (TensorProto.INT32, ["batch", top_k]),
                ],
                strict=True,
            )
        )
    onnx_graph = helper.make_graph(
        graph.nodes,
        "jaxcomp_detector",
        [
            helper.make_tensor_value_info(
                IMAGE_INPUT, TensorProto.UINT8, ["batch", image_size, image_size, 3]
            )
        ],
        [
            helper.make_tensor_value_info(outputs[name], dtype, shape)
            for name, (dtype, shape) in specs.items()
        ],
        graph.initializers,
    )
    proto = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="jaxcomp",
        doc_string=doc,
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def float_onnx(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    image_size: int,
    raw_heads: bool = False,
    top_k: int = 100,
) -> onnx.ModelProto:
    """The float detector as an ONNX model, BatchNorm folded into the convolutions.

    Input `images`: uint8 [batch, image_size, image_size, 3] RGB, as the model takes.
    Outputs: `boxes` [batch, top_k, 4] pixel [ymin, xmin, ymax, xmax], `scores`
    [batch, top_k], `classes` int32 [batch, top_k] (`decode_detections`), or with
    `raw_heads` the NHWC heads `heatmap` (logits), `size` and `offset`.

    Args:
      model: a detector built by `jaxcomp.models.create_model` (any width, shrunk or not).
      variables: {'params': ..., 'batch_stats': ...} of the model (pruned zeros kept).
      image_size: the square input side, a multiple of 32.
      raw_heads: output the heads instead of decoded boxes.
      top_k: detections per image when decoding.

    Returns:
      The checked `onnx.ModelProto` (opset `OPSET`).

    Example:
      For a detector `model` and its `variables`:

          proto = float_onnx(model, variables, image_size=128)
          onnx.save(proto, "detector.onnx")
    """
    _check_image_size(image_size)
    weights = _Weights(variables["params"], variables.get("batch_stats", {}), {})
    return _build(
        model,
        variables,
        weights,
        image_size=image_size,
        raw_heads=raw_heads,
        top_k=top_k,
        doc="jaxcomp float detector",
    )


def int8_onnx(
    model: nn.Module,
    int8_tree: Mapping[str, Any],
    *,
    config: quant.QuantConfig,
    image_size: int,
    raw_heads: bool = False,
    top_k: int = 100,
) -> onnx.ModelProto:
    """The int8 serving path as a QDQ ONNX model with the trained scales.

    Each quantized layer's input goes through QuantizeLinear/DequantizeLinear
    (per-tensor int8 scale and zero point of its observer), its BN-folded int8
    kernel through DequantizeLinear (per output channel, axis 0); float layers
    stay float. Inputs and outputs as `float_onnx`.

    Args:
      model: the model the tree was converted from.
      int8_tree: the output of `jaxcomp.quant.convert_to_int8`.
      config: the `QuantConfig` of the conversion.
      image_size: the square input side, a multiple of 32.
      raw_heads: output the heads instead of decoded boxes.
      top_k: detections per image when decoding.

    Returns:
      The checked `onnx.ModelProto` (opset `OPSET`).

    Example:
      For a quantized detector (its params, BatchNorm statistics and observers):

          tree = quant.convert_to_int8(params, batch_stats, quant_stats, config)
          proto = int8_onnx(model, tree, config=config, image_size=128)
    """
    if not isinstance(int8_tree, Mapping) or set(int8_tree) != {"int8", "float"}:
        raise ValueError(
            "int8_tree must be the {'int8': ..., 'float': ...} dict convert_to_int8 returns"
        )
    _check_image_size(image_size)
    float_part = int8_tree["float"]
    weights = _Weights(
        float_part.get("params", {}),
        float_part.get("batch_stats", {}),
        _int8_entries(int8_tree["int8"]),
        quant.int_range(config.activation_bits, signed=True, narrow=config.activation_symmetric),
    )
    # Shapes for the trace: the float tree has no kernels for int8 layers, so the model's
    # own abstract variables stand in (the kernels' values are never read).
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8), train=False
        )
    )
    return _build(
        model,
        shapes,
        weights,
        image_size=image_size,
        raw_heads=raw_heads,
        top_k=top_k,
        doc="jaxcomp int8 detector (QDQ)",
    )


# ---------------------------------------------------------------------------
# A finished run -> .onnx file


@dataclasses.dataclass(frozen=True)
class Exported:
    """What `export_run` wrote.

    Attributes:
      path: the .onnx file.
      size_bytes: its size.
      int8: whether it is the int8 (QDQ) model.
      image_size: the input side.
      raw_heads: whether it outputs the heads rather than decoded boxes.
      top_k: detections per image (when decoding).
      int8_layers: layers written as QDQ (0 for a float export).
      float_layers: convolutions written in float.
      run: the run it was exported from.
      proto: the ONNX model.
    """

    path: str
    size_bytes: int
    int8: bool
    image_size: int
    raw_heads: bool
    top_k: int
    int8_layers: int
    float_layers: int
    run: FinishedRun
    proto: onnx.ModelProto


def default_output(workdir: str, *, int8: bool, raw_heads: bool) -> str:
    """`<workdir>/export/onnx/{float,int8}[_raw_heads].onnx`, next to the orbax exports."""
    name = ("int8" if int8 else "float") + ("_raw_heads" if raw_heads else "")
    return os.path.join(workdir, "export", "onnx", f"{name}.onnx")


def export_run(
    workdir: str,
    *,
    int8: bool = False,
    output: str | None = None,
    image_size: int | None = None,
    raw_heads: bool = False,
    top_k: int | None = None,
) -> Exported:
    """Exports the final model of the finished run in `workdir` to ONNX.

    The float export is the run's model (a channel-pruned run shrunk, other pruned
    runs with their zeros); the int8 export its int8 serving path as QDQ.

    Args:
      workdir: the workdir of a finished run (config.json, final checkpoint, eval.json).
      int8: export the int8 model (the run must have been quantized).
      output: the .onnx path; `default_output(workdir, ...)` when None.
      image_size: the input side; the run's `config.data.image_size` when None.
      raw_heads: output the heads (heatmap logits, size, offset) instead of boxes.
      top_k: detections per image; the run's `config.eval.top_k` when None.

    Returns:
      The `Exported` record.

    Raises:
      FileNotFoundError: `workdir` is not a run's workdir.
      ValueError: an input size that is not a multiple of 32, a run that did not
        finish, `int8` for a run without quantization, or a layer the exporter
        does not know.

    Example:
      After `make demo` (its finished int8 stage):

          exported = export_run("workdirs/demo/int8", int8=True)
          print(exported.path, exported.size_bytes)
    """
    config = read_config(workdir)
    size = int(config.data.image_size) if image_size is None else image_size
    _check_image_size(size)
    if int8:
        require_quantization(config, workdir)
    run = load_run(workdir)
    k = int(config.eval.top_k) if top_k is None else top_k
    if int8:
        tree = run.int8_tree()
        proto = int8_onnx(
            run.model, tree, config=run.quant_config, image_size=size, raw_heads=raw_heads, top_k=k
        )
    else:
        proto = float_onnx(run.model, run.variables, image_size=size, raw_heads=raw_heads, top_k=k)
    path = output or default_output(workdir, int8=int8, raw_heads=raw_heads)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(proto, path)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    dequantized = {
        node.output[0] for node in proto.graph.node if node.op_type == "DequantizeLinear"
    }
    int8_layers = sum(
        1 for node in proto.graph.node if node.op_type == "Conv" and node.input[1] in dequantized
    )
    return Exported(
        path=path,
        size_bytes=os.path.getsize(path),
        int8=int8,
        image_size=size,
        raw_heads=raw_heads,
        top_k=k,
        int8_layers=int8_layers,
        float_layers=ops["Conv"] - int8_layers,
        run=run,
        proto=proto,
    )

"""Checks of an exported ONNX detector in ONNX Runtime against jaxcomp's own forward passes.

From end to end to layer by layer:

* `run_session(make_session(model), images)`: ONNX Runtime as deployed (graph
  optimizations on) against `jaxcomp_predict` (jaxcomp's float forward or int8
  serving path), compared by `max_abs_differences` and `matched_detections`.
* `run_with_codes(model, images, codes, optimize=...)` with the codes of
  `int8_reference`: each int8 layer fed jaxcomp's codes of its input, so that one
  layer's rounding does not compound through the next; `code_differences` then
  compares each layer's codes. Run as the ONNX spec defines it (`optimize=False`,
  QDQ as float arithmetic), an int8 export is jaxcomp's int8 serving path to
  float32 rounding; with ONNX Runtime's integer kernels (QLinearConv, which
  quantize the bias to int32 and requantize with their own rounding) a layer's
  codes differ by at most one.
* `coco_metrics_of`: mAP on the eval split, for ONNX Runtime and for jaxcomp.
"""

import collections
import functools
import operator
import os
import tempfile
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from jaxcomp import evaluation, quant
from jaxcomp.data import pipeline
from jaxcomp.detection import decode_detections
from jaxcomp.export.onnx import IMAGE_INPUT, Exported
from jaxcomp.export.run import FinishedRun
from jaxcomp.models import OUTPUT_STRIDE
from jaxcomp.paths import leaf_names

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


def make_session(
    model: onnx.ModelProto | str, *, optimize: bool = True, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session.

    Args:
      model: the ModelProto or a path to the .onnx file.
      optimize: ONNX Runtime's graph optimizations (QDQ fusion into integer kernels
        included); False runs the graph node by node as the ONNX spec defines it.
      threads: intra-op threads; None lets ONNX Runtime choose (one per physical core).

    Returns:
      The session.
    """
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, images: np.ndarray) -> dict[str, np.ndarray]:
    """The session's outputs by name for a batch of uint8 NHWC images."""
    return run_session_feeds(session, {IMAGE_INPUT: np.asarray(images)})


def optimized_op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Node types of the graph ONNX Runtime runs after its optimizations (CPU, this machine).

    `QLinearConv` counts the int8 layers it fused into integer convolutions.
    """
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "optimized.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = path
        # Writing the optimized model warns that it is tuned to this machine; it is only read.
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    return collections.Counter(node.op_type for node in optimized.graph.node)


def jaxcomp_predict(run: FinishedRun, *, int8: bool, raw_heads: bool, top_k: int) -> Predict:
    """jaxcomp's jitted float forward, or its int8 serving path, like the export's outputs."""
    model = run.model
    if int8:
        weights, config = run.int8_tree(), run.quant_config

        def forward(weights, images):
            return quant.int8_apply(model, weights, images, config=config, train=False)

    else:
        weights = run.variables

        def forward(weights, images):
            return model.apply(weights, images, train=False)

    def predict(weights, images):
        outputs = forward(weights, images)
        return outputs if raw_heads else decode_detections(outputs, k=top_k, stride=OUTPUT_STRIDE)

    jitted = jax.jit(predict)
    return lambda images: jax.tree.map(np.asarray, jitted(weights, images))


def max_abs_differences(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Largest |output - reference| of the heads, or of the (sorted) top-k scores.

    Boxes and classes are compared by `matched_detections` instead: near-tied
    scores may come out in another order, which moves them along the k axis.
    """
    names = ["scores"] if "scores" in reference else sorted(reference)
    return {
        name: float(np.abs(np.asarray(outputs[name], np.float64) - reference[name]).max())
        for name in names
    }


def matched_detections(
    outputs: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    min_score: float = 0.1,
    box_tolerance: float = 1.0,
    score_tolerance: float = 0.02,
) -> tuple[int, int]:
    """How many of the reference's detections (score >= min_score) the outputs also have.

    A reference detection is matched by one of the same image and class whose box
    corners are within `box_tolerance` pixels and whose score is within
    `score_tolerance`; the order of near-tied scores does not matter.

    Returns:
      (matched, total).
    """
    matched = total = 0
    for image in range(len(reference["scores"])):
        keep = reference["scores"][image] >= min_score
        for box, score, label in zip(
            reference["boxes"][image][keep],
            reference["scores"][image][keep],
            reference["classes"][image][keep],
            strict=True,
        ):
            total += 1
            same = (
                (outputs["classes"][image] == label)
                & (np.abs(outputs["boxes"][image] - box).max(axis=-1) <= box_tolerance)
                & (np.abs(outputs["scores"][image] - score) <= score_tolerance)
            )
            matched += bool(same.any())
    return matched, total


def int8_reference(
    model: nn.Module,
    tree: Mapping,
    config: quant.QuantConfig,
    images: np.ndarray,
    *,
    raw_heads: bool,
    top_k: int = 100,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """jaxcomp's int8 serving path on `images`: each int8 layer's input codes, and the outputs.

    Args:
      model: the detector.
      tree: its int8 serving tree (`quant.convert_to_int8`).
      config: the `QuantConfig` of the conversion.
      images: uint8 NHWC images.
      raw_heads: return the heads rather than decoded detections.
      top_k: detections per image when decoding.

    Returns:
      ({layer path: int8 codes, NCHW as the export's QuantizeLinear outputs}, the outputs
      as the export gives them: heads (NHWC) or decoded boxes, scores, classes).
    """
    layers = {
        name.removesuffix("/kernel_scale"): leaf
        for name, leaf in zip(leaf_names(tree["int8"]), jax.tree.leaves(tree["int8"]), strict=True)
        if name.endswith("/kernel_scale")
    }
    qmin, qmax = quant.int_range(
        config.activation_bits, signed=True, narrow=config.activation_symmetric
    )

    def forward(tree, images):
        codes = {}

        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name == "__call__" and path in layers and path not in codes:
                entry = functools.reduce(operator.getitem, path.split("/"), tree["int8"])
                codes[path] = quant.quantize(
                    args[0],
                    entry["input_scale"],
                    entry["input_zero_point"],
                    qmin,
                    qmax,
                    dtype=jnp.int8,
                ).transpose(0, 3, 1, 2)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            outputs = quant.int8_apply(model, tree, images, config=config, train=False)
        if not raw_heads:
            outputs = decode_detections(outputs, k=top_k, stride=OUTPUT_STRIDE)
        return codes, outputs

    codes, outputs = jax.jit(forward)(tree, images)
    return jax.tree.map(np.asarray, codes), jax.tree.map(np.asarray, outputs)


def _input_codes_name(layer: str) -> str:
    return f"{layer}/input_q"


def run_with_codes(
    model: onnx.ModelProto, images: np.ndarray, codes: Mapping[str, np.ndarray], *, optimize: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Runs an int8 export with every int8 layer fed the given codes of its input.

    Each layer's `DequantizeLinear` reads `codes[layer]` from a graph input instead
    of the preceding `QuantizeLinear`, whose own codes become graph outputs: a
    layer's codes then depend on the layers before it only through the fed
    codes, so differences do not compound from layer to layer. With `optimize`,
    ONNX Runtime still fuses `DequantizeLinear -> Conv -> QuantizeLinear` into
    integer kernels (a graph input is as good as a QuantizeLinear output to it).

    Args:
      model: an int8 (QDQ) export.
      images: uint8 NHWC images.
      codes: {layer path: int8 NCHW codes of its input}, from `int8_reference`.
      optimize: ONNX Runtime's optimizations (integer kernels) or the graph as specified.

    Returns:
      ({layer path: the codes the export computes for its input}, the export's outputs).
    """
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    graph = fed.graph
    names = {_input_codes_name(layer): layer for layer in codes}
    produced = {node.output[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    if set(names) != produced:
        raise ValueError(
            f"the export's quantized inputs {sorted(produced)[:3]}... do not match the int8 "
            f"tree's layers {sorted(names)[:3]}...: compare an export with its own run"
        )
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in names:
            node.input[0] = f"{node.input[0]}__fed"
    for name in names:
        graph.input.append(helper.make_tensor_value_info(f"{name}__fed", TensorProto.INT8, None))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT8, None))
    session = make_session(fed, optimize=optimize)
    feeds = {IMAGE_INPUT: images, **{f"{name}__fed": codes[layer] for name, layer in names.items()}}
    results = run_session_feeds(session, feeds)
    served = {layer: results.pop(name) for name, layer in names.items()}
    return served, results


def run_session_feeds(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict:
    """The session's outputs by name for the given inputs."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def code_differences(
    codes: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Largest |code - reference code| of each layer's input."""
    return {
        layer: int(np.abs(codes[layer].astype(np.int32) - reference[layer]).max())
        for layer in reference
    }


def coco_metrics_of(
    predict: Predict,
    config: ml_collections.ConfigDict,
    *,
    image_size: int,
    batch_size: int | None = None,
) -> dict[str, float]:
    """COCO metrics of `predict` (images -> boxes, scores, classes) on the config's eval split.

    Args:
      predict: a decoding predictor (an ONNX Runtime session wrapped, or `jaxcomp_predict`).
      config: the run's config (dataset, eval split, max objects).
      image_size: the side the images are letterboxed to (the export's input size).
      batch_size: images per call; `config.eval.batch_size` by default.

    Returns:
      `jaxcomp.evaluation.coco_metrics`' dict (AP, AP50, ...).
    """
    builder = pipeline.get_builder(config.data.name, config.data.data_dir)
    batches = pipeline.eval_batches(
        builder.as_data_source(config.data.eval_split),
        image_size=image_size,
        batch_size=batch_size or config.eval.batch_size,
        max_objects=config.data.max_objects,
        num_classes=pipeline.num_classes(builder),
        stride=OUTPUT_STRIDE,
    )
    collected: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        detections = predict(batch["image"])
        for name in ("boxes", "labels", "box_mask", "image_id", "valid"):
            collected[name].append(batch[name])
        for name in ("boxes", "scores", "classes"):
            collected[f"det_{name}"].append(np.asarray(detections[name]))
    arrays = {name: np.concatenate(values) for name, values in collected.items()}
    return evaluation.coco_metrics(
        gt_boxes=arrays["boxes"],
        gt_labels=arrays["labels"],
        gt_mask=arrays["box_mask"],
        det_boxes=arrays["det_boxes"],
        det_scores=arrays["det_scores"],
        det_classes=arrays["det_classes"],
        image_ids=arrays["image_id"],
        valid=arrays["valid"],
        class_names=pipeline.class_names(builder),
    )


def eval_images(config: ml_collections.ConfigDict, *, image_size: int, count: int) -> np.ndarray:
    """The first `count` images of the config's eval split, letterboxed to `image_size`."""
    builder = pipeline.get_builder(config.data.name, config.data.data_dir)
    batch = next(
        pipeline.eval_batches(
            builder.as_data_source(config.data.eval_split),
            image_size=image_size,
            batch_size=count,
            max_objects=config.data.max_objects,
            num_classes=pipeline.num_classes(builder),
            stride=OUTPUT_STRIDE,
        )
    )
    return batch["image"][batch["valid"]]


def _compare(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, object]:
    result: dict[str, object] = {"max_abs": max_abs_differences(outputs, reference)}
    if "scores" in reference:
        result["matched"] = matched_detections(outputs, reference)
    return result


def check_export(exported: Exported, *, num_images: int = 32, with_map: bool = False) -> dict:
    """Runs an export in ONNX Runtime on real images and compares it with jaxcomp.

    The reference is jaxcomp's jitted float forward for a float export, its int8
    serving path (`quant.int8_apply`) for an int8 one, decoded like the export.

    Args:
      exported: what `export_run` returned.
      num_images: images of the run's eval split to compare on.
      with_map: also evaluate both on the whole eval split (COCO mAP).

    Returns:
      {'images': count,
       'end_to_end': ONNX Runtime as deployed (optimized) vs jaxcomp,
       'as_specified': the graph run node by node, as the ONNX spec defines it,
       'integer_kernels' (int8 only): optimized, with ONNX Runtime's fused integer kernels,
       'fused_layers' (int8 only): int8 layers ONNX Runtime runs as QLinearConv,
       'map' (with_map and decoded outputs only): {'jaxcomp', 'onnxruntime'} COCO metrics}.
      Each comparison has 'max_abs' (`max_abs_differences`), 'matched' (decoded outputs:
      `matched_detections`) and, for an int8 export, 'code_difference': per layer the
      largest difference of its input codes when every layer is fed jaxcomp's codes of
      its input (`run_with_codes`).
    """
    run, proto = exported.run, exported.proto
    images = eval_images(run.config, image_size=exported.image_size, count=num_images)
    predict = jaxcomp_predict(
        run, int8=exported.int8, raw_heads=exported.raw_heads, top_k=exported.top_k
    )
    reference = predict(images)
    session = make_session(proto)
    result: dict = {
        "images": len(images),
        "end_to_end": _compare(run_session(session, images), reference),
    }
    if exported.int8:
        codes, _ = int8_reference(
            run.model,
            run.int8_tree(),
            run.quant_config,
            images,
            raw_heads=exported.raw_heads,
            top_k=exported.top_k,
        )
        for key, optimize in (("as_specified", False), ("integer_kernels", True)):
            served, outputs = run_with_codes(proto, images, codes, optimize=optimize)
            result[key] = {
                "code_difference": code_differences(served, codes),
                **_compare(outputs, reference),
            }
        result["fused_layers"] = optimized_op_counts(proto)["QLinearConv"]
    else:
        outputs = run_session(make_session(proto, optimize=False), images)
        result["as_specified"] = _compare(outputs, reference)
    if with_map and not exported.raw_heads:
        size = exported.image_size
        result["map"] = {
            "jaxcomp": coco_metrics_of(predict, run.config, image_size=size),
            "onnxruntime": coco_metrics_of(
                lambda batch: run_session(session, batch), run.config, image_size=size
            ),
        }
    return result

r"""Command line: export a finished run's detector to ONNX, and check it in ONNX Runtime.

Example:
  python -m jaxcomp.export --workdir=workdirs/demo/int8 --format=onnx --int8 --check_map

Writes `<workdir>/export/onnx/{float,int8}[_raw_heads].onnx` (or --output), prints its
size, and with --check (the default) compares it in ONNX Runtime with jaxcomp's own
forward pass on images of the run's eval split.
"""

import onnxruntime
from absl import app, flags, logging

from jaxcomp.export import check
from jaxcomp.export.onnx import FORMATS, OPSET, Exported, export_run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a finished run (config.json, checkpoints/).")
flags.DEFINE_enum("format", "onnx", FORMATS, "Export format.")
flags.DEFINE_bool("int8", False, "Export the int8 model (QDQ) of a quantized (QAT/PTQ) run.")
flags.DEFINE_string("output", None, "The .onnx file; <workdir>/export/onnx/... by default.")
flags.DEFINE_integer("image_size", None, "Input side, a multiple of 32; the run's by default.")
flags.DEFINE_bool("raw_heads", False, "Output the heads (heatmap logits, size, offset), no decode.")
flags.DEFINE_integer("top_k", None, "Detections per image; the run's config.eval.top_k by default.")
flags.DEFINE_bool("check", True, "Compare the export in ONNX Runtime with jaxcomp on real images.")
flags.DEFINE_integer("check_images", 32, "Images of the eval split the check compares on.")
flags.DEFINE_bool("check_map", False, "Also compare the mAP of both on the whole eval split.")
flags.mark_flags_as_required(["workdir"])


def describe(exported: Exported) -> str:
    """Lines saying what was written: file, size, input, outputs and layers."""
    run = exported.run
    side = exported.image_size
    outputs = (
        "heatmap logits, size, offset (NHWC)"
        if exported.raw_heads
        else f"boxes, scores, classes (top {exported.top_k})"
    )
    layers = (
        f"{exported.int8_layers} int8 layers (QDQ), {exported.float_layers} float"
        if exported.int8
        else f"{exported.float_layers} float convolutions (BatchNorm folded)"
    )
    shrunk = " (channel-shrunk)" if run.shrunk_widths else ""
    return "\n".join(
        [
            f"Exported the {'int8' if exported.int8 else 'float'} {run.config.model.name}{shrunk} "
            f"of {run.workdir} (step {run.step}) to {exported.path}",
            f"  {exported.size_bytes:,} bytes ({exported.size_bytes / 1024:.1f} KiB), ONNX opset "
            f"{OPSET}; input uint8 [batch, {side}, {side}, 3]; outputs {outputs}; {layers}",
        ]
    )


def _comparison(entry: dict) -> str:
    differences = ", ".join(f"{name} {value:.3g}" for name, value in entry["max_abs"].items())
    text = f"max |difference| {differences}"
    if "matched" in entry:
        matched, total = entry["matched"]
        text += f"; detections (score >= 0.1) matched {matched}/{total}"
    return text


def _codes(entry: dict) -> str:
    differences = entry["code_difference"]
    differing = sum(1 for value in differences.values() if value)
    return (
        f"input codes within {max(differences.values())} of jaxcomp's "
        f"({differing} of {len(differences)} layers differ at all)"
    )


def describe_check(exported: Exported, result: dict) -> str:
    """Lines summarising `check.check_export`'s result."""
    reference = "int8 serving path" if exported.int8 else "float forward"
    split = exported.run.config.data.eval_split
    lines = [
        f"Check on {result['images']} images of the {split} split against jaxcomp's "
        f"{reference} (ONNX Runtime {onnxruntime.__version__}, CPU):",
        f"  ONNX Runtime, end to end: {_comparison(result['end_to_end'])}",
    ]
    if exported.int8:
        lines += [
            "  each int8 layer fed jaxcomp's codes of its input (differences do not compound):",
            f"    graph as specified (QDQ in float): {_codes(result['as_specified'])}; "
            f"{_comparison(result['as_specified'])}",
            f"    integer kernels (ONNX Runtime fused {result['fused_layers']} of "
            f"{exported.int8_layers} int8 layers into QLinearConv): "
            f"{_codes(result['integer_kernels'])}; {_comparison(result['integer_kernels'])}",
        ]
    else:
        lines.append(
            f"  graph as specified (no runtime optimization): {_comparison(result['as_specified'])}"
        )
    if "map" in result:
        ours, theirs = result["map"]["jaxcomp"], result["map"]["onnxruntime"]
        lines.append(
            f"  mAP on the {split} split: jaxcomp {100 * ours['AP']:.2f} AP / "
            f"{100 * ours['AP50']:.2f} AP50, ONNX Runtime {100 * theirs['AP']:.2f} / "
            f"{100 * theirs['AP50']:.2f} (difference {100 * (theirs['AP'] - ours['AP']):+.2f} AP)"
        )
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        # orbax and TFDS log every read at INFO.
        logging.set_verbosity(logging.WARNING)
    exported = export_run(
        FLAGS.workdir,
        int8=FLAGS.int8,
        output=FLAGS.output,
        image_size=FLAGS.image_size,
        raw_heads=FLAGS.raw_heads,
        top_k=FLAGS.top_k,
    )
    print(describe(exported), flush=True)
    if FLAGS.check:
        result = check.check_export(
            exported, num_images=FLAGS.check_images, with_map=FLAGS.check_map
        )
        print(describe_check(exported, result))


if __name__ == "__main__":
    app.run(main)

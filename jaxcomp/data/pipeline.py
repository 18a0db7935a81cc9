"""Input pipeline for TFDS object-detection datasets, without TensorFlow.

Any dataset with the `voc/2007` / `coco/2017` feature layout (`image`, optional
`image/id`, `objects/bbox` normalized `[ymin, xmin, ymax, xmax]`, `objects/label`)
goes through the same code: examples are read by random access from
`builder.as_data_source(split)` (ArrayRecord), cleaned by `sanitize_example`,
resized (and augmented, for training) in numpy, and padded to a fixed number of
boxes; grain shuffles, maps and batches. The CenterNet targets are not built here:
the train step encodes them on the devices from the boxes
(`jaxcomp.detection.targets.encode_batch_targets`).

Training batches are a pure function of `(seed, step)`: the element in row `r`
of global step `s` is global element `g = s * global_batch_size + r`, read from
epoch `g // len(source)` of a per-epoch shuffle and augmented with an RNG seeded
by `(seed, g)`. A resumed run therefore sees the batches it would have seen,
whatever the number of processes or data-loader workers.

One module of about 770 lines, on purpose: reading, sanitizing, resizing and
augmenting, padding and batching are small functions that all keep the
`(seed, step)` contract above; the contract is easier to check in one place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import flags
from PIL import Image

from jaxcomp.data.embedded import EmbeddedDetection, prepare_embedded

# Dropped entries, one kind each: every input entry is either kept or counted in exactly one.
DROP_KINDS = ("mismatched", "non_finite", "bad_label", "outside", "degenerate")
# Repairs of kept boxes; a box can be both swapped and clipped, `fixed` counts it once.
FIX_KINDS = ("swapped", "clipped")
SANITIZER_COUNT_KEYS = (*DROP_KINDS, *FIX_KINDS, "fixed", "kept", "background")

_SCALE_JITTER = (0.6, 1.4)
# An augmented box must keep this many pixels per side and this fraction of its area in the crop.
_MIN_BOX_PIXELS = 2.0
_MIN_VISIBLE_FRACTION = 0.3
# Two batches in flight are enough to hide decoding behind a train step; more only costs memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_WORKER_BUFFER_SIZE = 2
# Independent random streams derived from the one user seed.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns a prepared TFDS builder for a detection dataset.

    Args:
      name: 'jaxcomp_embedded' or 'jaxcomp_embedded/<config>' (generated offline
        on first use), or any prepared TFDS detection dataset ('voc/2007',
        'coco/2017').
      data_dir: TFDS data directory; None means TFDS's default.

    Returns:
      The builder; read a split with `builder.as_data_source(split)`.

    Raises:
      FileNotFoundError: the dataset is not prepared in `data_dir`, or not in the
        ArrayRecord format that random access needs; the message says how to
        prepare it.
      ValueError: no TFDS dataset has that name; the message suggests close names.

    Example:
      >>> builder = get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds")
      >>> class_names(builder)[:3]
      ['0', '1', '2']
    """
    dataset, _, config = name.partition("/")
    if dataset == EmbeddedDetection.name:
        return prepare_embedded(config or EmbeddedDetection.DEFAULT_BUILDER_CONFIG_NAME, data_dir)
    try:
        # A prepared dataset loads from its own metadata files, which needs neither its
        # builder code nor TensorFlow (the coco builder's code imports TensorFlow).
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        builder = _builder_from_code(name, data_dir)
    if not _array_record_available(builder):
        raise FileNotFoundError(
            f"{name} is prepared in {builder.data_dir} as "
            f"{builder.info.file_format}, but the pipeline reads ArrayRecord; rebuild it "
            f"with `tfds build {name} --file_format=array_record --data_dir=...`"
        )
    return builder


def _builder_from_code(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    how_to = (
        f"prepare it once, with network access: `tfds build {name} "
        "--file_format=array_record --data_dir=...`"
    )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ImportError as error:
        raise FileNotFoundError(
            f"{name} is not prepared{f' in {data_dir}' if data_dir else ''} and its TFDS "
            f"builder needs TensorFlow ({error}); `pip install jaxcomp[tf]`, then {how_to}"
        ) from error
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists all of its ~250 datasets; name the close ones instead.
        raise ValueError(_unknown_dataset_message(name)) from None
    if not (builder.is_prepared() or _tfds_is_mocked()):
        raise FileNotFoundError(f"{name} is not prepared in {builder.data_dir}; {how_to}")
    return builder


def _unknown_dataset_message(name: str) -> str:
    dataset = name.partition("/")[0]
    known = [EmbeddedDetection.name, *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(dataset, known, n=3)
    hint = f" (did you mean {close}?)" if close else ""
    return (
        f"dataset {name!r} (config.data.name) is not a TFDS dataset{hint}; jaxcomp reads "
        f"'{EmbeddedDetection.name}' (built offline) or a TFDS detection dataset such as "
        "'voc/2007' or 'coco/2017'"
    )


def _tfds_is_mocked() -> bool:
    # Under tfds.testing.mock_data nothing is ever prepared, yet as_data_source serves random
    # examples: that is how tests run the real pipeline on voc/2007 without its files.
    prepare = tfds.core.DatasetBuilder.download_and_prepare
    return getattr(prepare, "__module__", "") == "tensorflow_datasets.testing.mocking"


def _array_record_available(builder: tfds.core.DatasetBuilder) -> bool:
    if _tfds_is_mocked():
        return True
    return tfds.core.FileFormat.ARRAY_RECORD in builder.info.available_file_formats()


def _label_feature(builder: tfds.core.DatasetBuilder) -> tfds.features.ClassLabel:
    features = builder.info.features
    if "objects" not in features or "label" not in features["objects"].feature:
        raise ValueError(
            f"{builder.name} has no 'objects/label' feature (features: {list(features)}); "
            "jaxcomp reads datasets with the voc/2007 or coco/2017 layout"
        )
    return features["objects"]["label"]


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
    """Number of object classes of a detection dataset.

    Example:
      >>> num_classes(get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds"))
      14
    """
    return _label_feature(builder).num_classes


def class_names(builder: tfds.core.DatasetBuilder) -> list[str]:
    """Class names of a detection dataset, indexed by label.

    Example:
      >>> class_names(get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds"))[-1]
      'square'
    """
    return list(_label_feature(builder).names)


def sanitize_example(
    bboxes: Any, labels: Any, num_classes: int
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Repairs or drops bad annotations of one example; never raises on bad values.

    Every input entry is either kept or dropped as exactly one of DROP_KINDS:
    'mismatched' (bboxes and labels differ in length: the extra entries),
    'non_finite' (a NaN or inf coordinate), 'bad_label' (label not an integer
    in [0, num_classes)), 'degenerate' (zero height or width), 'outside' (empty
    once clipped to [0, 1]). Kept boxes may have been 'swapped' (min > max
    reordered) and/or 'clipped' to [0, 1]; 'fixed' counts kept boxes with either
    repair. 'background' is 1 when nothing is kept: the example stays, as an
    image without objects.

    Args:
      bboxes: [N, 4] normalized [ymin, xmin, ymax, xmax] (array or list of rows).
      labels: [M] class ids (integers; a float label counts as 'bad_label' unless
        it is a whole number).
      num_classes: number of classes.

    Returns:
      (bboxes float32 [n, 4] with 0 <= min < max <= 1, labels int32 [n],
      counts dict with the keys SANITIZER_COUNT_KEYS).

    Raises:
      ValueError: bboxes are not [N, 4] numbers or labels are not numbers: the
        example does not have the detection layout at all.

    Example:
      >>> boxes, labels, counts = sanitize_example([[0.5, 0.25, 0, 0.75], [0, 0, 1, 1]], [1, 9], 3)
      >>> boxes.tolist(), labels.tolist(), counts["swapped"], counts["bad_label"]
      ([[0.0, 0.25, 0.5, 0.75]], [1], 1, 1)
    """
    # float32 from the start: a positive extent too small for float32 must count as degenerate.
    with np.errstate(over="ignore"):
        bboxes = np.asarray(bboxes, np.float32)
    labels = np.asarray(labels).reshape(-1)
    if labels.size and labels.dtype.kind not in "biuf":
        raise ValueError(
            f"labels must be integer class ids, got dtype {labels.dtype} ({labels[:3]}); "
            "pass the example's objects/label feature"
        )
    if bboxes.size == 0:
        bboxes = bboxes.reshape(0, 4)
    if bboxes.ndim != 2 or bboxes.shape[1] != 4:
        raise ValueError(
            f"bboxes must have shape [N, 4], got {bboxes.shape}; "
            "pass the example's objects/bbox feature"
        )
    counts = dict.fromkeys(SANITIZER_COUNT_KEYS, 0)
    num_paired = min(len(bboxes), len(labels))
    counts["mismatched"] = max(len(bboxes), len(labels)) - num_paired
    bboxes, labels = bboxes[:num_paired], labels[:num_paired]

    finite = np.isfinite(bboxes).all(axis=1)
    with np.errstate(invalid="ignore"):
        good_label = (labels >= 0) & (labels < num_classes) & (labels == np.floor(labels))
    alive = finite & good_label
    with np.errstate(invalid="ignore"):
        ordered = np.concatenate(
            [np.minimum(bboxes[:, :2], bboxes[:, 2:]), np.maximum(bboxes[:, :2], bboxes[:, 2:])],
            axis=1,
        )
        clipped = np.clip(ordered, 0.0, 1.0)
        degenerate = (ordered[:, 2:] <= ordered[:, :2]).any(axis=1)
        empty = (clipped[:, 2:] <= clipped[:, :2]).any(axis=1)
        was_swapped = (ordered != bboxes).any(axis=1)
        was_clipped = (clipped != ordered).any(axis=1)
    keep = alive & ~empty
    counts["non_finite"] = int((~finite).sum())
    counts["bad_label"] = int((finite & ~good_label).sum())
    counts["degenerate"] = int((alive & degenerate).sum())
    counts["outside"] = int((alive & ~degenerate & empty).sum())
    counts["swapped"] = int((keep & was_swapped).sum())
    counts["clipped"] = int((keep & was_clipped).sum())
    counts["fixed"] = int((keep & (was_swapped | was_clipped)).sum())
    counts["kept"] = int(keep.sum())
    counts["background"] = int(counts["kept"] == 0)
    return clipped[keep], labels[keep].astype(np.int32), counts


def num_bad_boxes(counts: dict[str, int]) -> int:
    """Boxes that `sanitize_example` dropped or repaired, from its counts."""
    return sum(counts[kind] for kind in DROP_KINDS) + counts["fixed"]


def _raw_objects(example: dict[str, Any]) -> tuple[Any, Any]:
    objects = example.get("objects")
    if not isinstance(objects, dict) or "bbox" not in objects or "label" not in objects:
        raise ValueError(
            f"example has no objects/bbox and objects/label (keys: {sorted(example)}); "
            "jaxcomp reads datasets with the voc/2007 or coco/2017 layout"
        )
    return objects["bbox"], objects["label"]


def _to_rgb(image: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a grayscale, grayscale+alpha, RGB or RGBA image."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8, got {image.dtype}; decode the dataset's image feature as uint8"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"images must be [H, W] or [H, W, C] with C in 1-4 (grey, grey+alpha, RGB, RGBA), "
            f"got shape {image.shape}; fix or remove this example"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty (shape {image.shape}); fix or remove this example")
    if image.shape[-1] in (2, 4):
        image = image[..., :-1]  # The alpha channel carries no content to detect.
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


class _Placement(NamedTuple):
    """Where the resized image lands on the S x S canvas."""

    height: int  # resized image height in pixels
    width: int
    top: int  # canvas row of the resized image's first row (negative: cropped)
    left: int
    flip: bool  # mirror the canvas horizontally


def _letterbox(image_shape: tuple[int, ...], size: int) -> _Placement:
    """Aspect-preserving resize of the longer side to `size`, at the top-left corner."""
    height, width = image_shape[:2]
    scale = size / max(height, width)
    return _Placement(max(1, round(height * scale)), max(1, round(width * scale)), 0, 0, flip=False)


def _random_placement(
    image_shape: tuple[int, ...], size: int, rng: np.random.Generator
) -> _Placement:
    """Letterbox scale times a random jitter, a random crop or pad, a random flip."""
    height, width = image_shape[:2]
    scale = size / max(height, width) * rng.uniform(*_SCALE_JITTER)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(min(0, size - new_height), max(0, size - new_height) + 1))
    left = int(rng.integers(min(0, size - new_width), max(0, size - new_width) + 1))
    return _Placement(new_height, new_width, top, left, flip=bool(rng.random() < 0.5))


def _place_image(image: np.ndarray, placement: _Placement, size: int) -> np.ndarray:
    """Resizes `image` and pastes it on a black S x S canvas (cropping what falls outside)."""
    if image.shape[:2] != (placement.height, placement.width):
        image = np.asarray(
            Image.fromarray(image).resize((placement.width, placement.height), Image.BILINEAR)
        )
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = max(placement.top, 0), max(placement.left, 0)
    bottom = min(placement.top + placement.height, size)
    right = min(placement.left + placement.width, size)
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = image[
            top - placement.top : bottom - placement.top,
            left - placement.left : right - placement.left,
        ]
    return np.ascontiguousarray(canvas[:, ::-1]) if placement.flip else canvas


def _place_boxes(bboxes: np.ndarray, placement: _Placement, size: int) -> np.ndarray:
    """Normalized boxes -> pixel boxes on the canvas, unclipped, float32 [n, 4]."""
    scale = np.array([placement.height, placement.width] * 2, np.float32)
    shift = np.array([placement.top, placement.left] * 2, np.float32)
    boxes = bboxes * scale + shift
    if placement.flip:
        boxes = np.stack([boxes[:, 0], size - boxes[:, 3], boxes[:, 2], size - boxes[:, 1]], 1)
    return boxes.astype(np.float32)


def _inside_canvas(
    boxes: np.ndarray, size: int, min_pixels: float, min_visible_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clips pixel boxes to the canvas; returns (clipped boxes, which to keep)."""
    clipped = np.clip(boxes, 0.0, np.float32(size))
    extent = clipped[:, 2:] - clipped[:, :2]
    full_area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    keep = (
        (extent > 0).all(axis=1)
        & (extent >= min_pixels).all(axis=1)
        & (np.prod(extent, axis=1) >= min_visible_fraction * full_area)
    )
    return clipped, keep


def _largest(boxes: np.ndarray, max_objects: int) -> np.ndarray:
    """Indices of the `max_objects` largest boxes, in their original order."""
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return np.sort(np.argsort(-areas, kind="stable")[:max_objects])


@dataclasses.dataclass(frozen=True)
class _ElementSpec:
    image_size: int
    max_objects: int
    num_classes: int


def _element(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    spec: _ElementSpec,
    *,
    image_id: int,
    valid: bool,
    bad_boxes: int = 0,
    cropped: int = 0,
) -> dict[str, np.ndarray]:
    """Pads the annotations to max_objects (the train step encodes the targets)."""
    keep = _largest(boxes, spec.max_objects)
    num_objects = len(keep)
    padded_boxes = np.zeros((spec.max_objects, 4), np.float32)
    padded_labels = np.zeros((spec.max_objects,), np.int32)
    box_mask = np.arange(spec.max_objects) < num_objects
    padded_boxes[:num_objects] = boxes[keep]
    padded_labels[:num_objects] = labels[keep]
    return {
        "image": image,
        "boxes": padded_boxes,
        "labels": padded_labels,
        "box_mask": box_mask,
        "image_id": np.asarray(image_id, np.int64),
        "valid": np.asarray(valid),
        "num_bad_boxes": np.asarray(bad_boxes, np.int32),
        "num_truncated": np.asarray(len(boxes) - num_objects, np.int32),
        "num_cropped": np.asarray(cropped, np.int32),
    }


def _checked_example(
    example: dict[str, Any], source_index: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(RGB image, sanitized boxes, labels, counts); an error names the example."""
    try:
        if "image" not in example:
            raise ValueError(
                f"example has no 'image' (keys: {sorted(example)}); "
                "jaxcomp reads datasets with the voc/2007 or coco/2017 layout"
            )
        return (_to_rgb(example["image"]), *sanitize_example(*_raw_objects(example), num_classes))
    except ValueError as error:
        image_id = example.get("image/id")
        which = f"example {source_index}" + ("" if image_id is None else f" (image/id {image_id})")
        raise ValueError(f"{which} of the split: {error}") from error


def _make_element(
    example: dict[str, Any],
    source_index: int,
    spec: _ElementSpec,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """Example -> batch row; augmented when `rng` is given, letterboxed otherwise."""
    image, bboxes, labels, counts = _checked_example(example, source_index, spec.num_classes)
    if rng is None:
        placement = _letterbox(image.shape, spec.image_size)
        min_pixels, min_visible_fraction = 0.0, 0.0
    else:
        placement = _random_placement(image.shape, spec.image_size, rng)
        min_pixels, min_visible_fraction = _MIN_BOX_PIXELS, _MIN_VISIBLE_FRACTION
    boxes, keep = _inside_canvas(
        _place_boxes(bboxes, placement, spec.image_size),
        spec.image_size,
        min_pixels,
        min_visible_fraction,
    )
    return _element(
        _place_image(image, placement, spec.image_size),
        boxes[keep],
        labels[keep],
        spec,
        image_id=int(example.get("image/id", source_index)),
        valid=True,
        bad_boxes=num_bad_boxes(counts),
        cropped=int((~keep).sum()),
    )


def _train_element(
    global_index: int,
    source_index: int,
    *,
    source: Any,
    spec: _ElementSpec,
    seed: int,
    augment: bool,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, global_index]) if augment else None
    return _make_element(source[source_index], source_index, spec, rng)


def _eval_element(
    position: int, *, source: Any, spec: _ElementSpec, start: int, stop: int
) -> dict[str, np.ndarray]:
    source_index = start + position
    if source_index < stop:
        return _make_element(source[source_index], source_index, spec, rng=None)
    size = spec.image_size
    return _element(
        np.zeros((size, size, 3), np.uint8),
        np.zeros((0, 4), np.float32),
        np.zeros((0,), np.int32),
        spec,
        image_id=-1,
        valid=False,
    )


def _check_element_args(
    source: Any, image_size: int, max_objects: int, num_classes: int, stride: int
) -> None:
    if len(source) == 0:
        raise ValueError(
            "the split has no examples; check config.data.train_split / eval_split and that "
            "the dataset was prepared completely (`tfds build ... --overwrite`)"
        )
    if stride <= 0 or image_size <= 0 or image_size % stride != 0:
        raise ValueError(
            f"image_size must be a positive multiple of stride={stride}, got {image_size}"
        )
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")


def train_dataset(
    source: Any,
    *,
    image_size: int,
    global_batch_size: int,
    max_objects: int,
    num_classes: int,
    seed: int,
    stride: int = 4,
    augment: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite training batches: `ds[step]` is this process's part of global step `step`.

    Each process gets rows `[p * Bl, (p + 1) * Bl)` of the global batch, where
    `Bl = global_batch_size // process_count`, so the processes' local batches
    concatenate to the single-process batch. Epochs are reshuffled, and batch
    `step` depends only on `(seed, step)`, so resuming at any step is exact.

    Args:
      source: a random-access split, `builder.as_data_source(split)`.
      image_size: side S of the square model input, a multiple of `stride`.
      global_batch_size: examples per step over all processes.
      max_objects: K, annotations per image after padding/truncation.
      num_classes: C, the number of classes (`num_classes(builder)`); labels outside
        [0, C) are dropped as bad.
      seed: in [0, 2**32); drives the shuffle and the augmentation.
      stride: output stride of the detector, which `image_size` must be a multiple of.
      augment: random flip, scale jitter in [0.6, 1.4] and crop/pad to S x S;
        without it images are letterboxed.
      process_index: this process, in [0, process_count).
      process_count: number of data-loading processes (JAX processes).

    Returns:
      A grain MapDataset of dicts of numpy arrays with leading dim Bl: image,
      boxes, labels, box_mask, image_id, valid, num_bad_boxes, num_truncated,
      num_cropped.

    Raises:
      ValueError: global_batch_size is not divisible by process_count, or another
        argument is out of range.

    Example:
      >>> builder = get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds")
      >>> ds = train_dataset(builder.as_data_source("train"), image_size=128,
      ...                    global_batch_size=32, max_objects=16, num_classes=14, seed=0)
      >>> ds[0]["image"].shape
      (32, 128, 128, 3)
    """
    _check_element_args(source, image_size, max_objects, num_classes, stride)
    _check_processes(global_batch_size, process_index, process_count)
    if global_batch_size % process_count != 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by "
            f"process_count={process_count}; use a multiple of {process_count}"
        )
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    local_batch_size = global_batch_size // process_count
    make_element = functools.partial(
        _train_element,
        source=source,
        spec=_ElementSpec(image_size, max_objects, num_classes),
        seed=seed,
        augment=augment,
    )
    shuffle_seed = int(np.random.SeedSequence([seed, _SHUFFLE_STREAM]).generate_state(1)[0])
    elements = (
        grain.MapDataset.range(len(source))
        .shuffle(seed=shuffle_seed)
        .repeat()
        .map_with_index(make_element)
    )
    # Consecutive local batches: local batch c holds rows [p * Bl, (p + 1) * Bl) of global
    # step c // process_count for process p = c % process_count. An infinite dataset has no
    # remainder to drop; drop_remainder only keeps grain from computing its length in floats.
    local_batches = elements.batch(local_batch_size, drop_remainder=True)
    return local_batches[process_index::process_count]


def iterate_batches(
    ds: grain.MapDataset, start_step: int, num_steps: int, num_workers: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Yields `ds[start_step]`, ..., `ds[start_step + num_steps - 1]`, in order.

    Args:
      ds: a dataset from `train_dataset`.
      start_step: first step to yield (the step a resumed run restarts at).
      num_steps: number of batches to yield.
      num_workers: data-loader processes decoding and augmenting ahead of the
        consumer; 0 works in this process. The batches do not depend on it.

    Returns:
      An iterator of batches; it stops its worker processes once exhausted or closed.

    Example:
      >>> builder = get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds")
      >>> ds = train_dataset(builder.as_data_source("train"), image_size=128,
      ...                    global_batch_size=32, max_objects=16, num_classes=14, seed=0)
      >>> for batch in iterate_batches(ds, start_step=100, num_steps=2):
      ...     print(batch["image"].shape)
      (32, 128, 128, 3)
      (32, 128, 128, 3)
    """
    if start_step < 0 or num_steps < 0 or num_workers < 0:
        raise ValueError(
            "start_step, num_steps and num_workers must be >= 0, got "
            f"{start_step}, {num_steps} and {num_workers}"
        )
    return _iterate(ds[start_step : start_step + num_steps], num_workers)


def _iterate(ds: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    if num_workers == 0 or len(ds) == 0:
        return _Batches(iter(ds.to_iter_dataset(_READ_OPTIONS)))
    if not flags.FLAGS.is_parsed():
        # grain 0.2.18's mp_prefetch reads an absl flag, which raises in programs that do not
        # parse flags (tests, notebooks); the defaults are what they would get
        # (google/grain#1355, fixed upstream after 0.2.18).
        flags.FLAGS.mark_as_parsed()
    rest = ds[1:].to_iter_dataset(_READ_OPTIONS)
    options = grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_WORKER_BUFFER_SIZE
    )
    # The worker processes take seconds to start. The first batch is made in this process,
    # so the first step never waits for them.
    return _Batches(iter(rest.mp_prefetch(options)), first=ds[0])


class _Batches(Iterator[dict[str, np.ndarray]]):
    """The batch `first` (if given), then those of a grain iterator.

    With `first`, the iterator's next batch is asked for at once, in a background thread:
    its worker processes start up while the caller builds its model and compiles. The
    workers are joined once the batches are exhausted or closed, rather than whenever
    garbage collection runs; from then on the batches are empty, like a closed generator's.
    """

    def __init__(self, iterator: grain.DatasetIterator, first: dict | None = None):
        self._first = first
        self._iterator = iterator
        self._closed = False
        self._executor = self._ahead = None
        if first is not None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            self._ahead = self._executor.submit(next, iterator, None)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._first is not None:
            batch, self._first = self._first, None
            return batch
        if self._closed:
            raise StopIteration
        if self._ahead is not None:
            batch, self._ahead = self._ahead.result(), None
        else:
            batch = next(self._iterator, None)
        if batch is None:
            self.close()
            raise StopIteration
        return batch

    def close(self) -> None:
        self._closed, self._first = True, None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._iterator.close()


def eval_batches(
    source: Any,
    *,
    image_size: int,
    batch_size: int,
    max_objects: int,
    num_classes: int,
    stride: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of this process's contiguous shard once, letterboxed, in order.

    The last batch is padded with `valid=False` rows (`image_id` -1, no boxes), and
    every process yields the same number of batches, so that shapes stay static
    and a multi-process eval step runs the same number of times everywhere.

    Args:
      source: a random-access split, `builder.as_data_source(split)`.
      image_size: side S of the square model input, a multiple of `stride`.
      batch_size: rows per (local) batch.
      max_objects: K, annotations per image after padding/truncation.
      num_classes: C, the number of classes.
      stride: output stride of the detector.
      process_index: this process, in [0, process_count).
      process_count: number of processes; process p reads examples
        [p * n // process_count, (p + 1) * n // process_count).

    Returns:
      An iterator of batches with the keys of `train_dataset`.

    Example:
      >>> builder = get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds")
      >>> batches = list(eval_batches(builder.as_data_source("test"), image_size=128,
      ...                             batch_size=64, max_objects=16, num_classes=14))
      >>> sum(int(batch["valid"].sum()) for batch in batches)  # the tiny test split
      32
    """
    _check_element_args(source, image_size, max_objects, num_classes, stride)
    _check_processes(batch_size, process_index, process_count)
    num_examples = len(source)
    start = num_examples * process_index // process_count
    stop = num_examples * (process_index + 1) // process_count
    largest_shard = -(-num_examples // process_count)
    num_batches = -(-largest_shard // batch_size)
    make_element = functools.partial(
        _eval_element,
        source=source,
        spec=_ElementSpec(image_size, max_objects, num_classes),
        start=start,
        stop=stop,
    )
    ds = grain.MapDataset.range(num_batches * batch_size).map(make_element).batch(batch_size)
    return _iterate(ds, num_workers=0)


def dataset_report(source: Any, num_classes: int, max_objects: int) -> dict[str, int]:
    """Scans a split and counts what the sanitizer would repair, drop or truncate.

    Args:
      source: a random-access split, `builder.as_data_source(split)`.
      num_classes: number of classes.
      max_objects: K; objects beyond the K largest of an image count as 'truncated'.

    Returns:
      The sum over examples of the `sanitize_example` counts (SANITIZER_COUNT_KEYS;
      'background' is the number of images without objects), plus 'examples',
      'truncated' and 'max_objects_per_image'.

    Example:
      >>> builder = get_builder("jaxcomp_embedded/tiny", data_dir="/tmp/tfds")
      >>> report = dataset_report(builder.as_data_source("test"), 14, max_objects=16)
      >>> report["examples"], report["non_finite"]
      (32, 0)
    """
    report = dict.fromkeys(SANITIZER_COUNT_KEYS, 0)
    report.update(examples=len(source), truncated=0, max_objects_per_image=0)
    for index in tqdm.trange(len(source), desc="Scanning annotations", unit="example"):
        _, _, _, counts = _checked_example(source[index], index, num_classes)
        for key, value in counts.items():
            report[key] += value
        report["truncated"] += max(0, counts["kept"] - max_objects)
        report["max_objects_per_image"] = max(report["max_objects_per_image"], counts["kept"])
    return report

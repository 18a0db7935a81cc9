"""The embedded detection dataset: real image material composed offline into a TFDS dataset.

Everything ships inside pip packages, so the dataset builds without a download:
backgrounds are random crops of the photographs in `skimage.data` and
`sklearn.datasets.load_sample_images()`, objects are the handwritten digits of
`sklearn.datasets.load_digits()` plus a few rasterized shapes, and clutter
(strokes and blobs that are not objects) is drawn underneath them. Later objects
occlude earlier ones; an object stays annotated while enough of it is visible,
with the tight box of its visible pixels.

Each example is a pure function of `(config, split, index)`, see `render_example`,
so the build is deterministic and any subset can be regenerated independently.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import multiprocessing
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

DIGIT_NAMES = tuple(str(digit) for digit in range(10))
SHAPE_NAMES = ("circle", "ring", "triangle", "square")
CLASS_NAMES = DIGIT_NAMES + SHAPE_NAMES
SPLIT_IDS = {"train": 0, "test": 1}

# Photographs that load from the scikit-image wheel itself (others need `pooch` and a download).
_SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "rocket",
)
# Below this many examples per worker process, starting the processes costs more than it saves.
_MIN_EXAMPLES_PER_WORKER = 500
# An object's drawn pixels are those at least this opaque; they occlude what lies under them.
_MASK_THRESHOLD = 0.5


@dataclasses.dataclass(eq=False)
class EmbeddedConfig(tfds.core.BuilderConfig):
    """Configuration of the embedded dataset; every field changes the generated data.

    Attributes:
      image_size: side S of the square S x S RGB images, in pixels.
      train_size: number of examples in the `train` split.
      test_size: number of examples in the `test` split.
      seed: root of every example's random stream.
      max_objects_per_image: objects pasted per image are drawn uniformly from
        [1, max_objects_per_image]; occluded ones may then be dropped.
      min_object_size: smallest object height in pixels.
      max_object_fraction: largest object height as a fraction of image_size.
      max_clutter: distractor strokes and blobs per image, drawn uniformly from
        [0, max_clutter].
      min_visible_fraction: an occluded object keeps its annotation while at
        least this fraction of its pixels stays visible.
    """

    image_size: int = 128
    train_size: int = 6000
    test_size: int = 500
    seed: int = 0
    max_objects_per_image: int = 6
    min_object_size: int = 6
    max_object_fraction: float = 0.4
    max_clutter: int = 4
    min_visible_fraction: float = 0.5


DEFAULT_CONFIG = EmbeddedConfig(
    name="default",
    description="128x128 images, 6000 train and 500 test examples.",
)
TINY_CONFIG = EmbeddedConfig(
    name="tiny",
    description="64x64 images, 64 train and 32 test examples, for tests.",
    image_size=64,
    train_size=64,
    test_size=32,
)


@dataclasses.dataclass(frozen=True)
class RenderedExample:
    """One generated example with the masks its boxes were computed from.

    Attributes:
      image: uint8 [S, S, 3].
      bboxes: float32 [N, 4] normalized [ymin, xmin, ymax, xmax]; N >= 1, as
        nothing occludes the last object pasted.
      labels: int64 [N] indices into CLASS_NAMES.
      visible_masks: bool [N, S, S], the pixels of each annotated object that
        no later object covers; bboxes[i] is the tight box of visible_masks[i].
    """

    image: np.ndarray
    bboxes: np.ndarray
    labels: np.ndarray
    visible_masks: np.ndarray


@functools.cache
def _background_photos() -> tuple[Image.Image, ...]:
    # Imported here, like sklearn below: only generating examples needs them, and sklearn
    # alone takes a second to import.
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in _SKIMAGE_PHOTOS]
    arrays += list(load_sample_images().images)
    photos = []
    for array in arrays:
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append(Image.fromarray(np.ascontiguousarray(array[..., :3], dtype=np.uint8)))
    return tuple(photos)


@functools.cache
def _digit_pools(split: str) -> tuple[np.ndarray, ...]:
    """Per digit class, the 8x8 images in [0, 1] reserved for `split`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Disjoint samples: no test digit image is ever seen in training.
    in_test = np.arange(len(digits.target)) % 5 == 0
    chosen = in_test if SPLIT_IDS[split] == SPLIT_IDS["test"] else ~in_test
    images = digits.images.astype(np.float32) / 16.0
    return tuple(images[chosen & (digits.target == d)] for d in range(len(DIGIT_NAMES)))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of a random photograph, flipped and colour-jittered, float32 [S, S, 3]."""
    photos = _background_photos()
    photo = photos[rng.integers(len(photos))]
    width, height = photo.size
    side = rng.uniform(0.2, 1.0) * min(width, height)
    left = rng.uniform(0, width - side)
    top = rng.uniform(0, height - side)
    crop = photo.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    image = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.2:
        image = image[::-1]
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.6, 1.2) + mean
    image = image * rng.uniform(0.75, 1.25) * rng.uniform(0.9, 1.1, size=3)
    return np.clip(image, 0.0, 1.0)


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the patch centre."""
    ys = np.arange(height, dtype=np.float32) + 0.5 - height / 2
    xs = np.arange(width, dtype=np.float32) + 0.5 - width / 2
    return ys[:, None], xs[None, :]


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (pixels, positive inside)."""
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _shape_alpha(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _pixel_grid(side, side)
    radius = side / 2 - 0.5
    if name in ("circle", "ring"):
        distance = np.sqrt(ys**2 + xs**2)
        signed = radius - distance
        if name == "ring":
            # The hole must stay open even for small rings.
            inner = min(radius * rng.uniform(0.4, 0.65), radius - 1.5)
            signed = np.minimum(signed, distance - inner)
        return _coverage(signed)
    if name == "square":
        # Up to 22.5 degrees: a square rotated further is a diamond, which looks like another class.
        angle = rng.uniform(-np.pi / 8, np.pi / 8)
        half = radius / (abs(np.cos(angle)) + abs(np.sin(angle)))
        u = xs * np.cos(angle) + ys * np.sin(angle)
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        return _coverage(half - np.maximum(np.abs(u), np.abs(v)))
    # Equilateral triangle inscribed in the patch: inside means on the inner side of all edges.
    edge_normals = rng.uniform(0, 2 * np.pi) + 2 * np.pi / 3 * np.arange(3)
    apothem = radius / 2
    signed = np.min(
        [apothem - (xs * np.cos(a) + ys * np.sin(a)) for a in edge_normals],
        axis=0,
    )
    return _coverage(signed)


def _digit_alpha(
    digit_image: np.ndarray, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    resized = Image.fromarray(digit_image).resize((width, height), Image.BILINEAR)
    alpha = np.asarray(resized)
    alpha = alpha / max(float(alpha.max()), 1e-6)
    # A steeper ramp than bilinear interpolation gives: pen strokes, not blurred blobs.
    low = rng.uniform(0.15, 0.35)
    return np.clip((alpha - low) / 0.4, 0.0, 1.0)


def _object_colour(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour that differs from the mean of `background` by a random minimum contrast."""
    base = background.reshape(-1, 3).mean(axis=0)
    min_contrast = rng.uniform(0.15, 0.4)
    for _ in range(8):
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.abs(colour - base).mean() >= min_contrast:
            return colour
    return np.where(base > 0.5, base - 0.5, base + 0.5)


def _paint(image: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray) -> None:
    height, width = alpha.shape
    region = image[top : top + height, left : left + width]
    region += (colour - region) * alpha[..., None]


def _draw_clutter(image: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Strokes and elongated blobs that are not objects: edges alone must not mean 'object'."""
    size = image.shape[0]
    ys, xs = _pixel_grid(size, size)
    ys, xs = ys + size / 2, xs + size / 2
    for _ in range(count):
        colour = rng.uniform(0.0, 1.0, size=3)
        if rng.random() < 0.5:
            start, end = rng.uniform(0, size, size=(2, 2))
            direction = end - start
            length_sq = max(float(direction @ direction), 1e-6)
            along = ((ys - start[0]) * direction[0] + (xs - start[1]) * direction[1]) / length_sq
            along = np.clip(along, 0.0, 1.0)
            distance = np.hypot(
                ys - start[0] - along * direction[0], xs - start[1] - along * direction[1]
            )
            alpha = _coverage(rng.uniform(0.5, 1.5) - distance)
        else:
            centre = rng.uniform(0, size, size=2)
            angle = rng.uniform(0, np.pi)
            sigma_long = rng.uniform(0.04, 0.15) * size
            sigma_short = sigma_long / rng.uniform(2.5, 5.0)
            dy, dx = ys - centre[0], xs - centre[1]
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            alpha = np.exp(-0.5 * ((u / sigma_long) ** 2 + (v / sigma_short) ** 2))
        _paint(image, alpha * rng.uniform(0.4, 0.9), 0, 0, colour)


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """[ymin, xmin, ymax, xmax] in pixel edges of a non-empty mask (max is exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=np.float32)


def render_example(config: EmbeddedConfig, split: str, index: int) -> RenderedExample:
    """Generates example `index` of `split`: a pure function of its arguments.

    Args:
      config: the dataset configuration (image size, seed, object counts...).
      split: 'train' or 'test'; the splits draw digits from disjoint samples.
      index: example index within the split.

    Returns:
      The image, its annotations and the visible mask of each annotated object.

    Example:
      >>> example = render_example(TINY_CONFIG, "train", 0)
      >>> example.image.shape
      (64, 64, 3)
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng([config.seed, SPLIT_IDS[split], index])
    size = config.image_size
    image = _background(rng, size)
    _draw_clutter(image, rng, int(rng.integers(config.max_clutter + 1)))
    digit_pools = _digit_pools(split)
    max_side = max(config.min_object_size, int(config.max_object_fraction * size))

    drawn_masks, visible_masks, labels = [], [], []
    for _ in range(int(rng.integers(1, config.max_objects_per_image + 1))):
        label = int(rng.integers(len(CLASS_NAMES)))
        # Log-uniform sizes: as many small objects as large ones.
        height = int(round(np.exp(rng.uniform(np.log(config.min_object_size), np.log(max_side)))))
        if label < len(DIGIT_NAMES):
            width = max(config.min_object_size // 2, int(round(height * rng.uniform(0.6, 0.9))))
            pool = digit_pools[label]
            alpha = _digit_alpha(pool[rng.integers(len(pool))], height, width, rng)
        else:
            width = height
            alpha = _shape_alpha(CLASS_NAMES[label], height, rng)
        top = int(rng.integers(size - height + 1))
        left = int(rng.integers(size - width + 1))
        region = image[top : top + height, left : left + width]
        colour = _object_colour(region, rng)
        opacity = rng.uniform(0.8, 1.0)
        _paint(image, alpha * opacity, top, left, colour)

        drawn = np.zeros((size, size), dtype=bool)
        drawn[top : top + height, left : left + width] = alpha * opacity >= _MASK_THRESHOLD
        if not drawn.any():
            continue
        for visible in visible_masks:
            visible &= ~drawn
        drawn_masks.append(drawn)
        visible_masks.append(drawn.copy())
        labels.append(label)

    # Sensor-like noise; uniform rather than Gaussian because it is four times cheaper to draw.
    image += rng.uniform(0.0, 0.08) * (rng.random(image.shape, dtype=np.float32) - 0.5)
    keep = [
        i
        for i, (drawn, visible) in enumerate(zip(drawn_masks, visible_masks, strict=True))
        if visible.any() and visible.sum() >= config.min_visible_fraction * drawn.sum()
    ]
    masks = np.array([visible_masks[i] for i in keep], dtype=bool).reshape(-1, size, size)
    boxes = np.array([_tight_box(mask) for mask in masks], dtype=np.float32).reshape(-1, 4)
    return RenderedExample(
        image=np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
        bboxes=boxes / np.float32(size),
        labels=np.array([labels[i] for i in keep], dtype=np.int64),
        visible_masks=masks,
    )


def _available_cpus() -> int:
    # The CPUs this process may run on (containers, taskset), where the platform says.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tfds_example(config: EmbeddedConfig, split: str, index: int) -> dict:
    example = render_example(config, split, index)
    # PNG-encode here: TFDS would encode numpy images through TensorFlow, which we do not install.
    # Level 1 is twice as fast as the default level for ~8% more bytes.
    buffer = io.BytesIO()
    Image.fromarray(example.image).save(buffer, format="png", compress_level=1)
    return {
        "image": buffer.getvalue(),
        "image/id": index,
        "objects": {"bbox": example.bboxes, "label": example.labels},
    }


class EmbeddedDetection(tfds.core.GeneratorBasedBuilder):
    """Procedural detection dataset built offline from real image material in pip packages."""

    name = "jaxcomp_embedded"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DEFAULT_CONFIG, TINY_CONFIG]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    # TFDS's own lookup of this file needs `importlib_resources`, a backport that it stopped
    # declaring as a dependency on Python >= 3.9 but still imports.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        # Built directly rather than through dataset_info_from_configs, which looks for
        # metadata files next to the builder's code.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "image/id": np.int64,
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                        }
                    ),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLIT_IDS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        num_examples = config.train_size if split == "train" else config.test_size
        make_example = functools.partial(_tfds_example, config, split)
        num_workers = min(_available_cpus(), num_examples // _MIN_EXAMPLES_PER_WORKER)
        if num_workers <= 1:
            for index in range(num_examples):
                yield index, make_example(index)
            return
        # Examples are independent pure functions of their index, so processes can share the
        # work; spawn, not fork, because the parent may already run JAX's threads.
        with concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            yield from enumerate(pool.map(make_example, range(num_examples), chunksize=100))


def prepare_embedded(
    config_name: str = "default", data_dir: str | None = None
) -> EmbeddedDetection:
    """Returns the embedded dataset builder, generating the dataset first if needed.

    Args:
      config_name: 'default' or 'tiny', or the name of another EmbeddedConfig
        in EmbeddedDetection.BUILDER_CONFIGS.
      data_dir: TFDS data directory; None means TFDS's default
        (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).

    Returns:
      A prepared builder; read it with `builder.as_data_source(split)`.

    Raises:
      ValueError: `config_name` is not one of the builder's configs.

    Large configs are generated by worker processes (spawned, as grain's data
    workers are), so a script that calls this must guard its entry point with
    `if __name__ == "__main__":`.

    Example:
      >>> builder = prepare_embedded("tiny", data_dir="/tmp/tfds")
      >>> len(builder.as_data_source("train"))
      64
    """
    known = [config.name for config in EmbeddedDetection.BUILDER_CONFIGS]
    if config_name not in known:
        raise ValueError(
            f"{EmbeddedDetection.name} has no config {config_name!r}; use one of {known} "
            f"(config.data.name='{EmbeddedDetection.name}/tiny', or '{EmbeddedDetection.name}' "
            "for the default)"
        )
    builder = EmbeddedDetection(config=config_name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        config = builder.builder_config
        logging.info(
            "Generating %s/%s (%d train + %d test examples, offline) into %s",
            builder.name,
            config.name,
            config.train_size,
            config.test_size,
            builder.data_dir,
        )
        start = time.perf_counter()
        builder.download_and_prepare()
        logging.info("Generated %s in %.1f s", builder.data_dir, time.perf_counter() - start)
    return builder

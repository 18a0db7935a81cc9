"""Tests of the input pipeline on the tiny embedded dataset, mock VOC and synthetic examples."""

import multiprocessing
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp import training
from jaxcomp.data import pipeline
from jaxcomp.data.embedded import CLASS_NAMES, TINY_CONFIG
from jaxcomp.data.pipeline import (
    DROP_KINDS,
    SANITIZER_COUNT_KEYS,
    dataset_report,
    eval_batches,
    iterate_batches,
    sanitize_example,
    train_dataset,
)
from jaxcomp.detection import encode_targets

SIZE = 64
NUM_CLASSES = len(CLASS_NAMES)
MAX_OBJECTS = 8
BATCH_KEYS = {
    "image": (np.uint8, (SIZE, SIZE, 3)),
    "boxes": (np.float32, (MAX_OBJECTS, 4)),
    "labels": (np.int32, (MAX_OBJECTS,)),
    "box_mask": (np.bool_, (MAX_OBJECTS,)),
    "image_id": (np.int64, ()),
    "valid": (np.bool_, ()),
    "num_bad_boxes": (np.int32, ()),
    "num_truncated": (np.int32, ()),
    "num_cropped": (np.int32, ()),
}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return pipeline.get_builder("jaxcomp_embedded/tiny", data_dir=data_dir)


@pytest.fixture(scope="module")
def train_source(builder):
    return builder.as_data_source("train")


def _train(source, **overrides):
    kwargs = dict(
        image_size=SIZE,
        global_batch_size=8,
        max_objects=MAX_OBJECTS,
        num_classes=NUM_CLASSES,
        seed=3,
    )
    return train_dataset(source, **{**kwargs, **overrides})


def _eval(source, **overrides):
    kwargs = dict(image_size=SIZE, batch_size=10, max_objects=MAX_OBJECTS, num_classes=NUM_CLASSES)
    return list(eval_batches(source, **{**kwargs, **overrides}))


def _assert_batches_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _concat(batches):
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def _example(image, bboxes, labels, **extra):
    return {"image": image, "objects": {"bbox": bboxes, "label": labels}, **extra}


def _rectangle_example(height=48, width=80, box=(0.25, 0.1, 0.75, 0.5)):
    """A black image with one white rectangle, annotated with its exact box."""
    image = np.zeros((height, width, 3), np.uint8)
    top, left, bottom, right = np.round(np.array(box) * [height, width, height, width]).astype(int)
    image[top:bottom, left:right] = 255
    normalized = np.array([[top / height, left / width, bottom / height, right / width]])
    return _example(image, normalized.astype(np.float32), np.array([2]))


# --- builder helpers -------------------------------------------------------------------------


def test_builder_metadata(builder):
    assert pipeline.num_classes(builder) == NUM_CLASSES
    assert pipeline.class_names(builder) == list(CLASS_NAMES)
    assert builder.builder_config.name == "tiny"


def test_get_builder_explains_how_to_prepare_a_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build voc/2007"):
        pipeline.get_builder("voc/2007", data_dir=str(tmp_path))


# --- training batches ------------------------------------------------------------------------


def test_train_batch_shapes_and_dtypes(train_source):
    batch = _train(train_source)[0]
    assert batch.keys() == BATCH_KEYS.keys()
    for key, (dtype, shape) in BATCH_KEYS.items():
        assert batch[key].dtype == dtype, key
        assert batch[key].shape == (8, *shape), key
    assert batch["valid"].all()
    assert batch["box_mask"].any(axis=1).all()


def test_targets_encoded_in_the_train_step_equal_the_numpy_encoding(train_source):
    batch = _train(train_source)[2]
    encode = jax.jit(training.batch_targets, static_argnums=1)
    on_device = encode({name: batch[name] for name in training.TRAIN_FIELDS}, NUM_CLASSES)
    rows = [
        encode_targets(boxes, labels, mask, image_size=SIZE, num_classes=NUM_CLASSES)
        for boxes, labels, mask in zip(
            batch["boxes"], batch["labels"], batch["box_mask"], strict=True
        )
    ]
    assert np.asarray(on_device["target_mask"]).sum() > 8
    for name in rows[0]:
        expected = np.stack([row[name] for row in rows])
        # The heatmap's exponent is float64 in NumPy, float32 on the device.
        np.testing.assert_allclose(on_device[name], expected, rtol=1e-5, atol=0, err_msg=name)


def test_train_batches_are_a_function_of_seed_and_step(train_source):
    first, second = _train(train_source), _train(train_source)
    for step in (0, 5, 17):  # 17 * 8 elements lies in the third epoch of 64 examples
        _assert_batches_equal(first[step], second[step])
    other_seed = _train(train_source, seed=4)[0]
    assert not np.array_equal(other_seed["image_id"], first[0]["image_id"])


def test_every_epoch_is_a_new_permutation_of_the_split(train_source):
    ds = _train(train_source, global_batch_size=16, augment=False)
    epochs = [
        np.concatenate([ds[step]["image_id"] for step in range(e * 4, e * 4 + 4)]) for e in (0, 1)
    ]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(TINY_CONFIG.train_size))
    assert not np.array_equal(epochs[0], epochs[1])


def test_resuming_sees_the_same_batches(train_source):
    ds = _train(train_source)
    from_start = list(iterate_batches(ds, start_step=0, num_steps=5))
    resumed = list(iterate_batches(_train(train_source), start_step=3, num_steps=2))
    assert len(from_start) == 5 and len(resumed) == 2
    for got, want in zip(resumed, from_start[3:], strict=True):
        _assert_batches_equal(got, want)


def test_worker_processes_yield_the_same_batches(train_source):
    ds = _train(train_source)
    with_workers = list(iterate_batches(ds, start_step=2, num_steps=3, num_workers=2))
    assert len(with_workers) == 3
    for step, batch in enumerate(with_workers, start=2):
        _assert_batches_equal(batch, ds[step])


def test_closing_batches_before_the_first_stops_the_workers(train_source):
    # The workers start when the iterator is made (they start up while the model compiles).
    batches = iterate_batches(_train(train_source), start_step=0, num_steps=4, num_workers=2)
    deadline = time.monotonic() + 60
    while not multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()
    assert list(batches) == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exhausted_batches_stay_empty(train_source, num_workers):
    for num_steps in (0, 2):
        batches = iterate_batches(_train(train_source), 0, num_steps, num_workers)
        assert len(list(batches)) == num_steps
        assert next(batches, None) is None


def test_process_shards_concatenate_to_the_global_batch(train_source):
    single = _train(train_source, global_batch_size=8)
    shards = [
        _train(train_source, global_batch_size=8, process_index=p, process_count=2) for p in (0, 1)
    ]
    for step in (0, 1, 9):
        assert shards[0][step]["image"].shape[0] == 4
        _assert_batches_equal(_concat([shard[step] for shard in shards]), single[step])


def test_indivisible_global_batch_is_rejected(train_source):
    with pytest.raises(ValueError, match="global_batch_size=6.*process_count=4"):
        _train(train_source, global_batch_size=6, process_count=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 62}, "multiple of stride"),
        ({"max_objects": 0}, "max_objects"),
        ({"seed": -1}, "seed"),
        ({"process_index": 2, "process_count": 2}, "process_index"),
    ],
)
def test_bad_arguments_are_rejected(train_source, overrides, message):
    with pytest.raises(ValueError, match=message):
        _train(train_source, **overrides)


def test_augmented_boxes_follow_the_pixels():
    source = [_rectangle_example()]
    ds = _train(source, global_batch_size=1, max_objects=2, num_classes=3)
    flipped = scaled = 0
    for step in range(24):
        batch = ds[step]
        if not batch["box_mask"][0, 0]:
            assert batch["num_cropped"][0] == 1
            continue
        ymin, xmin, ymax, xmax = batch["boxes"][0, 0]
        rows, cols = np.nonzero(batch["image"][0].max(axis=-1) > 127)
        # Bilinear resizing blurs the rectangle's edge by at most a pixel.
        np.testing.assert_allclose([rows.min(), cols.min()], [ymin, xmin], atol=1.01)
        np.testing.assert_allclose([rows.max() + 1, cols.max() + 1], [ymax, xmax], atol=1.01)
        flipped += xmin > SIZE / 2
        scaled += not np.isclose(ymax - ymin, 0.5 * 48 * SIZE / 80, atol=1)
    assert flipped > 0 and scaled > 0


def test_augmented_boxes_stay_inside_the_image(train_source):
    ds = _train(train_source)
    for step in range(4):
        batch = ds[step]
        boxes, mask = batch["boxes"][batch["box_mask"]], batch["box_mask"]
        assert np.all((boxes >= 0) & (boxes <= SIZE))
        assert np.all(boxes[:, 2:] - boxes[:, :2] >= 2)
        assert np.all(batch["boxes"][~mask] == 0)


def test_letterbox_keeps_the_aspect_ratio():
    batch = _train([_rectangle_example()], global_batch_size=1, augment=False, num_classes=3)[0]
    # 48 x 80 -> 38 x 64 at the top-left corner; below it is padding.
    assert batch["image"][0, :38].max() == 255 and batch["image"][0, 38:].max() == 0
    np.testing.assert_allclose(batch["boxes"][0, 0], [0.25 * 38, 0.1 * 64, 0.75 * 38, 0.5 * 64])


@pytest.mark.parametrize(
    "image",
    [
        np.full((20, 30), 200, np.uint8),
        np.full((20, 30, 1), 200, np.uint8),
        np.full((20, 30, 4), 200, np.uint8),
    ],
    ids=["gray", "gray1", "rgba"],
)
def test_grayscale_and_rgba_images_become_rgb(image):
    source = [_example(image, np.array([[0.1, 0.1, 0.9, 0.9]], np.float32), np.array([0]))]
    batch = _train(source, global_batch_size=1, augment=False, num_classes=3)[0]
    assert batch["image"].shape == (1, SIZE, SIZE, 3)
    assert batch["image"][0, 0, 0].tolist() == [200, 200, 200]


def test_objects_beyond_max_objects_are_truncated_largest_first():
    sides = np.linspace(0.05, 0.5, 10, dtype=np.float32)
    bboxes = np.stack([np.zeros(10), np.zeros(10), sides, sides], axis=1).astype(np.float32)
    source = [_example(np.zeros((SIZE, SIZE, 3), np.uint8), bboxes, np.arange(10) % 3)]
    batch = _train(source, global_batch_size=1, augment=False, max_objects=4, num_classes=3)[0]
    assert batch["num_truncated"][0] == 6
    np.testing.assert_allclose(batch["boxes"][0, :, 2], sides[6:] * SIZE, rtol=1e-5)


def test_background_images_are_kept():
    source = [_example(np.zeros((32, 32, 3), np.uint8), np.zeros((0, 4), np.float32), [])]
    batch = _train(source, global_batch_size=2, num_classes=3)[0]
    assert batch["valid"].all() and not batch["box_mask"].any()


def test_bad_boxes_are_counted_per_example():
    bboxes = np.array([[0.6, 0.1, 0.2, 0.5], [np.nan, 0, 1, 1], [0.2, 0.2, 0.5, 0.5]], np.float32)
    source = [_example(np.zeros((SIZE, SIZE, 3), np.uint8), bboxes, np.array([0, 1, 7]))]
    batch = _train(source, global_batch_size=1, augment=False, num_classes=3)[0]
    assert batch["num_bad_boxes"][0] == 3  # one swapped, one NaN, one with label 7 >= 3
    assert batch["box_mask"][0].sum() == 1


# --- evaluation batches ----------------------------------------------------------------------


def test_eval_batches_cover_every_example_once_with_padding(builder):
    source = builder.as_data_source("test")
    batches = _eval(source)
    assert len(batches) == 4  # 32 examples in batches of 10
    for batch in batches:
        for key, (dtype, shape) in BATCH_KEYS.items():
            assert batch[key].dtype == dtype and batch[key].shape == (10, *shape), key
    merged = _concat(batches)
    ids = merged["image_id"][merged["valid"]]
    assert sorted(ids.tolist()) == list(range(TINY_CONFIG.test_size))
    padding = ~merged["valid"]
    assert padding.sum() == 8 and np.all(padding[-8:])
    assert np.all(merged["image_id"][padding] == -1)
    assert not merged["box_mask"][padding].any() and merged["image"][padding].max() == 0


def test_eval_batches_are_the_stored_examples(builder):
    source = builder.as_data_source("test")
    merged = _concat(_eval(source))
    for row in range(TINY_CONFIG.test_size):
        example = source[row]
        np.testing.assert_array_equal(merged["image"][row], example["image"])
        boxes = np.asarray(example["objects"]["bbox"], np.float32).reshape(-1, 4)
        num = len(boxes)
        np.testing.assert_allclose(merged["boxes"][row, :num], boxes * SIZE, rtol=1e-6)
        assert merged["box_mask"][row].sum() == num


def test_eval_shards_split_the_examples_between_processes(builder):
    source = builder.as_data_source("test")
    shards = [_eval(source, batch_size=4, process_index=p, process_count=3) for p in range(3)]
    assert len({len(shard) for shard in shards}) == 1  # every process runs as many eval steps
    ids = [_concat(shard)["image_id"][_concat(shard)["valid"]] for shard in shards]
    assert sorted(np.concatenate(ids).tolist()) == list(range(TINY_CONFIG.test_size))


# --- sanitizer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bboxes, labels, kind, expected",
    [
        ([[0.1, 0.1, 0.5, 0.5]], [1, 2], "mismatched", [[0.1, 0.1, 0.5, 0.5]]),
        ([[0.1, 0.1, 0.5, 0.5], [0, 0, 1, 1]], [1], "mismatched", [[0.1, 0.1, 0.5, 0.5]]),
        ([[0.5, 0.6, 0.1, 0.2]], [1], "swapped", [[0.1, 0.2, 0.5, 0.6]]),
        ([[np.nan, 0.1, 0.5, 0.5]], [1], "non_finite", []),
        ([[0.1, -np.inf, 0.5, 0.5]], [1], "non_finite", []),
        ([[-0.2, 0.5, 0.5, 1.3]], [1], "clipped", [[0.0, 0.5, 0.5, 1.0]]),
        ([[1.2, 0.1, 1.5, 0.5]], [1], "outside", []),
        ([[0.3, 0.1, 0.3, 0.5]], [1], "degenerate", []),
        ([[0.1, 0.1, 0.5, 0.5]], [3], "bad_label", []),
        ([[0.1, 0.1, 0.5, 0.5]], [-1], "bad_label", []),
    ],
)
def test_sanitizer_repairs_or_drops_each_kind(bboxes, labels, kind, expected):
    out_boxes, out_labels, counts = sanitize_example(np.array(bboxes, np.float32), labels, 3)
    np.testing.assert_allclose(out_boxes.reshape(-1, 4), np.array(expected).reshape(-1, 4))
    assert counts[kind] == 1
    assert sum(counts[k] for k in DROP_KINDS) + counts["kept"] == max(len(bboxes), len(labels))
    assert counts["background"] == int(not expected)
    assert out_boxes.dtype == np.float32 and out_labels.dtype == np.int32


def test_sanitizer_accepts_empty_and_list_inputs():
    boxes, labels, counts = sanitize_example([], [], 3)
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    assert counts["background"] == 1 and counts["kept"] == 0
    boxes, _, counts = sanitize_example([np.array([0.1, 0.2, 0.3, 0.4])], np.array([0]), 3)
    assert boxes.shape == (1, 4) and counts["kept"] == 1


def test_sanitizer_rejects_boxes_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        sanitize_example(np.zeros((2, 3)), [0, 1], 3)


_coordinate = st.one_of(
    st.floats(-0.5, 1.5, width=32),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, 0.5]),
)


@settings(max_examples=200, deadline=None)
@given(
    bboxes=st.lists(st.tuples(*[_coordinate] * 4), max_size=8),
    labels=st.lists(st.integers(-2, 6), max_size=8),
)
def test_sanitizer_output_is_always_valid_and_counts_add_up(bboxes, labels):
    out_boxes, out_labels, counts = sanitize_example(
        np.array(bboxes, np.float32).reshape(-1, 4), labels, 5
    )
    assert set(counts) == set(SANITIZER_COUNT_KEYS)
    assert out_boxes.shape == (counts["kept"], 4) and out_labels.shape == (counts["kept"],)
    assert np.all(np.isfinite(out_boxes))
    assert np.all((out_boxes >= 0) & (out_boxes <= 1))
    assert np.all(out_boxes[:, 2:] > out_boxes[:, :2])
    assert np.all((out_labels >= 0) & (out_labels < 5))
    assert counts["kept"] + sum(counts[k] for k in DROP_KINDS) == max(len(bboxes), len(labels))
    assert max(counts["swapped"], counts["clipped"]) <= counts["fixed"] <= counts["kept"]
    assert counts["fixed"] <= counts["swapped"] + counts["clipped"]
    assert counts["background"] == int(counts["kept"] == 0)
    # Clean annotations pass through unchanged.
    again_boxes, again_labels, again = sanitize_example(out_boxes, out_labels, 5)
    np.testing.assert_array_equal(again_boxes, out_boxes)
    np.testing.assert_array_equal(again_labels, out_labels)
    assert pipeline.num_bad_boxes(again) == 0


def test_dataset_report_sums_the_counts():
    bboxes = np.array([[0.6, 0.1, 0.2, 0.5], [np.nan, 0, 1, 1], [0.2, 0.2, 0.5, 0.5]], np.float32)
    image = np.zeros((8, 8, 3), np.uint8)
    source = [
        _example(image, bboxes, np.array([0, 1, 2])),
        _example(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    ]
    report = dataset_report(source, num_classes=3, max_objects=1)
    assert report["examples"] == 2
    assert report["swapped"] == report["non_finite"] == report["background"] == 1
    assert report["kept"] == 2 and report["truncated"] == 1
    assert report["max_objects_per_image"] == 2


def test_dataset_report_on_the_embedded_dataset(train_source):
    report = dataset_report(train_source, NUM_CLASSES, MAX_OBJECTS)
    assert report["examples"] == TINY_CONFIG.train_size
    assert all(report[kind] == 0 for kind in DROP_KINDS) and report["fixed"] == 0
    assert report["background"] == 0


# --- a real TFDS dataset through mock_data ---------------------------------------------------


def test_mock_voc_runs_through_train_and_eval():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = pipeline.get_builder("voc/2007")
        assert pipeline.num_classes(builder) == 20
        source = builder.as_data_source("train")
        kwargs = dict(image_size=SIZE, max_objects=MAX_OBJECTS, num_classes=20)
        batch = train_dataset(source, global_batch_size=4, seed=0, **kwargs)[2]
        assert batch["image"].shape == (4, SIZE, SIZE, 3)
        # mock_data draws unordered boxes and label lists of another length than the boxes.
        assert batch["num_bad_boxes"].sum() > 0
        batches = list(eval_batches(source, batch_size=4, **kwargs))
    merged = _concat(batches)
    # VOC has no image/id: the source index identifies the image.
    assert merged["image_id"][merged["valid"]].tolist() == list(range(6))
    assert merged["boxes"].shape == (8, MAX_OBJECTS, 4)

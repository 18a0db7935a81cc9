"""Tests of the embedded TFDS detection dataset (tiny config, built offline into a temp dir)."""

import dataclasses

import numpy as np
import pytest

from jaxcomp.data import embedded
from jaxcomp.data.embedded import (
    CLASS_NAMES,
    DEFAULT_CONFIG,
    TINY_CONFIG,
    EmbeddedDetection,
    prepare_embedded,
    render_example,
)

SIZE = TINY_CONFIG.image_size


def _stored_examples(builder, split):
    """All examples of a split, keyed by image/id (TFDS stores them in a shuffled order)."""
    source = builder.as_data_source(split)
    return {int(example["image/id"]): example for example in source}


def _objects(example):
    bboxes = np.asarray(example["objects"]["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(example["objects"]["label"], np.int64).reshape(-1)
    return bboxes, labels


def _tight_box(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32)


def _build(config, data_dir):
    builder = EmbeddedDetection(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return prepare_embedded("tiny", data_dir=str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def train_examples(builder):
    return _stored_examples(builder, "train")


def test_configs_match_their_documentation():
    assert (DEFAULT_CONFIG.image_size, DEFAULT_CONFIG.train_size, DEFAULT_CONFIG.test_size) == (
        128,
        6000,
        500,
    )
    assert (TINY_CONFIG.image_size, TINY_CONFIG.train_size, TINY_CONFIG.test_size) == (64, 64, 32)
    assert DEFAULT_CONFIG.seed == TINY_CONFIG.seed == 0
    assert EmbeddedDetection.name == "jaxcomp_embedded"
    assert str(EmbeddedDetection.VERSION) == "1.0.0"


def test_builds_offline_with_the_voc_coco_feature_layout(builder):
    assert builder.is_prepared()
    features = builder.info.features
    assert set(features) == {"image", "image/id", "objects"}
    assert set(features["objects"].feature) == {"bbox", "label"}
    assert features["objects"]["label"].names == list(CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == TINY_CONFIG.train_size
    assert len(builder.as_data_source("test")) == TINY_CONFIG.test_size


def test_prepare_reuses_a_prepared_dataset(builder):
    again = prepare_embedded("tiny", data_dir=builder.data_dir_root)
    assert again.data_dir == builder.data_dir
    assert again.is_prepared()


def test_examples_decode_to_images_with_valid_boxes(train_examples):
    assert sorted(train_examples) == list(range(TINY_CONFIG.train_size))
    for example in train_examples.values():
        assert example["image"].shape == (SIZE, SIZE, 3)
        assert example["image"].dtype == np.uint8
        bboxes, labels = _objects(example)
        assert 1 <= len(bboxes) <= TINY_CONFIG.max_objects_per_image
        assert len(labels) == len(bboxes)
        assert np.all((bboxes >= 0) & (bboxes <= 1))
        assert np.all(bboxes[:, 2:] > bboxes[:, :2])
        assert np.all((labels >= 0) & (labels < len(CLASS_NAMES)))


def test_stored_examples_are_the_rendered_ones(train_examples):
    for index in (0, 7, 63):
        rendered = render_example(TINY_CONFIG, "train", index)
        bboxes, labels = _objects(train_examples[index])
        np.testing.assert_array_equal(train_examples[index]["image"], rendered.image)
        np.testing.assert_array_equal(bboxes, rendered.bboxes)
        np.testing.assert_array_equal(labels, rendered.labels)


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_box_is_the_tight_box_of_its_visible_mask(split):
    for index in range(20):
        example = render_example(TINY_CONFIG, split, index)
        assert example.visible_masks.shape == (len(example.labels), SIZE, SIZE)
        for box, mask in zip(example.bboxes, example.visible_masks, strict=True):
            np.testing.assert_allclose(box * SIZE, _tight_box(mask), atol=1e-4)
        # A pixel shows at most one object: later pastes hide what lies under them.
        assert example.visible_masks.sum(axis=0).max() <= 1


def test_content_spans_classes_and_object_sizes(train_examples):
    bboxes, labels = zip(*(_objects(example) for example in train_examples.values()), strict=True)
    bboxes, labels = np.concatenate(bboxes), np.concatenate(labels)
    heights = (bboxes[:, 2] - bboxes[:, 0]) * SIZE
    assert heights.min() <= 10, "small objects of ~6-10 px must occur"
    assert heights.max() <= TINY_CONFIG.max_object_fraction * SIZE + 1
    assert heights.max() >= 0.25 * SIZE
    assert len(set(labels.tolist())) >= 12
    assert np.any(labels < 10) and np.any(labels >= 10)  # digits and shapes
    counts = [len(_objects(example)[1]) for example in train_examples.values()]
    assert min(counts) == 1 and max(counts) >= 4


def test_mostly_occluded_objects_lose_their_annotation():
    def annotations(min_visible_fraction):
        config = dataclasses.replace(TINY_CONFIG, min_visible_fraction=min_visible_fraction)
        return [render_example(config, "train", index) for index in range(40)]

    # The threshold only decides which annotations stay: images and drawing are the same.
    every, default, unoccluded = annotations(0.0), annotations(0.5), annotations(1.0)
    for full, kept in [(every, default), (default, unoccluded)]:
        for full_example, kept_example in zip(full, kept, strict=True):
            np.testing.assert_array_equal(full_example.image, kept_example.image)
            assert set(map(tuple, kept_example.bboxes)) <= set(map(tuple, full_example.bboxes))
    totals = [sum(len(example.labels) for example in run) for run in (every, default, unoccluded)]
    assert totals[0] > totals[1] > totals[2], totals


def test_two_builds_with_one_seed_are_identical(builder, train_examples, tmp_path):
    rebuilt = _stored_examples(_build(TINY_CONFIG, str(tmp_path)), "train")
    assert sorted(rebuilt) == sorted(train_examples)
    for index, example in rebuilt.items():
        np.testing.assert_array_equal(example["image"], train_examples[index]["image"])
        for got, want in zip(_objects(example), _objects(train_examples[index]), strict=True):
            np.testing.assert_array_equal(got, want)


def test_another_seed_gives_other_examples(train_examples, tmp_path):
    config = dataclasses.replace(TINY_CONFIG, name="tiny_seed1", seed=1, train_size=8, test_size=8)
    other = _stored_examples(_build(config, str(tmp_path)), "train")
    for index, example in other.items():
        assert not np.array_equal(example["image"], train_examples[index]["image"])


def test_splits_differ_and_use_disjoint_digit_samples():
    train, test = render_example(TINY_CONFIG, "train", 0), render_example(TINY_CONFIG, "test", 0)
    assert not np.array_equal(train.image, test.image)
    train_pool, test_pool = embedded._digit_pools("train"), embedded._digit_pools("test")
    for train_digits, test_digits in zip(train_pool, test_pool, strict=True):
        assert len(train_digits) > len(test_digits) > 0
        assert not (train_digits[:, None] == test_digits[None]).all(axis=(2, 3)).any()


def test_render_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        render_example(TINY_CONFIG, "validation", 0)

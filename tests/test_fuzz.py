"""Property tests with random hostile inputs: the example pipeline and the path-rule parser.

The pipeline must turn any example with a uint8 image into a valid batch row
(boxes inside the image, labels in range, finite targets) and account for every
annotation it was given; the rule parser must give the first matching rule or a
ValueError that names the offending rule, and report the rules that matched nothing.
"""

import math
import re
import warnings

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp import paths
from jaxcomp.data import pipeline
from jaxcomp.detection import encode_targets

SIZE = 32
NUM_CLASSES = 4
FUZZ = settings(max_examples=40, deadline=None)

# --- the example pipeline --------------------------------------------------------------------

_coordinate = st.one_of(
    st.floats(-2.0, 3.0),
    st.sampled_from(
        [math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, 1e-30, 1e-45, 1e30, -1e30, 1e300]
    ),
)
_label = st.one_of(
    st.integers(-3, NUM_CLASSES + 2),
    st.integers(2**31, 2**40),
    st.sampled_from([1.0, 1.5, -0.5, math.nan, math.inf]),
)


@st.composite
def _examples(draw):
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([None, 1, 2, 3, 4]))
    shape = (height, width) if channels is None else (height, width, channels)
    seed = draw(st.integers(0, 2**16))
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    bboxes = draw(st.lists(st.tuples(*[_coordinate] * 4), max_size=10))
    labels = draw(st.lists(_label, max_size=10))
    return {
        "image": image,
        "objects": {"bbox": np.array(bboxes, np.float64).reshape(-1, 4), "label": labels},
    }


def _reference_counts(bboxes: np.ndarray, labels: list, num_classes: int) -> dict[str, int]:
    """What the sanitizer must count, entry by entry in plain Python (float32 boxes)."""
    counts = dict.fromkeys(pipeline.SANITIZER_COUNT_KEYS, 0)
    paired = min(len(bboxes), len(labels))
    counts["mismatched"] = max(len(bboxes), len(labels)) - paired
    with np.errstate(over="ignore"):
        boxes32 = bboxes.astype(np.float32)
    for box, label in zip(boxes32[:paired].tolist(), labels[:paired], strict=True):
        if not all(math.isfinite(value) for value in box):
            counts["non_finite"] += 1
            continue
        if not (0 <= label < num_classes and float(label).is_integer()):
            counts["bad_label"] += 1
            continue
        ymin, xmin, ymax, xmax = box
        low = [min(ymin, ymax), min(xmin, xmax)]
        high = [max(ymin, ymax), max(xmin, xmax)]
        if any(h <= lo for lo, h in zip(low, high, strict=True)):
            counts["degenerate"] += 1
            continue
        clipped_low = [min(max(v, 0.0), 1.0) for v in low]
        clipped_high = [min(max(v, 0.0), 1.0) for v in high]
        if any(h <= lo for lo, h in zip(clipped_low, clipped_high, strict=True)):
            counts["outside"] += 1
            continue
        swapped = ymin > ymax or xmin > xmax
        clipped = clipped_low != low or clipped_high != high
        counts["kept"] += 1
        counts["swapped"] += swapped
        counts["clipped"] += clipped
        counts["fixed"] += swapped or clipped
    counts["background"] = int(counts["kept"] == 0)
    return counts


@FUZZ
@given(example=_examples(), augment=st.booleans(), max_objects=st.integers(1, 6))
def test_any_example_becomes_a_valid_row_and_every_annotation_is_counted(
    example, augment, max_objects
):
    objects = example["objects"]
    boxes, labels, counts = pipeline.sanitize_example(
        objects["bbox"], objects["label"], NUM_CLASSES
    )
    assert counts == _reference_counts(objects["bbox"], objects["label"], NUM_CLASSES)
    given_entries = max(len(objects["bbox"]), len(objects["label"]))
    assert counts["kept"] + sum(counts[kind] for kind in pipeline.DROP_KINDS) == given_entries
    assert boxes.shape == (counts["kept"], 4) and labels.shape == (counts["kept"],)
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])

    batch = pipeline.train_dataset(
        [example],
        image_size=SIZE,
        global_batch_size=1,
        max_objects=max_objects,
        num_classes=NUM_CLASSES,
        seed=0,
        augment=augment,
    )[0]
    row = {key: value[0] for key, value in batch.items()}
    assert row["image"].shape == (SIZE, SIZE, 3) and row["image"].dtype == np.uint8
    mask = row["box_mask"]
    assert mask.sum() <= max_objects and not mask[mask.sum() :].any()  # objects come first
    assert mask.sum() + row["num_truncated"] + row["num_cropped"] == counts["kept"]
    assert row["num_bad_boxes"] == pipeline.num_bad_boxes(counts)
    kept = row["boxes"][mask]
    assert np.all((kept >= 0) & (kept <= SIZE)) and np.all(kept[:, 2:] > kept[:, :2])
    assert np.all(row["boxes"][~mask] == 0) and np.all(row["labels"][~mask] == 0)
    assert np.all((row["labels"][mask] >= 0) & (row["labels"][mask] < NUM_CLASSES))
    # The rows encode (the NumPy twin of the train step's encoder) to finite targets.
    targets = encode_targets(
        row["boxes"], row["labels"], mask, image_size=SIZE, num_classes=NUM_CLASSES
    )
    assert np.all(targets["target_mask"] <= mask)
    for key in ("heatmap", "size", "offset"):
        assert np.all(np.isfinite(targets[key])), key
    assert np.all((targets["heatmap"] >= 0) & (targets["heatmap"] <= 1))


# --- the path-rule parser --------------------------------------------------------------------

# Leaf-name parts include '/' and regex metacharacters: names are matched, never parsed.
_key = st.text(alphabet="ab_./*", min_size=1, max_size=3)
_trees = st.recursive(
    st.integers(0, 9),
    lambda children: st.dictionaries(_key, children, min_size=1, max_size=3),
    max_leaves=8,
)
_regex_text = st.one_of(
    st.text(alphabet="ab_./*+?()[]|\\{}09", max_size=8),
    st.sampled_from(["a{99999999999}", "(?P<g>a)(?P<g>b)", "(?<=a+)b", "\\", "a**", "[b-a]"]),
)


@st.composite
def _rules(draw, names):
    """Rules mixing exact names, prefixes and random (possibly invalid) regexes."""
    options = [_regex_text]
    if names:
        options.append(st.sampled_from(names).map(re.escape))
        options.append(st.sampled_from(names).map(lambda name: re.escape(name[:2]) + ".*"))
    patterns = draw(st.lists(st.one_of(*options), max_size=5))
    return [(pattern, index) for index, pattern in enumerate(patterns)]


def _first_compile_error(rules) -> int | None:
    for index, (pattern, _) in enumerate(rules):
        try:
            re.compile(pattern)
        except (re.error, OverflowError):
            return index
    return None


@FUZZ
@given(data=st.data(), tree=_trees)
def test_rules_give_the_first_match_and_report_the_unmatched(data, tree):
    names = paths.leaf_names(tree)
    rules = data.draw(_rules(names))
    broken = _first_compile_error(rules)
    if broken is not None:
        for on_unmatched in ("error", "warn", "ignore"):
            with pytest.raises(ValueError, match=rf"^rule {broken} regex .* does not compile"):
                paths.resolve_rules(tree, rules, on_unmatched=on_unmatched)
        return
    compiled = [re.compile(pattern) for pattern, _ in rules]
    first = [next((i for i, rx in enumerate(compiled) if rx.fullmatch(n)), None) for n in names]
    unmatched = [rules[i][0] for i in range(len(rules)) if i not in first]

    values = paths.resolve_rules(tree, rules, on_unmatched="ignore")
    assert jax.tree.leaves(values, is_leaf=lambda value: value is None) == first
    assert jax.tree.structure(values, is_leaf=lambda v: v is None) == jax.tree.structure(tree)
    reported = re.escape(f"rules matched no leaf: {unmatched}")
    if unmatched:
        with pytest.raises(ValueError, match=reported):
            paths.resolve_rules(tree, rules, on_unmatched="error")
        with pytest.warns(UserWarning, match=reported):
            assert paths.resolve_rules(tree, rules, on_unmatched="warn") == values
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert paths.resolve_rules(tree, rules, on_unmatched="warn") == values
            assert paths.resolve_rules(tree, rules, on_unmatched="error") == values


_not_a_rule = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.tuples(st.text(max_size=3)),
    st.tuples(st.text(max_size=3), st.integers(), st.integers()),
    st.tuples(st.integers(), st.integers()),
)


@FUZZ
@given(
    good=st.lists(st.tuples(st.sampled_from(["a", ".*", "b/.*"]), st.integers()), max_size=3),
    bad=_not_a_rule,
    tail=st.lists(st.tuples(_regex_text, st.integers()), max_size=2),
)
def test_malformed_rules_are_named(good, bad, tail):
    rules = [*good, bad, *tail]
    with pytest.raises(ValueError, match=rf"^rule {len(good)} must be a \(regex, value\) pair"):
        paths.compile_rules(rules)


@pytest.mark.parametrize("rules", [".*/kernel", b".*", {".*": 1}, 0.5, None])
def test_rules_that_are_not_a_list_are_refused(rules):
    with pytest.raises(ValueError, match=r"rules must be a list of \(regex, value\) pairs"):
        paths.compile_rules(rules)

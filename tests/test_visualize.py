"""Detection drawings and per-layer error plots: what is drawn, and the numbers behind them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import patches

from jaxcomp import quant, visualize

IMAGE = np.zeros((64, 64, 3), np.uint8)
BOXES = np.array([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0]])
LABELS = np.array([1, 0, 2])
SCORES = np.array([0.9, 0.2, 0.5])
NAMES = ["zero", "one", "two"]


def _rectangles(axis):
    return [p for p in axis.patches if isinstance(p, patches.Rectangle)]


def test_draw_detections_draws_boxes_above_threshold_with_names_and_scores():
    figure = visualize.draw_detections(IMAGE, BOXES, LABELS, SCORES, NAMES, score_threshold=0.3)
    axis = figure.axes[0]
    rectangles = _rectangles(axis)
    # Best score first: box 0 (0.9), then box 2 (0.5); box 1 (0.2) is below the threshold.
    assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rectangles] == [
        (3.0, 2.0, 37.0, 28.0),
        (0.0, 0.0, 8.0, 8.0),
    ]
    assert [text.get_text() for text in axis.texts] == ["one 0.90", "two 0.50"]


def test_draw_detections_ground_truth_draws_every_box_with_label_numbers():
    figure = visualize.draw_detections(IMAGE, BOXES, LABELS, max_boxes=2)
    assert len(_rectangles(figure.axes[0])) == 2
    assert [text.get_text() for text in figure.axes[0].texts] == ["1", "0"]


@settings(max_examples=30, deadline=None)
@given(
    scores=st.lists(st.floats(0, 1), min_size=0, max_size=12),
    threshold=st.floats(0, 1),
    max_boxes=st.integers(0, 12),
)
def test_draws_the_best_boxes_above_threshold(scores, threshold, max_boxes):
    scores = np.asarray(scores, np.float32)
    chosen = visualize._boxes_to_draw(scores, len(scores), threshold, max_boxes)
    expected = min(max_boxes, int((scores >= threshold).sum()))
    assert len(chosen) == expected
    assert all(scores[i] >= threshold for i in chosen)
    assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
    for index in set(range(len(scores))) - set(chosen):
        # A box left out scores below the threshold, or no better than the worst drawn.
        assert scores[index] < threshold or (
            len(chosen) == max_boxes and (not chosen or scores[index] <= scores[chosen[-1]])
        )


def test_draw_detections_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 boxes but 2 labels"):
        visualize.draw_detections(IMAGE, BOXES, LABELS[:2])
    with pytest.raises(ValueError, match=r"image must be \[H, W, 3\]"):
        visualize.draw_detections(IMAGE[..., 0], BOXES, LABELS)


def test_detection_grid_one_row_per_panel_masking_padded_ground_truth():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    truth = {
        "boxes": np.tile(BOXES[None], (2, 1, 1)),
        "labels": np.tile(LABELS[None], (2, 1)),
        "box_mask": np.array([[True, True, False], [True, False, False]]),
    }
    detections = {
        "boxes": np.tile(BOXES[None], (2, 1, 1)),
        "classes": np.tile(LABELS[None], (2, 1)),
        "scores": np.tile(SCORES[None], (2, 1)),
    }
    figure = visualize.detection_grid(images, {"truth": truth, "model": detections}, NAMES)
    counts = [len(_rectangles(axis)) for axis in figure.axes]
    assert counts == [2, 1, 2, 2]
    assert figure.axes[0].get_title() == "truth" and figure.axes[2].get_title() == "model"
    with pytest.raises(ValueError, match="needs 'classes' or 'labels'"):
        visualize.detection_grid(images, {"bad": {"boxes": truth["boxes"]}})


def _params():
    key = jax.random.key(0)
    return {
        "conv": {"kernel": jax.random.normal(key, (3, 3, 4, 8)), "bias": jnp.ones(8)},
        "dense": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (8, 2))},
    }


def test_layer_errors_measures_kernels_only_and_lower_bits_err_more():
    params = _params()
    rules = [(r"conv/kernel", True)]
    int8 = visualize.layer_errors(params, quant.fake_quant_weights(params, rules, bits=8))
    int4 = visualize.layer_errors(params, quant.fake_quant_weights(params, rules, bits=4))
    assert [row["name"] for row in int8] == ["conv/kernel", "dense/kernel"]
    assert int8[0]["changed"] and not int8[1]["changed"]
    assert int8[1]["relative_error"] == 0.0 and int8[1]["sqnr_db"] == float("inf")
    assert 0 < int8[0]["relative_error"] < int4[0]["relative_error"] < 0.5
    np.testing.assert_allclose(int8[0]["sqnr_db"], -20 * np.log10(int8[0]["relative_error"]))


def test_layer_errors_of_a_known_perturbation():
    reference = {"w": np.array([[3.0, 4.0]])}
    rows = visualize.layer_errors(reference, {"w": np.array([[3.0, 4.5]])})
    np.testing.assert_allclose(rows[0]["relative_error"], 0.1)
    with pytest.raises(ValueError, match="structure of reference"):
        visualize.layer_errors(reference, {"v": np.zeros((1, 2))})


def test_plot_layer_errors_one_bar_per_kernel_and_series():
    params = _params()
    series = {
        f"int{bits}": visualize.layer_errors(
            params, quant.fake_quant_weights(params, [(r".*kernel", True)], bits=bits)
        )
        for bits in (8, 4)
    }
    figure = visualize.plot_layer_errors(series, title="errors")
    axis = figure.axes[0]
    assert len(axis.patches) == 4
    assert [label.get_text() for label in axis.get_yticklabels()] == ["conv", "dense"]
    assert axis.get_title() == "errors"
    with pytest.raises(ValueError, match="no layer differs"):
        visualize.plot_layer_errors(visualize.layer_errors(params, params))
    with pytest.raises(ValueError, match="other layers"):
        visualize.plot_layer_errors({"a": series["int8"], "b": series["int8"][:1]})

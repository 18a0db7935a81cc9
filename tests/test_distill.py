"""Distillation losses against their published formulas (numpy), and the detector glue."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp import distill
from jaxcomp.detection.distill import (
    DistillSpec,
    center_weights,
    distillation_loss,
    peak_weights,
)


def _random(seed, shape, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _np_log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("name", sorted(distill.LOSSES))
def test_every_registered_loss_is_zero_when_student_equals_teacher(name):
    x = _random(0, (2, 4, 4, 3))
    loss = distill.get_loss(name)(x, x, temperature=2.0, weights=None)
    assert abs(float(loss)) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("axis", [-1, 1])
def test_soft_target_kl_matches_torch_batchmean_formula(temperature, axis):
    student, teacher = _random(1, (4, 5, 3)), _random(2, (4, 5, 3))
    # torch: kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2,
    # where kl_div(input, target) = sum(target * (log(target) - input)) / batch.
    log_q = _np_log_softmax(np.asarray(student, np.float64) / temperature, axis)
    log_p = _np_log_softmax(np.asarray(teacher, np.float64) / temperature, axis)
    expected = np.sum(np.exp(log_p) * (log_p - log_q)) / 4 * temperature**2
    got = distill.soft_target_kl(student, teacher, temperature, axis=axis)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert expected > 0.01  # the case is not trivially zero


def test_sigmoid_soft_target_matches_binary_kl_and_weights_select_elements():
    student, teacher, temperature = _random(3, (2, 3, 3, 4)), _random(4, (2, 3, 3, 4)), 2.0
    s, t = np.asarray(student, np.float64) / temperature, np.asarray(teacher, np.float64) / 2
    p = 1 / (1 + np.exp(-t))
    kl = p * (_np_log_sigmoid(t) - _np_log_sigmoid(s)) + (1 - p) * (
        _np_log_sigmoid(-t) - _np_log_sigmoid(-s)
    )
    got = distill.sigmoid_soft_target(student, teacher, temperature)
    np.testing.assert_allclose(float(got), temperature**2 * kl.mean(), rtol=1e-5)
    weights = np.zeros((2, 3, 3, 1))
    weights[0, 1, 2] = 1.0
    weighted = distill.sigmoid_soft_target(student, teacher, temperature, weights=weights)
    np.testing.assert_allclose(float(weighted), temperature**2 * kl[0, 1, 2].mean(), rtol=1e-5)


def test_cwd_matches_channel_softmax_over_positions():
    student, teacher, tau = _random(5, (2, 3, 4, 5)), _random(6, (2, 3, 4, 5)), 3.0
    s = np.asarray(student, np.float64).reshape(2, 12, 5) / tau
    t = np.asarray(teacher, np.float64).reshape(2, 12, 5) / tau
    log_p, log_q = _np_log_softmax(t, 1), _np_log_softmax(s, 1)
    expected = tau**2 * np.sum(np.exp(log_p) * (log_p - log_q)) / (2 * 5)
    np.testing.assert_allclose(float(distill.cwd(student, teacher, tau)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="takes no weights"):
        distill.cwd(student, teacher, tau, weights=jnp.ones((2, 3, 4, 1)))


def test_pkd_is_mse_of_standardized_features_and_ignores_scale():
    student, teacher = _random(7, (2, 4, 4, 3)), _random(8, (2, 4, 4, 3))

    def standardize(x):
        x = np.asarray(x, np.float64)
        return (x - x.mean(axis=(0, 1, 2))) / (x.std(axis=(0, 1, 2)) + 1e-6)

    expected = 0.5 * np.mean((standardize(student) - standardize(teacher)) ** 2)
    np.testing.assert_allclose(float(distill.pkd(student, teacher)), expected, rtol=1e-4)
    np.testing.assert_allclose(float(distill.pkd(10 * student - 3, teacher)), expected, rtol=1e-3)


def test_l1_imitation_weighted_mean_over_positions():
    student = jnp.zeros((1, 2, 2, 2))
    teacher = jnp.arange(8.0).reshape(1, 2, 2, 2)
    np.testing.assert_allclose(float(distill.l1_imitation(student, teacher)), 28.0 / 4)
    weights = jnp.array([0.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(
        float(distill.l1_imitation(student, teacher, weights=weights)), 6.0 + 7.0
    )


@pytest.mark.parametrize("name", sorted(distill.LOSSES))
def test_gradient_reaches_the_student_only(name):
    student, teacher = _random(9, (2, 4, 4, 3)), _random(10, (2, 4, 4, 3))
    loss = distill.get_loss(name)
    grad_student, grad_teacher = jax.grad(
        lambda s, t: loss(s, t, temperature=2.0, weights=None), argnums=(0, 1)
    )(student, teacher)
    assert float(jnp.abs(grad_student).max()) > 0
    assert float(jnp.abs(grad_teacher).max()) == 0.0


def test_temperature_squared_keeps_gradient_magnitude_across_temperatures():
    student, teacher = _random(11, (8, 10), 1.0), _random(12, (8, 10), 1.0)
    norms = {}
    for temperature in (2.0, 4.0, 8.0):
        grad = jax.grad(lambda s, t=temperature: distill.soft_target_kl(s, teacher, t))(student)
        norms[temperature] = float(jnp.linalg.norm(grad))
    # Without the T^2 factor each doubling of T would divide the gradient by ~4.
    assert 0.7 < norms[4.0] / norms[2.0] < 1.3
    assert 0.85 < norms[8.0] / norms[4.0] < 1.15


def test_bad_temperature_and_unknown_loss_are_clear_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        distill.soft_target_kl(x, x, 0.0)
    with pytest.raises(ValueError, match="unknown distillation loss 'kld'.*registered"):
        distill.get_loss("kld")
    with pytest.raises(ValueError, match="shapes differ.*adapter"):
        distill.pkd(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 4)))


def test_adapter_maps_widths_and_rejects_the_wrong_input():
    adapter = distill.init_adapter(jax.random.key(0), 3, 5)
    features = _random(13, (2, 4, 4, 3))
    out = distill.apply_adapter(adapter, features)
    assert out.shape == (2, 4, 4, 5)
    np.testing.assert_allclose(out, features @ adapter["kernel"], rtol=1e-6)
    with pytest.raises(ValueError, match="takes 3 channels but the features have 4"):
        distill.apply_adapter(adapter, jnp.zeros((1, 2, 2, 4)))


def test_spec_rejects_negative_weights_unknown_names_and_bad_choices():
    with pytest.raises(ValueError, match="feature_weight must be >= 0.*got -1"):
        DistillSpec(feature_weight=-1.0)
    with pytest.raises(ValueError, match="unknown distillation loss 'focal'"):
        DistillSpec(heatmap_loss="focal")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillSpec(temperature=-2.0)
    with pytest.raises(ValueError, match="heatmap_weighting='teachers'"):
        DistillSpec(heatmap_weighting="teachers")


def test_peak_and_center_weights_mark_the_right_cells():
    logits = jnp.full((1, 4, 4, 2), -5.0).at[0, 1, 2, 1].set(3.0).at[0, 3, 0, 0].set(-4.0)
    peaks = peak_weights(logits, threshold=0.1)
    assert peaks.shape == (1, 4, 4, 1)
    assert float(peaks.sum()) == 1.0 and float(peaks[0, 1, 2, 0]) == 1.0
    centres = center_weights(jnp.array([[6, 13, 0]]), jnp.array([[1.0, 1.0, 0.0]]), 4, 4)
    assert float(centres.sum()) == 2.0
    assert float(centres[0, 1, 2, 0]) == 1.0 and float(centres[0, 3, 1, 0]) == 1.0


def _outputs(seed, classes=3):
    return {
        "heatmap": _random(seed, (2, 8, 8, classes)),
        "size": _random(seed + 1, (2, 8, 8, 2)),
        "offset": _random(seed + 2, (2, 8, 8, 2)),
    }


def test_detector_distillation_loss_terms_zero_for_equal_outputs_and_weighted_sum():
    batch = {
        "heatmap": jnp.zeros((2, 8, 8, 3)).at[:, 2, 2, 0].set(1.0),
        "center_index": jnp.array([[18], [18]]),
        "target_mask": jnp.ones((2, 1)),
    }
    features = _random(20, (2, 8, 8, 4))
    spec = DistillSpec(regression_at="gt_centers", heatmap_weighting="foreground")
    teacher = _outputs(0)
    neck = {"neck": features}  # the default spec compares the neck's map
    total, terms = distillation_loss(teacher, teacher, batch, spec, neck, neck)
    assert sorted(terms) == [
        "distill_feature",
        "distill_heatmap",
        "distill_offset",
        "distill_size",
    ]
    assert abs(float(total)) < 1e-5
    student = _outputs(10)
    total, terms = distillation_loss(student, teacher, batch, spec, {"neck": features + 1.0}, neck)
    expected = (
        terms["distill_heatmap"]
        + 0.1 * terms["distill_size"]
        + terms["distill_offset"]
        + terms["distill_feature"]
    )
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(terms["distill_heatmap"]) > 0
    no_features = DistillSpec(feature_weight=0.0, size_weight=0.0)
    _, terms = distillation_loss(student, teacher, batch, no_features)
    assert sorted(terms) == ["distill_heatmap", "distill_offset"]


def test_detector_distillation_names_the_mismatched_head():
    with pytest.raises(ValueError, match=r"'heatmap' is \(2, 8, 8, 3\) for the student"):
        distillation_loss(_outputs(0), _outputs(0, classes=5), {}, DistillSpec(feature_weight=0))

"""Metric functions against hand-computed values, plus the properties the spec implies."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segattr_onnx.metrics import (
    StepMasks,
    area_under_curve,
    attribution_quality,
    classify_peaks,
    excess_prediction,
    image_preserved,
    masked_input,
    prediction_preserved,
    relative_entropy,
    relative_foreground_attribution,
    scale_map,
)

probabilities = arrays(np.float64, (4, 5), elements=st.floats(0, 1))


def test_prediction_and_excess_by_hand() -> None:
    p = np.array([0.5, 1.0, 0.0, 0.5])
    q = np.array([0.25, 1.0, 0.5, 1.0])
    assert prediction_preserved(p, q) == pytest.approx((0.25 + 1.0 + 0.0 + 0.5) / 2.0)
    assert excess_prediction(p, q) == pytest.approx((0.5 + 0.5) / 2.0)


@settings(max_examples=50, deadline=None)
@given(probabilities, probabilities)
def test_prediction_preserved_is_a_share(p, q) -> None:
    if p.sum() == 0:
        return
    assert 0.0 <= prediction_preserved(p, q) <= 1.0 + 1e-12
    assert prediction_preserved(p, p) == pytest.approx(1.0)
    assert excess_prediction(p, p) == 0.0


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, (3, 4), elements=st.floats(-5, 5)))
def test_image_preserved_is_the_mean_of_the_scaled_map(values) -> None:
    for variant in ("p1", "p2"):
        scaled = scale_map(values, variant)
        assert scaled.min() >= 0.0 and scaled.max() <= 1.0
        assert image_preserved(scaled) == pytest.approx(scaled.mean())


def test_scaling_rules() -> None:
    values = np.array([-1.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(scale_map(values, "p1"), [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(scale_map(values, "p2"), [0.0, 0.0, 1 / 3, 1.0])  # clipped at 0


def test_masked_input_broadcasts_over_channels_with_either_baseline() -> None:
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3) + 1.0  # NCHW, 2 channels
    scaled = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.25]])
    zero = masked_input(x, scaled, channel_axis=1)
    np.testing.assert_allclose(zero[0, 1], x[0, 1] * scaled)
    low = masked_input(x, scaled, channel_axis=1, baseline="min")
    np.testing.assert_allclose(low[0, 0], 1.0 + scaled * (x[0, 0] - 1.0))
    channels_last = masked_input(x.transpose(0, 2, 3, 1), scaled, channel_axis=3)
    np.testing.assert_allclose(channels_last[0, ..., 1], x[0, 1] * scaled)


def test_relative_entropy_compares_compressibility() -> None:
    x = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    raw = x.tobytes()
    expected = (len(zlib.compress(np.zeros_like(x).tobytes(), 6)) / len(raw)) / (
        len(zlib.compress(raw, 6)) / len(raw)
    )
    assert relative_entropy(x, np.zeros_like(x)) == pytest.approx(expected)
    assert relative_entropy(x, x) == pytest.approx(1.0)
    assert relative_entropy(x, np.zeros_like(x)) < 0.2  # nothing kept: compresses to nothing


def test_relative_foreground_attribution_by_hand_and_positive_on_the_target() -> None:
    labels = np.array([[0, 0, 3], [3, 1, 2]])
    scaled = np.array([[0.2, 0.4, 1.0], [0.8, 0.5, 0.1]])
    assert relative_foreground_attribution(scaled, labels) == pytest.approx(0.9 - 0.3)
    assert relative_foreground_attribution((labels == 3).astype(float), labels) == 1.0


def test_attribution_quality_formula() -> None:
    assert attribution_quality(0.8, 0.5, 0.3, 0.5) == pytest.approx(0.8 / 0.5 + 0.3 * 1.5)


def _labels_with_spikes() -> np.ndarray:
    labels = np.zeros((40, 40), np.int64)
    labels[5:15, 5:15] = 3  # target
    labels[15:18, 9:11] = 2  # spike under the target
    labels[25:35, 25:35] = 1  # distractor
    return labels


def test_peaks_only_on_label_2_give_epa_1() -> None:
    labels = _labels_with_spikes()
    scaled = np.zeros(labels.shape)
    scaled[labels == 2] = 1.0
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (1, 0)
    assert verdicts.external_peak_attribution == 1.0


def test_peaks_elsewhere_are_misses_and_epa_counts_both() -> None:
    labels = _labels_with_spikes()
    scaled = np.zeros(labels.shape)
    scaled[28:31, 28:31] = 1.0  # on the distractor: touches no label 2
    assert classify_peaks(scaled, labels).external_peak_attribution == 0.0
    scaled[labels == 2] = 1.0
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (1, 1)
    assert verdicts.external_peak_attribution == 0.5


def test_a_peak_far_from_the_spike_it_touches_is_a_miss() -> None:
    labels = _labels_with_spikes()
    scaled = np.zeros(labels.shape)
    scaled[16, 10:40] = 1.0  # a long streak grazing the spike: centroid 14 voxels away
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (0, 1)


def test_step_masks_and_auc() -> None:
    scaled = np.array([[0.1, 0.9], [0.5, 0.3]])
    masks = StepMasks(scaled, steps=4)
    np.testing.assert_array_equal(masks.deletion(0), np.ones((2, 2), bool))
    np.testing.assert_array_equal(masks.deletion(1), [[True, False], [True, True]])
    np.testing.assert_array_equal(masks.insertion(2), [[False, True], [True, False]])
    np.testing.assert_array_equal(masks.insertion(4), np.ones((2, 2), bool))
    assert area_under_curve(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert area_under_curve(np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)


def test_epa_hit_by_median_coverage_of_the_spikes_it_overlaps() -> None:
    """A peak mostly off the spike (share ≤ 25 %) but covering it whole is still a hit."""
    labels = np.zeros((64, 64), np.int64)
    labels[10:20, 10:20] = 3
    labels[30:32, 30:32] = 2  # a 4-pixel spike
    scaled = np.zeros(labels.shape)
    scaled[27:35, 27:35] = 0.5  # 64 pixels around it: share 4/64
    scaled[28:34, 28:34] = 1.0
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (1, 0)


def test_epa_hit_by_three_fully_covered_spikes() -> None:
    labels = np.zeros((64, 64), np.int64)
    labels[5:15, 5:15] = 3
    for column in (27, 31, 35):
        labels[31, column : column + 2] = 2  # three two-pixel spikes
    scaled = np.zeros(labels.shape)
    scaled[26:38, 26:38] = 1.0  # 144 pixels: share 6/144, all three fully covered
    assert classify_peaks(scaled, labels).hits == 1
    # Half of each spike uncovered: coverage 0.5 each, none ≥ 0.9, share tiny: a miss.
    for column in (28, 32, 36):
        scaled[31, column] = 0.0
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (0, 1)


def test_peaks_below_the_minimum_size_are_ignored() -> None:
    from segattr_onnx.metrics.peaks import minimum_peak_size

    assert minimum_peak_size(128**3, 3) == 100 and minimum_peak_size(128**2, 2) == 22
    assert minimum_peak_size(64**3, 3) == round(100 / 8)
    labels = np.zeros((128, 128), np.int64)
    labels[10:40, 10:40] = 3
    scaled = np.zeros(labels.shape)
    scaled[100:104, 100:104] = 1.0  # 16 pixels < 22: not a peak
    verdicts = classify_peaks(scaled, labels)
    assert (verdicts.hits, verdicts.misses) == (0, 0)


def test_curve_order_breaks_ties_in_a_fixed_random_order_not_raster() -> None:
    from segattr_onnx.metrics.curves import voxel_order

    scaled = np.zeros((16, 16))
    scaled[8, 8] = 1.0
    order = voxel_order(scaled)
    assert order[0] == 8 * 16 + 8
    assert not np.array_equal(order[1:20], np.arange(19))  # ties are not taken in raster order
    np.testing.assert_array_equal(order, voxel_order(scaled))  # but always the same way


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_epa_is_1_whenever_the_only_peaks_sit_on_label_2(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.zeros((48, 48), np.int64)
    labels[5:20, 5:20] = 3
    top, left = rng.integers(24, 42, size=2)
    labels[top : top + 5, left : left + 5] = 2  # 25 pixels: over 1 % of the image
    scaled = rng.uniform(0.0, 0.1, labels.shape)
    scaled[labels == 2] = rng.uniform(0.9, 1.0, 25)
    assert classify_peaks(scaled, labels).external_peak_attribution == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_rfa_is_positive_when_the_map_is_the_target_mask(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (12, 12))
    labels[0, 0], labels[0, 1] = 0, 3
    assert relative_foreground_attribution((labels == 3).astype(float), labels) > 0

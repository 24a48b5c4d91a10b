"""Model against model (``segattr_onnx.compare``): the agreement figures against independent
references, and fp16 and int8 builds of a fixture, made here, against its float32 original."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from segattr_onnx import Explainer
from segattr_onnx.compare import COMPARE_FIGURES, CompareError, compare_models
from segattr_onnx.metrics.agreement import (
    dice,
    map_agreement,
    max_abs_difference,
    spearman,
    top_fraction_iou,
)
from segattr_onnx.metrics.scoring import score_map
from tests.conftest import fixture, run_reference
from tests.model_variants import fp16_copy, int8_copy, randomised_decoder

SPEC = fixture("unet2d_torchscript")
SHAPE = SPEC.test_shape  # (1, 1, 32, 32)
CASE_SEEDS = (0, 1, 2)
CALIBRATION_SEED = 1000  # int8 ranges from other inputs than the cases explained

# Worst case over benchmarks/compare_precisions.py's 8 cases (its first three are these), with
# a margin: fp16 gradcam 0.9997 / 0.962 / 0.014 / 0.9995, kwc 1.0 / 1.0 / 0.0005 / 0.9995;
# int8 gradcam 0.986 / 0.791 / 0.112 / 0.996, kwc 0.997 / 0.873 / 0.042 / 0.996.
BOUNDS = {
    "fp16": {"spearman": 0.999, "top10_iou": 0.9, "max_abs_diff": 0.05, "dice": 0.99},
    "int8": {"spearman": 0.97, "top10_iou": 0.65, "max_abs_diff": 0.25, "dice": 0.98},
}


# --- the agreement functions against independent references ----------------------------------

small_maps = st.integers(min_value=2, max_value=40).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, n, elements=st.integers(0, 5).map(float)),  # many ties
        arrays(np.float64, n, elements=st.floats(0, 1, width=32)),
    )
)


@settings(max_examples=60, deadline=None)
@given(small_maps)
def test_spearman_is_scipys_rank_correlation_ties_included(pair) -> None:
    tied, smooth = pair
    for a, b in ((tied, smooth), (smooth, tied), (tied, tied[::-1])):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_of_constant_maps_follows_its_stated_convention() -> None:
    flat, ramp = np.zeros((4, 4)), np.arange(16.0).reshape(4, 4)
    assert spearman(flat, flat + 3) == 1.0  # the same (empty) order
    assert spearman(flat, ramp) == 0.0  # no order to share; the formula gives NaN
    with pytest.raises(ValueError):
        spearman(flat, np.zeros((4, 5)))
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(stats.spearmanr(flat.ravel(), ramp.ravel()).statistic)


def _brute_top(values: np.ndarray, fraction: float) -> set[int]:
    """Voxels at or above the ⌈fraction·V⌉-th largest value (sorted by hand), minus those at
    the minimum."""
    flat = [float(v) for v in np.ravel(values)]
    count = max(1, math.ceil(fraction * len(flat)))
    threshold = sorted(flat, reverse=True)[count - 1]
    return {i for i, v in enumerate(flat) if v >= threshold and v > min(flat)}


@settings(max_examples=60, deadline=None)
@given(small_maps, st.sampled_from([0.1, 0.25, 0.5, 1.0]))
def test_top_fraction_iou_is_the_brute_force_overlap_of_the_top_sets(pair, fraction) -> None:
    a, b = pair
    top_a, top_b = _brute_top(a, fraction), _brute_top(b, fraction)
    union = top_a | top_b
    expected = len(top_a & top_b) / len(union) if union else 1.0
    assert top_fraction_iou(a, b, fraction) == pytest.approx(expected, abs=1e-15)


def test_top_fraction_iou_ignores_the_background_of_sparse_maps() -> None:
    """Two maps hot on disjoint 5 % of a zero background share no top voxel."""
    left, right = np.zeros(400), np.zeros(400)
    left[:20], right[-20:] = 1.0, 1.0
    assert top_fraction_iou(left, right) == 0.0
    assert top_fraction_iou(left, left) == 1.0
    assert top_fraction_iou(np.zeros(400), np.zeros(400)) == 1.0  # nothing attributed by either


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(arrays(np.bool_, n), arrays(np.bool_, n), arrays(np.float64, n))
    )
)
def test_dice_counts_and_max_abs_difference_looks_at_every_voxel(masks) -> None:
    left, right, values = masks
    both = sum(1 for x, y in zip(left, right, strict=True) if x and y)
    total = sum(1 for x in left if x) + sum(1 for y in right if y)
    assert dice(left, right) == pytest.approx(1.0 if total == 0 else 2 * both / total)
    finite = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0) % 10
    other = finite[::-1]
    expected = max(abs(float(x) - float(y)) for x, y in zip(finite, other, strict=True))
    assert max_abs_difference(finite, other) == expected


def test_map_agreement_reports_the_three_map_figures_that_checks_name() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random((8, 8, 8)), rng.random((8, 8, 8))
    figures = map_agreement(a, b)
    assert set(figures) == {"spearman", "top10_iou", "max_abs_diff"} <= COMPARE_FIGURES
    assert figures["spearman"] == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic)
    with pytest.raises(ValueError, match="shapes"):
        spearman(a, b[:4])


# --- fp16 and int8 builds of the fixture ------------------------------------------------------


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("builds")
    rng = np.random.default_rng(CALIBRATION_SEED)
    calibration = [rng.standard_normal(SHAPE) for _ in range(8)]
    random = folder / "random_decoder.onnx"
    randomised_decoder(SPEC.path, random, SHAPE, seed=4)
    return {
        "fp16": fp16_copy(SPEC.path, folder / "fp16.onnx"),
        "int8": int8_copy(SPEC.path, folder / "int8.onnx", calibration),
        "random": random,
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("cases")
    paths = []
    for seed in CASE_SEEDS:
        paths.append(folder / f"case{seed}.npy")
        np.save(paths[-1], SPEC.input(seed)[0])
    return paths


def _ort_mask(model: Path, x: np.ndarray) -> np.ndarray:
    """Class 1's predicted mask from ONNX Runtime alone, with no graph optimisation (the int8
    build's Q/DQ pairs computed as the ONNX spec says, not by ORT's integer kernels, which
    saturate on CPUs without VNNI): the fixture's logits (1, 2, H, W) go through softmax, so
    the mask is where class 1 has the larger logit."""
    proto = onnx.load(model)
    (logits,) = run_reference(proto, {proto.graph.input[0].name: x})
    return np.argmax(logits[0], axis=0) == 1


@pytest.mark.parametrize("build", ["fp16", "int8"])
@pytest.mark.parametrize("method", ["gradcam", "kwc"])
def test_fp16_and_int8_builds_explain_like_the_float32_model(
    builds: dict[str, Path], cases: list[Path], build: str, method: str
) -> None:
    comparison = compare_models(SPEC.path, builds[build], cases, method, provider="cpu")
    reference = Explainer(SPEC.path, provider="cpu")
    candidate = Explainer(builds[build], provider="cpu")
    bounds = BOUNDS[build]
    for path, case in zip(cases, comparison.cases, strict=True):
        x = np.load(path)
        map_a = reference.explain(x, method).map
        map_b = candidate.explain(x, method).map
        # The figures are those of each model's own map and own prediction.
        rho = stats.spearmanr(map_a.ravel(), map_b.ravel()).statistic
        assert case.spearman == pytest.approx(rho, abs=1e-12)
        top_a, top_b = _brute_top(map_a, 0.1), _brute_top(map_b, 0.1)
        assert case.top10_iou == pytest.approx(len(top_a & top_b) / len(top_a | top_b))
        assert case.max_abs_diff == pytest.approx(float(np.abs(map_a - map_b).max()))
        mask_a, mask_b = _ort_mask(SPEC.path, x[None]), _ort_mask(builds[build], x[None])
        counted = 2 * int((mask_a & mask_b).sum()) / int(mask_a.sum() + mask_b.sum())
        assert case.dice == pytest.approx(counted)
        # And they are close: the build explains what the original explains.
        assert case.spearman >= bounds["spearman"], case
        assert case.top10_iou >= bounds["top10_iou"], case
        assert case.max_abs_diff <= bounds["max_abs_diff"], case
        assert case.dice >= bounds["dice"], case


def test_the_same_bounds_catch_a_model_whose_decoder_was_randomised(
    builds: dict[str, Path], cases: list[Path]
) -> None:
    for method in ("gradcam", "kwc"):
        comparison = compare_models(SPEC.path, builds["random"], cases, method, provider="cpu")
        assert all(case.spearman < BOUNDS["int8"]["spearman"] for case in comparison.cases)
        assert all(case.top10_iou < BOUNDS["int8"]["top10_iou"] for case in comparison.cases)


def test_score_deltas_are_b_minus_a_of_each_map_scored_on_its_own_model(
    builds: dict[str, Path], cases: list[Path]
) -> None:
    comparison = compare_models(
        SPEC.path, builds["int8"], cases[:1], "gradcam", steps=5, provider="cpu"
    )
    (case,) = comparison.cases
    x = np.load(cases[0])
    scores = {}
    for side, model in (("a", SPEC.path), ("b", builds["int8"])):
        explainer = Explainer(model, provider="cpu")
        attribution = explainer.explain(x, "gradcam").map
        scores[side] = score_map(explainer, x, attribution, steps=5).to_dict()
    for name in ("prediction_preserved", "image_preserved", "excess_prediction", "deletion_auc"):
        expected = scores["b"][name] - scores["a"][name]
        assert case.figures()[f"{name}_delta"] == pytest.approx(expected, abs=1e-12)
    assert set(case.figures()) <= COMPARE_FIGURES


def test_a_model_against_itself_agrees_exactly_and_without_scores_has_no_deltas(
    cases: list[Path],
) -> None:
    explainer = Explainer(SPEC.path, provider="cpu")
    same = compare_models(explainer, SPEC.path, cases, "kwc", provider="cpu")
    for case in same.cases:
        assert case.figures() == {
            "spearman": 1.0,
            "top10_iou": 1.0,
            "max_abs_diff": 0.0,
            "dice": 1.0,
            "prediction_preserved_delta": 0.0,
            "image_preserved_delta": 0.0,
            "excess_prediction_delta": 0.0,
        }
    unscored = compare_models(explainer, explainer, cases[:1], "gradcam", scores=False)
    assert set(unscored.cases[0].figures()) == {"spearman", "top10_iou", "max_abs_diff", "dice"}
    assert "scores_a" not in unscored.to_dict()["cases"][0]


def test_each_model_takes_its_own_card_or_else_the_others(tmp_path: Path) -> None:
    case = tmp_path / "case.npy"
    np.save(case, SPEC.input(0)[0, 0])
    models = {}
    for name in ("a", "b", "bare"):
        (tmp_path / name).mkdir()
        models[name] = tmp_path / name / "model.onnx"
        models[name].write_bytes(SPEC.path.read_bytes())  # the same model, other cards
    (tmp_path / "a" / "model.card.toml").write_text("[input]\nresize = [40, 40]\n")
    (tmp_path / "b" / "model.card.toml").write_text("[input]\nresize = [48, 48]\n")
    with pytest.raises(CompareError, match="40x40 but model B at 48x48"):
        compare_models(models["a"], models["b"], [case], "gradcam", provider="cpu")
    # A model without a card prepares the case as the other's card says: the same input.
    (same,) = compare_models(models["bare"], models["b"], [case], "gradcam", provider="cpu").cases
    assert (same.spearman, same.max_abs_diff, same.dice) == (1.0, 0.0, 1.0)

"""score_map: the engine's batched re-predictions give the same scores as a direct loop."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from segattr_onnx import Explainer, Target
from segattr_onnx.errors import InputDataError
from segattr_onnx.metrics import StepMasks, area_under_curve, masked_input, scale_map, score_map
from tests.conftest import fixture, run_reference


def _probability(name: str, x: np.ndarray) -> np.ndarray:
    fx = fixture(name)
    explainer = Explainer(fx.path, provider="cpu")
    target = Target().resolve(explainer.analysis(x.shape))
    (output,) = run_reference(fx.load_with_weights(), {"image": x.astype(x.dtype)})
    return target.probabilities(output)[0].astype(np.float64)


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet2d_nhwc", "unet3d"])
@pytest.mark.parametrize("baseline", ["zero", "min"])
def test_scores_equal_a_direct_loop(name: str, baseline: str) -> None:
    fx = fixture(name)
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    result = explainer.explain(x, "kwc")
    scores = score_map(explainer, x, result.map, steps=4, baseline=baseline)

    p = _probability(name, x)
    scaled = scale_map(result.map, "p2")
    channel_axis = explainer.analysis(x.shape).input.channel_axis
    masked = masked_input(x, scaled, channel_axis, baseline).astype(np.float32)
    q = _probability(name, masked)
    assert scores.prediction_preserved == pytest.approx(np.minimum(p, q).sum() / p.sum(), rel=1e-5)
    assert scores.excess_prediction == pytest.approx(
        np.maximum(q - p, 0).sum() / p.sum(), rel=1e-4, abs=1e-7
    )
    assert scores.image_preserved == pytest.approx(scaled.mean())

    steps = StepMasks(scaled, 4)
    base = 0.0 if baseline == "zero" else float(x.min())
    deletion, insertion = [], []
    for step in range(5):
        for masks, curve in ((steps.deletion(step), deletion), (steps.insertion(step), insertion)):
            weights = np.expand_dims(masks.astype(np.float64)[None], channel_axis)
            stepped = (base + weights * (x - base)).astype(np.float32)
            curve.append(np.minimum(p, _probability(name, stepped)).sum() / p.sum())
    np.testing.assert_allclose(scores.deletion_curve, deletion, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores.insertion_curve, insertion, rtol=1e-5, atol=1e-7)
    assert scores.deletion_auc == pytest.approx(area_under_curve(np.array(deletion)), rel=1e-5)
    assert scores.forward_passes == 1 + 1 + 2 * 5


def test_a_map_that_keeps_everything_preserves_everything() -> None:
    fx = fixture("unet2d_torchscript")
    keep = np.ones((32, 32))
    keep[0, 0] = 1 - 1e-6  # not constant: a constant map gets no score (see below)
    scores = score_map(fx.path, fx.input(1), keep, steps=None, provider="cpu")
    assert scores.prediction_preserved == pytest.approx(1.0, abs=1e-5)
    assert scores.image_preserved == pytest.approx(1.0) and scores.excess_prediction < 1e-5
    assert scores.deletion_auc is None
    with pytest.warns(UserWarning, match="constant"):
        assert score_map(fx.path, fx.input(1), np.ones((32, 32)), provider="cpu").degenerate


def test_labels_add_attribution_quality_and_its_parts() -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    labels = np.zeros((32, 32), np.int64)
    labels[8:16, 8:16] = 3
    labels[16:18, 11:13] = 2
    target_map = (labels == 3).astype(np.float64)
    scores = score_map(fx.path, x, target_map, labels=labels, steps=None, provider="cpu")
    data = scores.to_dict()
    for key in (
        "attribution_quality",
        "relative_entropy",
        "relative_foreground_attribution",
        "external_peak_attribution",
    ):
        assert key in data
    assert scores.relative_foreground_attribution == 1.0
    # Independently: the masked input keeps the target square only, and nothing of the map
    # lies outside the target, so there is no external peak at all.
    masked = np.where(target_map[None, None] > 0, x, 0.0).astype(np.float32)

    def ratio(values: np.ndarray) -> float:
        raw = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        return len(zlib.compress(raw, 6)) / len(raw)

    assert scores.relative_entropy == pytest.approx(ratio(masked) / ratio(x))
    assert scores.external_peak_attribution == 0.0
    assert scores.attribution_quality == pytest.approx(
        scores.prediction_preserved / (ratio(masked) / ratio(x)) + 1.0
    )


def test_maps_of_the_wrong_size_are_refused() -> None:
    fx = fixture("unet2d_torchscript")
    with pytest.raises(InputDataError, match="spatial shape"):
        score_map(fx.path, fx.input(0), np.ones((16, 16)), provider="cpu")


@pytest.mark.parametrize("seed", [90_000, 90_001, 90_002])
@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_a_constant_map_is_flagged_and_no_score_ranks_it_above_kwc(seed: int, fill: float):
    """An all-zero map used to score attribution_quality 5.47 against KWC's 1.32 on the
    bundled model: a constant map attributes nothing, so it gets no score at all."""
    from segattr_onnx.bundled import example_model_path
    from segattr_onnx.metrics.scoring import DegenerateMapWarning
    from segattr_onnx.synthetic import make_case

    case = make_case(seed, dim=2, size=64)
    explainer = Explainer(example_model_path(), provider="cpu")
    kwc = explainer.explain(case.image, "kwc")
    scored = score_map(explainer, case.image, kwc.map, case.labels, steps=None)
    assert not scored.degenerate and scored.attribution_quality is not None
    with pytest.warns(DegenerateMapWarning, match="constant"):
        flat = score_map(
            explainer, case.image, np.full(kwc.map.shape, fill), case.labels, steps=None
        )
    assert flat.degenerate
    values = {k: v for k, v in flat.to_dict().items() if k not in ("seconds", "degenerate")}
    assert values == {"forward_passes": 0}  # nothing to rank, nothing re-predicted

"""Scoring one map: every masked re-prediction in one batched request through the engine.

The masked input x̃ and the deletion/insertion steps are all "the model on K modified inputs",
so they go through the same planner, chunking and in-graph score head as Score-CAM's
re-predictions; the head's kept/score sums are exactly what Prediction Preserved and Excess
Prediction need. Only the label-map scores (RE, RFA, EPA) are computed on the host.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from segattr_onnx.errors import InputDataError
from segattr_onnx.explainer import Explainer
from segattr_onnx.graph.loading import LoadedModel
from segattr_onnx.methods.base import MaskedInputRequest
from segattr_onnx.methods.statistics import OVERLAP
from segattr_onnx.metrics.curves import DEFAULT_STEPS, StepMasks, area_under_curve
from segattr_onnx.metrics.peaks import classify_peaks
from segattr_onnx.metrics.scores import (
    attribution_quality,
    baseline_value,
    image_preserved,
    masked_input,
    relative_entropy,
    relative_foreground_attribution,
    scale_map,
)
from segattr_onnx.sliding_window import SlidingWindow
from segattr_onnx.target import Target


class DegenerateMapWarning(UserWarning):
    """A constant or all-zero map was scored: it gets no score."""


@dataclass(frozen=True)
class MapScores:
    """The §5 scores of one map on one case (label-map scores only with labels)."""

    prediction_preserved: float | None
    image_preserved: float | None
    excess_prediction: float | None
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    attribution_quality: float | None = None
    relative_entropy: float | None = None
    relative_foreground_attribution: float | None = None
    external_peak_attribution: float | None = None
    deletion_curve: list[float] = field(default_factory=list, repr=False)
    insertion_curve: list[float] = field(default_factory=list, repr=False)
    forward_passes: int = 0
    seconds: float = 0.0
    # A constant map (all zero included) attributes nothing: it gets no score at all, since
    # some would rank it best (an all-zero map keeps none of the image, and the blank masked
    # input compresses to nothing, which inflates attribution_quality).
    degenerate: bool = False

    def to_dict(self, curves: bool = False) -> dict:
        """The JSON shape of ``segattr score --json`` (None-valued scores left out)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if not curves:
            data.pop("deletion_curve", None)
            data.pop("insertion_curve", None)
        return data


@dataclass(frozen=True)
class BlendedInputs:
    """The scores' inputs, rows of x blended with the baseline: row 0 by the scaled map Ā,
    then by each deletion step's mask, then by each insertion step's (plain data, so a request
    holding it can be sent to another process)."""

    x: np.ndarray = field(repr=False)
    base: np.ndarray | float = field(repr=False)
    channel_axis: int | None
    scaled: np.ndarray = field(repr=False)
    step_masks: StepMasks | None = field(repr=False)
    curve_rows: int

    def __call__(self, start: int, stop: int) -> np.ndarray:
        masks = []
        for row in range(start, stop):
            if row == 0:
                masks.append(self.scaled)
            elif row <= self.curve_rows:
                masks.append(self.step_masks.deletion(row - 1))
            else:
                masks.append(self.step_masks.insertion(row - 1 - self.curve_rows))
        weights = np.asarray(masks, dtype=np.float64)
        if self.channel_axis is not None:
            weights = np.expand_dims(weights, self.channel_axis)
        x = self.x.astype(np.float64)
        return (self.base + weights * (x - self.base)).astype(self.x.dtype)


def score_map(
    model: Explainer | LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    x: np.ndarray,
    attribution: np.ndarray,
    labels: np.ndarray | None = None,
    target: Target | None = None,
    variant: str = "p2",
    baseline: str = "zero",
    steps: int | None = DEFAULT_STEPS,
    provider: str = "auto",
    progress: bool | object = False,
    window: SlidingWindow | None = None,
) -> MapScores:
    """Score ``attribution`` (the input's spatial shape) for case ``x`` on ``model``.

    ``steps=None`` skips the deletion/insertion curves (1 re-prediction instead of
    2·steps + 3). ``labels`` (0 background, 1 distractor, 2 discriminating background,
    3 target) adds Attribution Quality and its parts. With ``window`` (a model deployed patch
    by patch), the prediction and every re-prediction are the sliding window's fused ones.
    """
    started = time.perf_counter()
    explainer = model if isinstance(model, Explainer) else Explainer(model, provider=provider)
    if window is not None:
        from segattr_onnx.windowed import prepare_windowed

        windowed = prepare_windowed(explainer, x, window, None, target, variant)
        case = windowed.case
    else:
        prepared = explainer.case(x, target, None, variant)
        case = prepared.case
    x, analysis = case.x, case.analysis
    spatial = case.spatial_shape
    attribution = np.asarray(attribution, dtype=np.float64)
    if attribution.shape != tuple(spatial):
        raise InputDataError(
            f"the map has shape {attribution.shape} but the input's spatial shape is "
            f"{tuple(spatial)}; score a map made for this input"
        )
    if not np.all(np.isfinite(attribution)):
        raise InputDataError("the map contains NaN or infinite values")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != attribution.shape:
            raise InputDataError(
                f"the label map has shape {labels.shape}, not the map's {attribution.shape}"
            )
    base_score = case.base_score
    scaled = scale_map(attribution, variant)
    if float(scaled.max()) == float(scaled.min()):
        warnings.warn(
            f"the map is constant ({float(attribution.flat[0]):g} everywhere): it attributes "
            "nothing, so it gets no score; check the method and layers that made it",
            DegenerateMapWarning,
            stacklevel=2,
        )
        return MapScores(None, None, None, degenerate=True, seconds=time.perf_counter() - started)
    channel_axis = analysis.input.channel_axis
    base = baseline_value(x, baseline)
    curve_rows = 0 if steps is None else steps + 1

    make_inputs = BlendedInputs(
        x,
        base,
        channel_axis,
        scaled,
        None if steps is None else StepMasks(scaled, steps),
        curve_rows,
    )

    count = 1 + 2 * curve_rows
    request = MaskedInputRequest("scoring", count, make_inputs, OVERLAP)
    if window is not None:
        rows, record = windowed.run(request)
        passes = len(windowed.grid) + record.passes
    else:
        (rows,), _ = explainer.run(prepared, [request], progress, "scoring: the map masked")
        passes = 1 + count
    kept = rows[:, OVERLAP.columns.index("kept")] / base_score
    gained = rows[:, OVERLAP.columns.index("score")] - rows[:, OVERLAP.columns.index("kept")]
    scores: dict = {
        "prediction_preserved": float(kept[0]),
        "image_preserved": image_preserved(scaled),
        "excess_prediction": float(gained[0] / base_score),
        "forward_passes": passes,
    }
    if steps is not None:
        deletion, insertion = kept[1 : 1 + curve_rows], kept[1 + curve_rows :]
        scores.update(
            deletion_auc=area_under_curve(deletion),
            insertion_auc=area_under_curve(insertion),
            deletion_curve=[float(v) for v in deletion],
            insertion_curve=[float(v) for v in insertion],
        )
    if labels is not None:
        masked = masked_input(x, scaled, channel_axis, baseline)
        entropy = relative_entropy(x, masked)
        foreground = relative_foreground_attribution(scaled, labels)
        peaks = classify_peaks(scaled, labels).external_peak_attribution
        scores.update(
            relative_entropy=entropy,
            relative_foreground_attribution=foreground,
            external_peak_attribution=peaks,
            attribution_quality=attribution_quality(
                scores["prediction_preserved"], entropy, foreground, peaks
            ),
        )
    return MapScores(**scores, seconds=time.perf_counter() - started)

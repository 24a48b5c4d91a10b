"""Scores for attribution maps (docs/algorithms.md §5), shared by every method."""

from segattr_onnx.metrics.curves import StepMasks, area_under_curve
from segattr_onnx.metrics.peaks import PeakVerdicts, classify_peaks
from segattr_onnx.metrics.scores import (
    attribution_quality,
    excess_prediction,
    image_preserved,
    masked_input,
    prediction_preserved,
    relative_entropy,
    relative_foreground_attribution,
    scale_map,
)
from segattr_onnx.metrics.scoring import MapScores, score_map

__all__ = [
    "MapScores",
    "PeakVerdicts",
    "StepMasks",
    "area_under_curve",
    "attribution_quality",
    "classify_peaks",
    "excess_prediction",
    "image_preserved",
    "masked_input",
    "prediction_preserved",
    "relative_entropy",
    "relative_foreground_attribution",
    "scale_map",
    "score_map",
]

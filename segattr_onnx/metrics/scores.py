"""The scores of docs/algorithms.md §5 as pure numpy functions of (x, P, P̃, map, labels).

Every method's map is judged by the same numbers: how much of the prediction survives when the
input is masked by the map (Prediction Preserved), how much of the image the map keeps (Image
Preserved), and, with a ground-truth label map, whether the map sits on the target and on the
discriminating background rather than elsewhere (Attribution Quality).
"""

from __future__ import annotations

import zlib

import numpy as np

from segattr_onnx.arrays import minmax, scale_by_max
from segattr_onnx.errors import InputDataError

TARGET_LABEL, DISCRIMINATING_LABEL, DISTRACTOR_LABEL, BACKGROUND_LABEL = 3, 2, 1, 0


def scale_map(attribution: np.ndarray, variant: str = "p2") -> np.ndarray:
    """Ā: the map scaled to [0, 1] — P2 divides by the max, P1 uses minmax."""
    if variant == "p1":
        return minmax(attribution)
    return np.clip(scale_by_max(attribution), 0.0, 1.0)


def masked_input(
    x: np.ndarray, scaled: np.ndarray, channel_axis: int | None, baseline: str = "zero"
) -> np.ndarray:
    """x̃ = b + Ā·(x − b) for one case x with its batch axis (model layout); Ā, spatial, is
    broadcast over the input channels; b is 0 or the image minimum."""
    weights = np.asarray(scaled, dtype=np.float64)[None]
    if channel_axis is not None:
        weights = np.expand_dims(weights, channel_axis)
    values = np.asarray(x, dtype=np.float64)
    base = baseline_value(values, baseline)
    return base + weights * (values - base)


def baseline_value(x: np.ndarray, baseline: str) -> float:
    """What masked-out voxels become: 0, or the image minimum (for images not centred on 0)."""
    if baseline not in ("zero", "min"):
        raise ValueError(f"baseline {baseline!r} is unknown; use 'zero' or 'min'")
    return float(np.min(x)) if baseline == "min" else 0.0


def prediction_preserved(prediction: np.ndarray, masked_prediction: np.ndarray) -> float:
    """PP = Σ min(P, P̃) / Σ P: the share of the segmentation the masked input still yields."""
    total = float(np.sum(prediction, dtype=np.float64))
    return float(np.sum(np.minimum(prediction, masked_prediction), dtype=np.float64)) / total


def excess_prediction(prediction: np.ndarray, masked_prediction: np.ndarray) -> float:
    """EP = Σ max(P̃ − P, 0) / Σ P: segmentation the masked input makes up."""
    total = float(np.sum(prediction, dtype=np.float64))
    gained = np.maximum(np.asarray(masked_prediction) - prediction, 0.0)
    return float(np.sum(gained, dtype=np.float64)) / total


def image_preserved(scaled: np.ndarray) -> float:
    """IP = mean Ā: how much of the image the map keeps (lower is better)."""
    return float(np.mean(scaled, dtype=np.float64))


def compression_ratio(values: np.ndarray) -> float:
    """Compressed / raw size of the float32 array: little structure compresses well."""
    # + 0.0 turns −0.0 (x·0 for negative x) into 0.0: the same value must compress the same.
    raw = np.ascontiguousarray(np.asarray(values, dtype=np.float32) + np.float32(0.0)).tobytes()
    return len(zlib.compress(raw, 6)) / len(raw)


def relative_entropy(x: np.ndarray, masked: np.ndarray) -> float:
    """RE = r(x̃) / r(x), with r the compression ratio (an entropy proxy)."""
    return compression_ratio(masked) / compression_ratio(x)


def relative_foreground_attribution(scaled: np.ndarray, labels: np.ndarray) -> float:
    """RFA = mean Ā on the target (label 3) − mean Ā on the background (label 0)."""
    target = labels == TARGET_LABEL
    background = labels == BACKGROUND_LABEL
    lacking = [
        f"no {name} ({value}) voxels"
        for name, value, mask in (
            ("target", TARGET_LABEL, target),
            ("background", BACKGROUND_LABEL, background),
        )
        if not mask.any()
    ]
    if lacking:
        values = np.unique(labels)
        found = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise InputDataError(
            f"the label map has {' and '.join(lacking)} (it holds {found}), so Attribution "
            "Quality cannot compare the map on the target with the background; labels mean "
            f"{BACKGROUND_LABEL} background, {DISTRACTOR_LABEL} distractor, "
            f"{DISCRIMINATING_LABEL} discriminating background, {TARGET_LABEL} target"
        )
    return float(scaled[target].mean() - scaled[background].mean())


def attribution_quality(
    prediction_preserved: float,
    relative_entropy: float,
    relative_foreground_attribution: float,
    external_peak_attribution: float,
) -> float:
    """AQ = PP / RE + RFA·(1 + EPA) (P2)."""
    return prediction_preserved / relative_entropy + relative_foreground_attribution * (
        1.0 + external_peak_attribution
    )

"""Per-row reductions of re-predictions against the case's own prediction P, over region R.

They run on every chunk as it comes out of ONNX Runtime, so a method never holds all K
re-predictions at once (2·C full-size predictions of a 3D model would not fit).
"""

from __future__ import annotations

import numpy as np

from segattr_onnx.methods.base import Case, PredictionStatistic
from segattr_onnx.target import region_sum


def _overlap(probabilities: np.ndarray, case: Case) -> np.ndarray:
    """Columns: lost Σ_R max(P − P', 0), kept Σ_R min(P', P), score Σ_R P'."""
    base = case.prediction[None]
    lost = region_sum(np.maximum(base - probabilities, 0.0), case.region)
    kept = region_sum(np.minimum(probabilities, base), case.region)
    score = region_sum(probabilities, case.region)
    return np.stack([lost, kept, score], axis=1)


def _score(probabilities: np.ndarray, case: Case) -> np.ndarray:
    """Column: the target score T = Σ_R P' of each re-prediction."""
    return region_sum(probabilities, case.region)[:, None]


OVERLAP = PredictionStatistic(
    "overlap", ("lost", "kept", "score"), _overlap, head_columns=("lost", "kept", "score")
)
TARGET_SCORE = PredictionStatistic("score", ("score",), _score, head_columns=("score",))

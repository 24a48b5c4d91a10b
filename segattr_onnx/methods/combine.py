"""Combining layer maps into one map of the input's size (docs/algorithms.md §3.5 and §4).

All rules upsample each layer map with ``up()`` first and return float64 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segattr_onnx.arrays import minmax, scale_by_max, upsample

CAM_P2_EPSILON = 1e-7


def combine_mean_minmax(maps: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """P1 (every method): mean_ℓ minmax(up(M_ℓ)), then minmax."""
    stacked = np.mean([minmax(upsample(m, shape)) for m in maps], axis=0)
    return minmax(stacked)


def combine_cam_p2(maps: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """P2 CAM methods: Σ_ℓ up(M_ℓ / (max M_ℓ + 1e-7)), then divided by its max."""
    total = np.zeros(tuple(shape), dtype=np.float64)
    for layer_map in maps:
        layer_map = np.asarray(layer_map, dtype=np.float64)
        total += upsample(layer_map / (float(layer_map.max()) + CAM_P2_EPSILON), shape)
    return scale_by_max(total)


def combine_sum(maps: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """P2 KWC: Σ_ℓ up(M_ℓ), then divided by its max (layers keep their relative weight)."""
    total = np.zeros(tuple(shape), dtype=np.float64)
    for layer_map in maps:
        total += upsample(layer_map, shape)
    return scale_by_max(total)

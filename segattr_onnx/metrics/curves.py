"""Deletion and insertion curves (RISE, adapted to segmentation as in docs/algorithms.md §5).

Voxels are removed (deletion) or revealed (insertion) in order of decreasing Ā, in equal steps;
each step's input is re-predicted and scored with Prediction Preserved. A good map loses the
segmentation fast when its top voxels go (low deletion AUC) and recovers it fast when they come
back (high insertion AUC).
"""

from __future__ import annotations

import numpy as np

DEFAULT_STEPS = 20
MAX_STEPS = 100  # the most `--steps` and an audit config's `steps` may ask (0: no curves)


def step_fractions(steps: int) -> np.ndarray:
    """0, 1/steps, …, 1: the share of voxels removed or revealed at each point of the curve."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {steps}")
    return np.linspace(0.0, 1.0, steps + 1)


TIE_SEED = 0


def voxel_order(scaled: np.ndarray) -> np.ndarray:
    """Flat voxel indices by decreasing Ā, ties in a fixed random order.

    Maps often hold large tied plateaus (CAM maps are mostly exact zeros); raster order would
    remove or reveal them top row first and make the curves depend on where the object sits.
    A seeded shuffle keeps the curves deterministic without that bias.
    """
    values = np.asarray(scaled, dtype=np.float64).reshape(-1)
    tie_break = np.random.default_rng(TIE_SEED).permutation(values.size)
    return np.lexsort((tie_break, -values))


class StepMasks:
    """The deletion and insertion masks of one map, sorted once (1 keeps a voxel).

    Deletion step i keeps all but the top i/steps of the voxels; insertion step i keeps only
    them.
    """

    def __init__(self, scaled: np.ndarray, steps: int) -> None:
        self.shape = np.shape(scaled)
        self.order = voxel_order(scaled)
        self.counts = np.round(step_fractions(steps) * self.order.size).astype(np.int64)

    def _top(self, step: int) -> np.ndarray:
        top = np.zeros(self.order.size, dtype=bool)
        top[self.order[: self.counts[step]]] = True
        return top.reshape(self.shape)

    def deletion(self, step: int) -> np.ndarray:
        return ~self._top(step)

    def insertion(self, step: int) -> np.ndarray:
        return self._top(step)


def area_under_curve(values: np.ndarray) -> float:
    """Trapezoidal area over the fraction axis [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    fractions = np.linspace(0.0, 1.0, len(values))
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(fractions)))

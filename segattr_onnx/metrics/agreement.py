"""How much two attribution maps (or two masks) agree: the figures behind ``compare`` and
``sanity``.

A deployment gate asks whether an optimised or retrained model still looks at the same
evidence; a sanity check asks whether a method's map changes when the model it explains is
destroyed. Both reduce to comparing two maps of the same shape, so the comparisons live here
once: rank correlation (the order of the voxels, which is what an overlay shows), overlap of
the most attributed voxels, the largest absolute difference, structural similarity, and the
Dice of two masks. All work for 2D and 3D alike and return plain floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOP_FRACTION = 0.10
SSIM_WINDOW = 7  # the window of Wang et al. as scikit-image uses it by default
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if first.shape != second.shape:
        raise ValueError(f"cannot compare {what} of shapes {first.shape} and {second.shape}")
    if first.size == 0:
        raise ValueError(f"cannot compare empty {what}")
    return first, second


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps over all voxels, ties given their mean rank.

    Two constant maps are identical in rank (1.0); a constant map against a varying one has
    no rank order to share (0.0), instead of the NaN the formula gives.
    """
    from scipy import stats  # here, not at import: the CLI's start would pay for scipy

    first, second = _same_shape(a, b, "maps")
    x = stats.rankdata(first.reshape(-1))
    y = stats.rankdata(second.reshape(-1))
    x -= x.mean()
    y -= y.mean()
    denominator = float(np.sqrt(np.dot(x, x) * np.dot(y, y)))
    if denominator == 0.0:
        return 1.0 if np.dot(x, x) == np.dot(y, y) == 0.0 else 0.0
    return float(np.clip(np.dot(x, y) / denominator, -1.0, 1.0))


def top_fraction_mask(values: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """The most attributed voxels: those at or above the ⌈fraction·V⌉-th largest value (ties
    at the threshold all in), except those at the map's minimum, which hold no attribution.

    Maps from ReLU'd methods (LayerCAM, the input gradients) are often mostly at their
    minimum; filling the top set up to its size with such voxels by position would put the
    same background voxels in both maps' sets and make unrelated maps overlap.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction} must lie in (0, 1]")
    flat = np.asarray(values, np.float64).reshape(-1)
    count = max(1, int(np.ceil(fraction * flat.size)))
    threshold = np.partition(flat, flat.size - count)[flat.size - count]
    mask = (flat >= threshold) & (flat > flat.min())
    return mask.reshape(np.shape(values))


def top_fraction_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the top ``fraction`` of voxels of each map (``top_fraction_mask``); 1 when
    neither map attributes anything (both constant)."""
    first, second = _same_shape(a, b, "maps")
    top_a, top_b = top_fraction_mask(first, fraction), top_fraction_mask(second, fraction)
    union = np.logical_or(top_a, top_b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(top_a, top_b).sum() / union)


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    first, second = _same_shape(a, b, "maps")
    return float(np.abs(first - second).max())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; two empty masks agree fully (1.0)."""
    first, second = _same_shape(a, b, "masks")
    left, right = first > 0, second > 0
    total = int(left.sum()) + int(right.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(left, right).sum() / total)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two maps (Wang et al. 2004) as scikit-image computes it
    by default: a 7-voxel uniform window along every axis, sample covariances, K1 = 0.01,
    K2 = 0.03, the mean taken away from the border the window cannot cover."""
    first, second = _same_shape(a, b, "maps")
    if min(first.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs maps of at least {SSIM_WINDOW} voxels along every axis, not {first.shape}"
        )
    if not data_range > 0:
        raise ValueError(f"data_range {data_range} must be positive")
    from scipy import ndimage

    size = SSIM_WINDOW
    count = size**first.ndim
    covariance_scale = count / (count - 1.0)
    mean = [ndimage.uniform_filter(v, size=size) for v in (first, second)]
    xx = ndimage.uniform_filter(first * first, size=size)
    yy = ndimage.uniform_filter(second * second, size=size)
    xy = ndimage.uniform_filter(first * second, size=size)
    var_x = covariance_scale * (xx - mean[0] * mean[0])
    var_y = covariance_scale * (yy - mean[1] * mean[1])
    cov = covariance_scale * (xy - mean[0] * mean[1])
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mean[0] * mean[1] + c1) * (2 * cov + c2)
    denominator = (mean[0] ** 2 + mean[1] ** 2 + c1) * (var_x + var_y + c2)
    pad = (size - 1) // 2
    inner: Sequence[slice] = tuple(slice(pad, n - pad) for n in first.shape)
    return float((numerator / denominator)[inner].mean())


def map_agreement(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> dict[str, float]:
    """The map figures ``compare`` reports for one case: spearman, top-fraction IoU, max abs
    difference."""
    return {
        "spearman": spearman(a, b),
        "top10_iou": top_fraction_iou(a, b, fraction),
        "max_abs_diff": max_abs_difference(a, b),
    }

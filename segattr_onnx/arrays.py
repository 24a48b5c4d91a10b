"""Array conventions shared by methods and metrics: scaling, resizing, connected components.

Inside segattr-onnx a map is channel-free and spatial only: (H, W) or (D, H, W). Layer tensors
are channel-first without a batch axis, (C, *S). Every function here works for 2D and 3D alike
through the same code path (MONAI's habit), in float64 so that sums over many voxels stay exact
enough for the 1e-5 comparisons the tests make.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np


def minmax(values: np.ndarray) -> np.ndarray:
    """(M − min M)/(max M − min M), and 0 everywhere when M is constant (ALGORITHMS.md §1)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def scale_by_max(values: np.ndarray) -> np.ndarray:
    """M / max M, and 0 everywhere when max M ≤ 0 (nothing positive to scale)."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(values.max())
    if not peak > 0:
        return np.zeros_like(values)
    return values / peak


@lru_cache(maxsize=256)
def _linear_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of half-pixel linear resampling along one axis.

    Output centre i sits at (i + 0.5)·size_in/size_out − 0.5 in input coordinates, clamped to the
    first and last input centres: the convention of cv2.resize, skimage's order-1 resize and
    torch's ``align_corners=False``.
    """
    position = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    position = np.clip(position, 0.0, size_in - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = position - low
    for cached in (low, high, frac):
        cached.flags.writeable = False  # shared by every caller through the cache
    return low, high, frac


def upsample(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """up(M): bilinear (2D) or trilinear (3D) resize of the last axes, half-pixel centres.

    Linear interpolation is separable, so resizing one axis at a time gives exactly the
    bilinear/trilinear result for any rank. Leading axes (kernels, rows) are carried along.
    """
    result = np.asarray(values, dtype=np.float64)
    offset = result.ndim - len(shape)
    if offset < 0:
        raise ValueError(f"cannot resize a {result.ndim}-D map to {len(shape)}-D shape {shape}")
    for position, size_out in enumerate(shape):
        axis = offset + position
        size_in = result.shape[axis]
        if size_in == size_out:
            continue
        low, high, frac = _linear_weights(size_in, int(size_out))
        frac_shape = [1] * result.ndim
        frac_shape[axis] = len(frac)
        frac = frac.reshape(frac_shape)
        result = (
            np.take(result, low, axis=axis) * (1.0 - frac) + np.take(result, high, axis=axis) * frac
        )
    return result


def minmax_rows(values: np.ndarray) -> np.ndarray:
    """minmax applied to each row (axis 0) of a stack of maps on its own."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(len(values), -1)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.0)
    return scaled.reshape(values.shape)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label face-connected components (4-connected in 2D, 6 in 3D) of a boolean array.

    Returns (labels, count) with labels 1..count in order of each component's first voxel and 0
    for background. Union-find with vectorised hooking and pointer jumping, so a 128³ volume takes
    a few passes of numpy work and no scipy dependency.
    """
    mask = np.asarray(mask, dtype=bool)
    flat = mask.reshape(-1)
    parent = np.arange(flat.size, dtype=np.int64)
    index = np.arange(flat.size, dtype=np.int64).reshape(mask.shape)
    pairs_a: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    for axis in range(mask.ndim):
        lead = [slice(None)] * mask.ndim
        trail = [slice(None)] * mask.ndim
        lead[axis], trail[axis] = slice(None, -1), slice(1, None)
        both = mask[tuple(lead)] & mask[tuple(trail)]
        pairs_a.append(index[tuple(lead)][both])
        pairs_b.append(index[tuple(trail)][both])
    a = np.concatenate(pairs_a) if pairs_a else np.zeros(0, np.int64)
    b = np.concatenate(pairs_b) if pairs_b else np.zeros(0, np.int64)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            break
        low = np.minimum(root_a[differ], root_b[differ])
        high = np.maximum(root_a[differ], root_b[differ])
        # Hook each root onto the smallest root it touches, then flatten every path.
        np.minimum.at(parent, high, low)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots = parent[flat]
    labels = np.zeros(flat.size, dtype=np.int64)
    unique_roots, first_label = np.unique(roots, return_inverse=True)
    labels[flat] = first_label + 1
    return labels.reshape(mask.shape), int(unique_roots.size)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (the first one found on a tie)."""
    labels, count = connected_components(mask)
    if count == 0:
        return np.zeros(np.shape(mask), dtype=bool)
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))

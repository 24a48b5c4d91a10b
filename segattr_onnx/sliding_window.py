"""Sliding-window inference as MONAI and nnU-Net deploy it: patches, blend weights, fusion.

A 3D model trained on 128³ patches is run on a 512×512×300 CT by sliding the patch over the
volume and blending overlapping outputs with a Gaussian (or constant) importance map. An
explanation of that model must explain *this* fused prediction, not one of a resized volume,
so the patch grid, the weights and the normalisation here follow MONAI's
``sliding_window_inference(inputs, roi_size, sw_batch_size, predictor, overlap, mode,
sigma_scale, padding_mode, cval)`` exactly (the tests run MONAI beside it):

- a dimension smaller than the patch is padded, half before and half after (the odd voxel
  after), then the fused output is cropped back;
- the step is ``int(patch · (1 − overlap))`` (at least 1; the whole dimension when the patch
  spans it), and the last window of a dimension is shifted back to end at the border;
- the Gaussian weight is the outer product of ``exp(−x² / (2 (σ·patch)²))`` over centred
  coordinates, clamped below at ``max(min, 1e-3)``; the fused output is
  Σ_p w · out_p / Σ_p w.

Arrays are (C, *spatial) here: the caller moves a channels-last model's channels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from segattr_onnx.errors import SegattrError

BLENDS = ("gaussian", "constant")
# MONAI's padding modes, as numpy calls them.
PADDINGS = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
MAX_WINDOWS = 1_000_000  # a grid this large is a mistake (a patch of 1 voxel), not a plan


class SlidingWindowError(SegattrError):
    """Sliding-window settings that cannot describe a patch grid."""


@dataclass(frozen=True)
class SlidingWindow:
    """How a model is run on inputs larger than its patch (a model card's ``[inference]``).

    The defaults are nnU-Net's deployed ones (half overlap, Gaussian with σ = patch/8); MONAI's
    function defaults to ``overlap=0.25, mode="constant"``.
    """

    patch: tuple[int, ...]
    overlap: float = 0.5
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    padding: str = "constant"
    cval: float = 0.0
    batch: int = 4

    def __post_init__(self) -> None:
        if not self.patch or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in self.patch
        ):
            raise SlidingWindowError(f"patch must be positive whole numbers, not {self.patch!r}")
        if not 0 <= self.overlap < 1:
            raise SlidingWindowError(f"overlap must be at least 0 and below 1, not {self.overlap}")
        if self.blend not in BLENDS:
            raise SlidingWindowError(
                f"blend {self.blend!r} is unknown; use one of {', '.join(BLENDS)}"
            )
        if not self.sigma_scale > 0:
            raise SlidingWindowError(f"sigma_scale must be above 0, not {self.sigma_scale}")
        if self.padding not in PADDINGS:
            raise SlidingWindowError(
                f"padding {self.padding!r} is unknown; use one of {', '.join(PADDINGS)}"
            )
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise SlidingWindowError(f"batch must be a whole number ≥ 1, not {self.batch!r}")

    def grid(self, spatial: Sequence[int]) -> WindowGrid:
        """The patch grid over an input of this spatial shape."""
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != len(self.patch):
            raise SlidingWindowError(
                f"the patch {list(self.patch)} has {len(self.patch)} dims but the input has "
                f"{len(spatial)} spatial dims {list(spatial)}"
            )
        padded = tuple(max(s, p) for s, p in zip(spatial, self.patch, strict=True))
        pad = tuple(
            (diff // 2, diff - diff // 2)
            for diff in (max(p - s, 0) for s, p in zip(spatial, self.patch, strict=True))
        )
        steps = tuple(
            p if p == size else max(int(p * (1 - self.overlap)), 1)
            for p, size in zip(self.patch, padded, strict=True)
        )
        per_axis = [
            _starts(size, p, step) for size, p, step in zip(padded, self.patch, steps, strict=True)
        ]
        count = math.prod(len(s) for s in per_axis)
        if count > MAX_WINDOWS:
            raise SlidingWindowError(
                f"{count} windows of {list(self.patch)} over {list(spatial)}: give a larger "
                "patch or a smaller overlap"
            )
        starts = np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(count, -1)
        weights = importance_map(self.patch, self.blend, self.sigma_scale)
        return WindowGrid(self, spatial, padded, pad, starts, weights)


def _starts(size: int, patch: int, step: int) -> list[int]:
    """MONAI's ``dense_patch_slices`` on one axis: windows until one reaches the border, the
    last shifted back to end there."""
    count = next(d for d in range(math.ceil(size / step)) if d * step + patch >= size) + 1
    return [idx * step - max(idx * step + patch - size, 0) for idx in range(count)]


def importance_map(patch: Sequence[int], blend: str, sigma_scale: float) -> np.ndarray:
    """Each patch voxel's blend weight (float32, as MONAI computes it)."""
    if blend == "constant":
        weights = np.ones(tuple(patch), np.float32)
    else:
        weights = np.ones((), np.float32)
        for size in patch:
            sigma = size * sigma_scale
            x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
            axis = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
            weights = np.multiply.outer(weights, axis).astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


@dataclass(frozen=True)
class WindowGrid:
    """The windows over one input: where each starts (in the padded input) and its weights."""

    window: SlidingWindow
    spatial: tuple[int, ...]  # the input's
    padded: tuple[int, ...]
    pad: tuple[tuple[int, int], ...]
    starts: np.ndarray = field(repr=False)  # (windows, dims)
    weights: np.ndarray = field(repr=False)  # the patch's importance map

    def __len__(self) -> int:
        return len(self.starts)

    def slices(self, index: int) -> tuple[slice, ...]:
        return tuple(
            slice(int(s), int(s) + p)
            for s, p in zip(self.starts[index], self.window.patch, strict=True)
        )

    def padded_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` (C, *spatial) padded to the grid, as MONAI pads a small input."""
        if not any(lo or hi for lo, hi in self.pad):
            return x
        widths = ((0, 0), *self.pad)
        mode = PADDINGS[self.window.padding]
        if mode == "constant":
            return np.pad(x, widths, mode="constant", constant_values=self.window.cval)
        return np.pad(x, widths, mode=mode)

    def patches(self, x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, a batch of patches (B, C, *patch)) of the padded ``x``, B ≤ batch."""
        padded = self.padded_input(x)
        for first in range(0, len(self), self.window.batch):
            indices = range(first, min(first + self.window.batch, len(self)))
            yield first, np.stack([padded[(slice(None), *self.slices(i))] for i in indices])

    def coverage(self) -> np.ndarray:
        """Σ_p w over the padded grid: what the fused output is divided by (computed once per
        grid; read-only, as every fusion of the grid shares it)."""
        return self._coverage

    @functools.cached_property
    def _coverage(self) -> np.ndarray:
        total = np.zeros(self.padded, np.float64)
        for index in range(len(self)):
            total[self.slices(index)] += self.weights
        total.flags.writeable = False
        return total

    def fuse(self, outputs: Iterator[tuple[int, np.ndarray]], channels: int) -> np.ndarray:
        """Σ_p w · out_p / Σ_p w from (first index, a batch of patch outputs (B, C, *patch)),
        cropped back to the input's shape; float32, accumulated in float64."""
        total = np.zeros((channels, *self.padded), np.float64)
        for first, batch in outputs:
            if tuple(batch.shape[2:]) != self.window.patch:
                raise SlidingWindowError(
                    f"the model's output for a {list(self.window.patch)} patch is "
                    f"{list(batch.shape[2:])}: sliding-window inference needs an output on "
                    "the patch's grid"
                )
            for offset, output in enumerate(batch):
                total[(slice(None), *self.slices(first + offset))] += output * self.weights
        total /= self.coverage()
        crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(self.pad, self.spatial, strict=True))
        return total[(slice(None), *crop)].astype(np.float32)


def channels_first(values: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """A batch of model outputs as (B, C, *spatial) float32, the layout windows are fused in;
    an output without a channel axis gets one of size 1."""
    values = np.asarray(values, dtype=np.float32)
    if channel_axis is None:
        return values[:, None]
    return np.moveaxis(values, channel_axis, 1)

"""The one base class every attribution method extends, and what a method may ask the engine for.

A method never runs a session. It says what it needs for a layer (ablation runs, masked-input
re-predictions; later gradients) as *requests*; the engine plans them, runs them in
memory-bounded chunks through the cheapest sub-graph and hands back one row of statistics per
request row. The method then turns those rows into per-kernel weights, and the weights into a
layer map. Layer maps are combined by the rule of the chosen variant (docs/algorithms.md §3–4).
Like pytorch-grad-cam's ``BaseCAM``, a new method overrides only what makes it different.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from segattr_onnx.arrays import minmax_rows, upsample
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.methods.combine import combine_cam_p2, combine_mean_minmax
from segattr_onnx.target import ResolvedTarget

VARIANTS = ("p1", "p2")


@dataclass(frozen=True)
class Case:
    """One input and everything the unmodified model says about it."""

    analysis: ModelAnalysis
    x: np.ndarray  # the model's input, own layout, batch axis of 1
    target: ResolvedTarget
    prediction: np.ndarray  # P, float32, the output's spatial shape
    region: np.ndarray | None  # R as a boolean mask of P's shape; None = all voxels
    base_score: float  # S0 = Σ_R P
    activations: dict[str, np.ndarray] = field(repr=False)  # layer → A_ℓ, (C, *S_ℓ) float32
    variant: str = "p2"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.analysis.input.spatial_shape

    def masked_inputs(self, spatial_masks: np.ndarray) -> np.ndarray:
        """x ⊙ h for each row h of (K, *S_in), broadcast over input channels, own layout."""
        return masked_inputs(self.x, self.analysis.input.channel_axis, spatial_masks)


def masked_inputs(x: np.ndarray, channel_axis: int | None, spatial_masks: np.ndarray) -> np.ndarray:
    """x ⊙ h for each row h of (K, *S_in), broadcast over the input's channels (at
    ``channel_axis`` of x, None for none), in x's layout and dtype (integers rounded)."""
    masks = np.asarray(spatial_masks, dtype=np.float32)
    if channel_axis is not None:
        masks = np.expand_dims(masks, channel_axis)
    product = x.astype(np.float32) * masks
    if np.issubdtype(x.dtype, np.integer):
        product = np.rint(product)
    return product.astype(x.dtype)


@dataclass(frozen=True)
class PredictionStatistic:
    """Reduces a chunk of re-predictions P' (K, *S) to K rows of numbers, given the case.

    The name identifies the statistic, so rows computed for one method are reused by another
    that asks for the same masks (Ablation-CAM reuses KWC's dependent runs this way).
    """

    name: str
    columns: tuple[str, ...]
    reduce: Callable[[np.ndarray, Case], np.ndarray]
    # The columns of the in-graph score head (graph/heads.py) this statistic equals, if any;
    # the engine then reduces inside ONNX Runtime and ``reduce`` is the reference.
    head_columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AblationRequest:
    """Re-predictions with a layer's kernels masked: row r keeps kernel j where masks[r, j] = 1."""

    layer: str
    masks: np.ndarray  # (K, C) of 0/1
    form: str  # "block" (P2, zero the block output) or "raw" (P1, Glorot kernel output)
    statistic: PredictionStatistic


@dataclass(frozen=True)
class MaskedInputRequest:
    """Re-predictions of ``count`` modified inputs, built a chunk at a time (never all at once).

    ``make_inputs(start, stop)`` gives rows [start, stop) in the model's layout. The built-in
    ones are plain data with a ``__call__`` (``ActivationMaskedInputs``, the scores'
    ``BlendedInputs``), so a request can be pickled and its inputs built by another process.
    """

    layer: str
    count: int
    make_inputs: Callable[[int, int], np.ndarray]
    statistic: PredictionStatistic


@dataclass(frozen=True)
class ActivationMaskedInputs:
    """Score-CAM's inputs: x masked by each channel of a layer's activation, brought to the
    input's size and min-max scaled (H_k = s(up(A_k))), one channel per row."""

    x: np.ndarray = field(repr=False)
    channel_axis: int | None
    activation: np.ndarray = field(repr=False)  # (C, *S_ℓ)
    spatial_shape: tuple[int, ...]

    def __call__(self, start: int, stop: int) -> np.ndarray:
        masks = minmax_rows(upsample(self.activation[start:stop], self.spatial_shape))
        return masked_inputs(self.x, self.channel_axis, masks)


@dataclass(frozen=True)
class GradientRequest:
    """g = ∂T/∂A_ℓ for one layer, (C, *S_ℓ); one forward+backward pass serves every layer."""

    layer: str


Request = AblationRequest | MaskedInputRequest | GradientRequest


@dataclass(frozen=True)
class KernelWeights:
    """w_k for one layer, plus the terms they came from (D and I for KWC, scores for CAMs).

    Methods whose weights vary by position (LayerCAM, HiResCAM) cannot write their layer map
    as Σ_k w_k A_k: they give the map itself as ``map`` and a per-kernel summary as weights.
    """

    weights: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    map: np.ndarray | None = field(default=None, repr=False)


def weighted_sum(weights: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """Σ_k w_k A_k in float32 (A may be a large 3D stack; a float64 copy would double it),
    returned as float64 for the steps that follow."""
    stacked = np.asarray(activation, dtype=np.float32)
    return np.tensordot(np.asarray(weights, np.float32), stacked, axes=(0, 0)).astype(np.float64)


class AttributionMethod:
    """Base class: the CAM layer map ReLU(Σ_k w_k A_k) and the adapted combination rules."""

    name: ClassVar[str] = ""
    # Methods whose every request is a GradientRequest: their gradients can come from the same
    # run as the observation (one pass of the backward graph instead of two runs).
    uses_gradients: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def ablation_form(self, variant: str) -> str | None:
        """The ablation form this method's requests use, so the engine can collect every
        suffix's inputs in its one observation pass; None for methods that ablate nothing."""
        return None

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[Request]:
        """What the engine must run for this layer; the results come back in the same order."""
        return ()

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        raise NotImplementedError

    def layer_map(self, case: Case, layer: KernelLayer, weights: KernelWeights) -> np.ndarray:
        """M_ℓ = ReLU(Σ_k w_k A_ℓ,k), at the layer's own resolution."""
        if weights.map is not None:
            return weights.map
        weighted = weighted_sum(weights.weights, case.activations[layer.name])
        return np.maximum(weighted, 0.0)

    def combine(self, case: Case, layer_maps: Sequence[np.ndarray]) -> np.ndarray:
        """The adapted multi-layer map (a single layer is the one-element case)."""
        if case.variant == "p1":
            return combine_mean_minmax(layer_maps, case.spatial_shape)
        return combine_cam_p2(layer_maps, case.spatial_shape)

"""Kernel-Weighted Contribution (docs/algorithms.md §3): weights found by ablating each kernel.

For every kernel k of a layer, two re-predictions: without k (P^{−k}) and with only k (P^{k}).
D_k = Σ_R max(P − P^{−k}, 0) is what is lost without it, I_k = Σ_R min(P^{k}, P) what it
reproduces alone, and w_k = D_k·I_k/S0. Both sets of rows go to the engine as one ablation
request, so they share the suffix session and its chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segattr_onnx.arrays import minmax
from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import (
    AblationRequest,
    AttributionMethod,
    Case,
    KernelWeights,
    weighted_sum,
)
from segattr_onnx.methods.combine import combine_mean_minmax, combine_sum
from segattr_onnx.methods.registry import register_method
from segattr_onnx.methods.statistics import OVERLAP


def drop_one_masks(kernels: int) -> np.ndarray:
    """Row k removes kernel k only (P^{−k})."""
    return 1.0 - np.eye(kernels)


def keep_one_masks(kernels: int) -> np.ndarray:
    """Row k keeps kernel k only (P^{k})."""
    return np.eye(kernels)


@register_method
class KernelWeightedContribution(AttributionMethod):
    name = "kwc"
    description = "Kernel-Weighted Contribution: weights from dependent and independent ablation"

    def ablation_form(self, variant: str) -> str:
        # P2 zeroes the block output; P1 swaps the raw output for a Glorot kernel's.
        return "raw" if variant == "p1" else "block"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[AblationRequest]:
        masks = np.concatenate([drop_one_masks(layer.kernels), keep_one_masks(layer.kernels)])
        return [AblationRequest(layer.name, masks, self.ablation_form(case.variant), OVERLAP)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        stats = results[0]
        kernels = layer.kernels
        lost = OVERLAP.columns.index("lost")
        kept = OVERLAP.columns.index("kept")
        dependent = stats[:kernels, lost]
        independent = stats[kernels:, kept]
        weights = dependent * independent / case.base_score
        if case.variant == "p1":
            weights = minmax(weights)
        return KernelWeights(weights, {"dependent": dependent, "independent": independent})

    def layer_map(self, case: Case, layer: KernelLayer, weights: KernelWeights) -> np.ndarray:
        activation = case.activations[layer.name]
        if case.variant == "p1":
            return np.maximum(weighted_sum(weights.weights, np.maximum(activation, 0.0)), 0.0)
        magnitude = np.abs(activation)
        peak = float(magnitude.max())
        if peak == 0:
            return np.zeros(activation.shape[1:])
        return weighted_sum(weights.weights, magnitude) / peak

    def combine(self, case: Case, layer_maps: Sequence[np.ndarray]) -> np.ndarray:
        if case.variant == "p1":
            return combine_mean_minmax(layer_maps, case.spatial_shape)
        return combine_sum(layer_maps, case.spatial_shape)

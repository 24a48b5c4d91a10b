"""Grad-CAM and Grad-CAM++ adapted to segmentation (ALGORITHMS.md §4).

Both weight a layer's kernels by g = ∂T/∂A_ℓ, the gradient of the target score, which the
engine gets from a backward graph built into the ONNX model (``graph/backward.py``): one
forward+backward run for all selected layers. The layer map and the multi-layer combination
are the CAM ones of the base class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import AttributionMethod, Case, GradientRequest, KernelWeights
from segattr_onnx.methods.registry import register_method

GRADCAM_PP_EPSILON = 1e-6


@register_method
class GradCAM(AttributionMethod):
    name = "gradcam"
    description = "Grad-CAM: kernel weights are the spatial mean of ∂T/∂A"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[GradientRequest]:
        return [GradientRequest(layer.name)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        gradient = np.asarray(results[0], dtype=np.float64)
        weights = gradient.reshape(len(gradient), -1).mean(axis=1)
        return KernelWeights(weights, {"gradient_mean": weights})


@register_method
class GradCAMPlusPlus(AttributionMethod):
    name = "gradcampp"
    description = "Grad-CAM++: positive gradients weighted by the higher-order α coefficients"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[GradientRequest]:
        return [GradientRequest(layer.name)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        gradient = np.asarray(results[0], dtype=np.float64).reshape(layer.kernels, -1)
        activation = case.activations[layer.name].astype(np.float64).reshape(layer.kernels, -1)
        squared = gradient**2
        # α_k,v = g² / (2g² + Σ_u A_k,u · g³ + ε), and 0 where g = 0.
        denominator = 2 * squared + activation.sum(axis=1, keepdims=True) * gradient**3
        alpha = np.where(gradient != 0, squared / (denominator + GRADCAM_PP_EPSILON), 0.0)
        weights = (np.maximum(gradient, 0.0) * alpha).sum(axis=1)
        return KernelWeights(weights, {"alpha_sum": alpha.sum(axis=1)})

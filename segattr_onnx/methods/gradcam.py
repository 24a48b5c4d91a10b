"""Grad-CAM and Grad-CAM++ adapted to segmentation (docs/algorithms.md §4).

Both weight a layer's kernels by g = ∂T/∂A_ℓ, the gradient of the target score, which the
engine gets from a backward graph built into the ONNX model (``graph/backward.py``): one
forward+backward run for all selected layers. The layer map and the multi-layer combination
are the CAM ones of the base class.

The weights are float64 sums over every position of a layer, which in 3D means tens of
millions of values. They are computed a kernel at a time through buffers reused from kernel
to kernel, and Grad-CAM++'s element-wise α a cache-sized block at a time, instead of as
whole-layer float64 copies and temporaries (a 3D U-Net at 128³ spent longer on those than on
its forward pass). Every element-wise step is the same IEEE operation as on whole arrays, and
every sum still runs over a kernel's whole row in the same order, so the results are those of
the whole-array formulas bit for bit (tests/methods/test_gradients.py checks the formulas).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np

from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import AttributionMethod, Case, GradientRequest, KernelWeights
from segattr_onnx.methods.registry import register_method

GRADCAM_PP_EPSILON = 1e-6
BLOCK = 1 << 14  # positions per block of α: five float64 blocks stay in a core's L2 cache


def _rows(values: np.ndarray, kernels: int) -> np.ndarray:
    """(C, *S) as (C, V) without a copy when it is contiguous."""
    return np.asarray(values).reshape(kernels, -1)


def _float64_rows(rows: np.ndarray) -> Iterator[np.ndarray]:
    """Each row in float64, through one buffer reused for every row (valid until the next)."""
    buffer = np.empty(rows.shape[1], dtype=np.float64)
    for row in rows:
        np.copyto(buffer, row)
        yield buffer


def gradient_means(gradient: np.ndarray, kernels: int) -> np.ndarray:
    """mean over positions of each kernel's gradient in float64: the same sums as
    ``gradient.astype(np.float64).reshape(kernels, -1).mean(axis=1)``."""
    rows = _rows(gradient, kernels)
    if rows.dtype == np.float64:
        return rows.mean(axis=1)
    return np.array([row.mean() for row in _float64_rows(rows)], dtype=np.float64)


def gradcampp_weights(
    gradient: np.ndarray, activation: np.ndarray, kernels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++'s w_k = Σ_v ReLU(g_k,v) α_k,v and Σ_v α_k,v, with
    α_k,v = g² / (2g² + Σ_u A_k,u · g³ + ε), and 0 where g = 0, all in float64.

    g³ is the float64 product g²·g: g is float32, so g² is exact and g³ is rounded once (the
    correctly rounded cube; numpy's ``g**3`` calls a general power routine, several times
    slower and off by one unit in the last place on a few percent of values).
    """
    grads, acts = _rows(gradient, kernels), _rows(activation, kernels)
    positions = grads.shape[1]
    weights = np.empty(kernels, dtype=np.float64)
    alpha_sums = np.empty(kernels, dtype=np.float64)
    alpha = np.empty(positions, dtype=np.float64)
    gated = np.empty(positions, dtype=np.float64)  # ReLU(g) α, summed per row at the end
    size = max(1, min(BLOCK, positions))
    g_block, squared_block, work_block = (np.empty(size, dtype=np.float64) for _ in range(3))
    zero_block = np.empty(size, dtype=bool)
    for k in range(kernels):
        np.copyto(alpha, acts[k])  # the row buffer holds A_k until α overwrites it
        total = alpha.sum()
        # Where g = 0 the formula itself gives 0/ε = +0 unless Σ A is not finite (0·inf).
        gate_zeros = not np.isfinite(total)
        for start in range(0, positions, size):
            stop = min(start + size, positions)
            n = stop - start
            g, squared, work = g_block[:n], squared_block[:n], work_block[:n]
            a = alpha[start:stop]
            np.copyto(g, grads[k, start:stop])
            np.multiply(g, g, out=squared)
            np.multiply(squared, g, out=work)  # g³
            np.multiply(total, work, out=work)  # Σ A · g³
            np.multiply(2, squared, out=a)
            np.add(a, work, out=a)  # the denominator
            np.add(a, GRADCAM_PP_EPSILON, out=a)
            np.divide(squared, a, out=a)  # α
            if gate_zeros:
                zeros = zero_block[:n]
                np.equal(g, 0, out=zeros)
                np.copyto(a, 0.0, where=zeros)
            np.maximum(g, 0.0, out=work)
            np.multiply(work, a, out=gated[start:stop])
        weights[k] = gated.sum()
        alpha_sums[k] = alpha.sum()
    return weights, alpha_sums


CANCELLATION = 1e-4  # |Σ_v g| / Σ_v |g| below which a kernel's gradient sums to 0


def gradient_cancels(gradient: np.ndarray, kernels: int) -> bool:
    """True when every kernel's gradient sums to zero up to rounding: |Σ_v g_k,v| ≤ 1e-4 ·
    Σ_v |g_k,v| for every k (and not all of g is 0).

    A normalisation after the layer that subtracts each channel's mean over its positions
    (instance normalisation; group normalisation in SegResNet's blocks) leaves T unchanged
    when a channel of A is shifted, so Σ_v ∂T/∂A_k,v = 0 exactly. What float arithmetic
    returns instead is rounding noise, 1e-8 to 2e-6 of Σ|g| on the fixtures, and Grad-CAM's
    map from it, scaled to [0, 1], looks like an explanation. Layers whose gradient does not
    cancel have a kernel at 4e-3 or more on every fixture, so the threshold sits two orders
    of magnitude from both.
    """
    rows = _rows(gradient, kernels)
    largest = 0.0
    for row in _float64_rows(rows):
        spread = float(np.abs(row).sum())
        if spread > 0:
            largest = max(largest, abs(float(row.sum())) / spread)
    return largest <= CANCELLATION and bool(np.any(rows))


class ZeroGradientMeanWarning(UserWarning):
    """Grad-CAM was asked to explain a layer whose gradient averages to zero exactly."""


@register_method
class GradCAM(AttributionMethod):
    name = "gradcam"
    uses_gradients = True
    description = "Grad-CAM: kernel weights are the spatial mean of ∂T/∂A"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[GradientRequest]:
        return [GradientRequest(layer.name)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        gradient = np.asarray(results[0])
        if gradient_cancels(gradient, len(gradient)):
            warnings.warn(
                f"Grad-CAM's weights are 0 for layer {layer.name!r}: its gradient sums to 0 in "
                "every kernel (a normalisation after it removes each channel's mean), so the "
                "layer adds nothing to the map; explain this model with layercam, hirescam, "
                "gradcampp or kwc",
                ZeroGradientMeanWarning,
                stacklevel=2,
            )
            weights = np.zeros(len(gradient), dtype=np.float64)
        else:
            weights = gradient_means(gradient, len(gradient))
        return KernelWeights(weights, {"gradient_mean": weights})


@register_method
class GradCAMPlusPlus(AttributionMethod):
    name = "gradcampp"
    uses_gradients = True
    description = "Grad-CAM++: positive gradients weighted by the higher-order α coefficients"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[GradientRequest]:
        return [GradientRequest(layer.name)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        weights, alpha_sums = gradcampp_weights(
            results[0], case.activations[layer.name], layer.kernels
        )
        return KernelWeights(weights, {"alpha_sum": alpha_sums})


def elementwise_map(
    gradient: np.ndarray, activation: np.ndarray, kernels: int, positive_gradients: bool
) -> np.ndarray:
    """ReLU(Σ_k g'_k ⊙ A_k) with g' = ReLU(g) (LayerCAM) or g (HiResCAM), float64.

    The products are formed a kernel at a time in float64 through one reused buffer, so a
    3D layer never needs a float64 copy of its whole gradient or activation.
    """
    grads, acts = _rows(gradient, kernels), _rows(activation, kernels)
    total = np.zeros(grads.shape[1], dtype=np.float64)
    product = np.empty(grads.shape[1], dtype=np.float64)
    for k in range(kernels):
        np.copyto(product, grads[k])
        if positive_gradients:
            np.maximum(product, 0.0, out=product)
        product *= acts[k]
        total += product
    np.maximum(total, 0.0, out=total)
    return total.reshape(np.shape(activation)[1:])


class _ElementwiseGradientCAM(AttributionMethod):
    """A CAM whose weights are the gradient at each position rather than its mean: the layer
    map is ReLU(Σ_k g'_k ⊙ A_k). The reported weight of a kernel is the mean of g'_k, for
    comparison with Grad-CAM's (the map does not use it)."""

    uses_gradients = True
    positive_gradients: ClassVar[bool] = True

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[GradientRequest]:
        return [GradientRequest(layer.name)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        gradient = np.asarray(results[0])
        activation = case.activations[layer.name]
        layer_map = elementwise_map(gradient, activation, layer.kernels, self.positive_gradients)
        used = np.maximum(gradient, 0) if self.positive_gradients else gradient
        weights = gradient_means(used, layer.kernels)
        return KernelWeights(weights, {"gradient_mean": weights}, map=layer_map)


@register_method
class LayerCAM(_ElementwiseGradientCAM):
    name = "layercam"
    description = "LayerCAM: each position's activation weighted by its positive gradient"
    positive_gradients = True


@register_method
class HiResCAM(_ElementwiseGradientCAM):
    name = "hirescam"
    description = "HiResCAM: each position's activation weighted by its signed gradient"
    positive_gradients = False

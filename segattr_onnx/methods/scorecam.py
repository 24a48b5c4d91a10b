"""Score-CAM adapted to segmentation (docs/algorithms.md §4): weights from masked-input scores.

Each kernel's activation, upsampled and scaled to [0, 1], masks the input; the target score of
that masked input is the kernel's score, and the weights are the softmax of the scores over the
layer's kernels. P2's published code applied the softmax over the wrong axis, which makes every
weight 1; ``uniform_weights=True`` reproduces that only when asked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import (
    ActivationMaskedInputs,
    AttributionMethod,
    Case,
    KernelWeights,
    MaskedInputRequest,
)
from segattr_onnx.methods.registry import register_method
from segattr_onnx.methods.statistics import TARGET_SCORE


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


@register_method
class ScoreCAM(AttributionMethod):
    name = "scorecam"
    description = "Score-CAM: softmax of the target scores of activation-masked inputs"

    def __init__(self, uniform_weights: bool = False) -> None:
        self.uniform_weights = uniform_weights

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[MaskedInputRequest]:
        if self.uniform_weights:
            return ()  # every weight is 1 whatever the scores; nothing to run
        activation = case.activations[layer.name]
        make_inputs = ActivationMaskedInputs(
            case.x, case.analysis.input.channel_axis, activation, tuple(case.spatial_shape)
        )
        return [MaskedInputRequest(layer.name, len(activation), make_inputs, TARGET_SCORE)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        if self.uniform_weights:
            return KernelWeights(np.ones(layer.kernels))
        scores = results[0][:, 0]
        return KernelWeights(softmax(scores), {"scores": scores})

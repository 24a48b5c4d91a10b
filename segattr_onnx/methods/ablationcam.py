"""Ablation-CAM adapted to segmentation: w_k is the relative drop of T when kernel k is zeroed.

It asks for exactly the rows of KWC's dependent runs (P2 zero-ablation, one kernel removed per
row) with the same statistic, so on a case KWC has already explained no run is repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import AblationRequest, AttributionMethod, Case, KernelWeights
from segattr_onnx.methods.kwc import drop_one_masks
from segattr_onnx.methods.registry import register_method
from segattr_onnx.methods.statistics import OVERLAP


@register_method
class AblationCAM(AttributionMethod):
    name = "ablationcam"
    description = "Ablation-CAM: relative drop of the target score when a kernel is zeroed"

    def ablation_form(self, variant: str) -> str:
        return "block"

    def requests(self, case: Case, layer: KernelLayer) -> Sequence[AblationRequest]:
        return [AblationRequest(layer.name, drop_one_masks(layer.kernels), "block", OVERLAP)]

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        scores = results[0][:, OVERLAP.columns.index("score")]
        weights = (case.base_score - scores) / case.base_score
        return KernelWeights(weights, {"scores": scores})

"""Attribution methods: each turns engine results into kernel weights and layer maps."""

from segattr_onnx.methods.ablationcam import AblationCAM
from segattr_onnx.methods.base import (
    AblationRequest,
    AttributionMethod,
    Case,
    GradientRequest,
    KernelWeights,
    MaskedInputRequest,
    PredictionStatistic,
)
from segattr_onnx.methods.gradcam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from segattr_onnx.methods.input_gradients import (
    GradientInput,
    InputGradientMethod,
    IntegratedGradients,
    SmoothGrad,
)
from segattr_onnx.methods.kwc import KernelWeightedContribution
from segattr_onnx.methods.layers import LAYER_GROUPS, select_layers
from segattr_onnx.methods.registry import create_method, method_names, register_method
from segattr_onnx.methods.scorecam import ScoreCAM

__all__ = [
    "LAYER_GROUPS",
    "AblationCAM",
    "AblationRequest",
    "AttributionMethod",
    "Case",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientInput",
    "GradientRequest",
    "HiResCAM",
    "InputGradientMethod",
    "IntegratedGradients",
    "KernelWeightedContribution",
    "KernelWeights",
    "LayerCAM",
    "MaskedInputRequest",
    "PredictionStatistic",
    "ScoreCAM",
    "SmoothGrad",
    "create_method",
    "method_names",
    "register_method",
    "select_layers",
]

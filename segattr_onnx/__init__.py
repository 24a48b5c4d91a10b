"""segattr-onnx: which regions of the input made an exported segmentation model draw its mask.

The data flows one way: model file → ``graph`` (inspect, rewrite) → ``runtime`` (sessions,
batches) → methods → metrics → CLI.
"""

from segattr_onnx.audit import AuditReport, audit
from segattr_onnx.errors import SegattrError
from segattr_onnx.explainer import Explainer, explain
from segattr_onnx.explanation import Explanation, LayerAttribution
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis, analyse_model
from segattr_onnx.graph.loading import LoadedModel, load_model
from segattr_onnx.inspect import InspectReport, inspect_model
from segattr_onnx.methods import AttributionMethod, method_names, register_method
from segattr_onnx.target import Region, Target

__version__ = "0.1.0"

__all__ = [
    "AttributionMethod",
    "AuditReport",
    "Explainer",
    "Explanation",
    "InspectReport",
    "KernelLayer",
    "LayerAttribution",
    "LoadedModel",
    "ModelAnalysis",
    "Region",
    "SegattrError",
    "Target",
    "__version__",
    "analyse_model",
    "audit",
    "explain",
    "inspect_model",
    "load_model",
    "method_names",
    "register_method",
]

"""segattr-onnx: which regions of the input made an exported segmentation model draw its mask.

The data flows one way: model file → ``graph`` (inspect, rewrite) → ``runtime`` (sessions,
batches) → methods → metrics → CLI.
"""

from segattr_onnx.errors import SegattrError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis, analyse_model
from segattr_onnx.graph.loading import LoadedModel, load_model
from segattr_onnx.inspect import InspectReport, inspect_model

__version__ = "0.1.0"

__all__ = [
    "InspectReport",
    "KernelLayer",
    "LoadedModel",
    "ModelAnalysis",
    "SegattrError",
    "__version__",
    "analyse_model",
    "inspect_model",
    "load_model",
]

"""segattr-onnx: which regions of the input made an exported segmentation model draw its mask.

The data flows one way: model file → ``graph`` (inspect, rewrite) → ``runtime`` (sessions,
batches) → methods → metrics → CLI.

The public names below are imported on first use, not with the package: ``import
segattr_onnx`` (and ``segattr --help``) then costs no onnx, ONNX Runtime or scipy import.
``from segattr_onnx import Explainer`` works as before.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    "AttributionMethod": "segattr_onnx.methods",
    "AuditReport": "segattr_onnx.audit",
    "Explainer": "segattr_onnx.explainer",
    "Explanation": "segattr_onnx.explanation",
    "InspectReport": "segattr_onnx.inspection",
    "KernelLayer": "segattr_onnx.graph.catalogue",
    "LayerAttribution": "segattr_onnx.explanation",
    "LoadedModel": "segattr_onnx.graph.loading",
    "ModelAnalysis": "segattr_onnx.graph.catalogue",
    "Region": "segattr_onnx.target",
    "SegattrError": "segattr_onnx.errors",
    "Target": "segattr_onnx.target",
    "analyse_model": "segattr_onnx.graph.catalogue",
    "audit": "segattr_onnx.audit",
    "explain": "segattr_onnx.explainer",
    "inspect_model": "segattr_onnx.inspection",
    "load_model": "segattr_onnx.graph.loading",
    "method_names": "segattr_onnx.methods",
    "register_method": "segattr_onnx.methods",
}

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

if TYPE_CHECKING:
    from segattr_onnx.audit import AuditReport, audit
    from segattr_onnx.errors import SegattrError
    from segattr_onnx.explainer import Explainer, explain
    from segattr_onnx.explanation import Explanation, LayerAttribution
    from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis, analyse_model
    from segattr_onnx.graph.loading import LoadedModel, load_model
    from segattr_onnx.inspection import InspectReport, inspect_model
    from segattr_onnx.methods import AttributionMethod, method_names, register_method
    from segattr_onnx.target import Region, Target


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package module. Importing the submodule ``segattr_onnx.audit`` would bind the
    *module* to the package's ``audit``; the public ``segattr_onnx.audit`` is the function
    (as when every name was imported up front), so that binding is left out."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "audit" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""Vector-Jacobian products of the ONNX operators segmentation networks are made of.

Each rule gets the builder, the forward node, the gradient of each of its outputs (None where
nothing downstream needs it) and the set of its inputs that need a gradient, and returns the
gradient of those inputs as new tensors. Weights, biases and normalisation statistics are
constants here: only the data path is differentiated. Every rule is checked against central
finite differences in ``tests/graph/test_gradient_rules.py``.

The rules live in one module per family of operators; importing this package imports them
all, and so registers every rule in ``RULES``.
"""

from segattr_onnx.graph.gradient_rules import (
    arithmetic,
    convolution,
    elementwise,
    indexing,
    layout,
    normalisation,
    pooling,
    quantisation,
    reductions,
    resampling,
)
from segattr_onnx.graph.gradient_rules._common import RULES, Gradients, Rule, rule

__all__ = [
    "RULES",
    "Gradients",
    "Rule",
    "arithmetic",
    "convolution",
    "elementwise",
    "indexing",
    "layout",
    "normalisation",
    "pooling",
    "quantisation",
    "reductions",
    "resampling",
    "rule",
]

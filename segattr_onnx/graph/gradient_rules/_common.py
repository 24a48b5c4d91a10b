"""The rule registry and the helpers that several families of rules share."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from segattr_onnx.errors import GradientRuleError
from segattr_onnx.graph.backward import GradientBuilder

Gradients = list[str | None]
Rule = Callable[[GradientBuilder, onnx.NodeProto, Gradients, set[str]], dict[str, str]]
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(function: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = function
        return function

    return register


def _unsupported(node: onnx.NodeProto, why: str) -> GradientRuleError:
    return GradientRuleError(
        f"cannot differentiate {node.op_type} node {node.name!r}: {why}; use a gradient-free "
        "method (kwc, scorecam, ablationcam) or layers after that node"
    )


def _text(b: GradientBuilder, node: onnx.NodeProto, name: str, default: str) -> str:
    value = b.attribute(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _window(b: GradientBuilder, node: onnx.NodeProto, kernel: list[int]):
    """A windowed op's strides, dilations, explicit pads and auto_pad, with ONNX's defaults
    for ``len(kernel)`` spatial axes (Conv, ConvTranspose and the pools read them alike)."""
    spatial = len(kernel)
    strides = list(b.attribute(node, "strides", [1] * spatial))
    dilations = list(b.attribute(node, "dilations", [1] * spatial))
    pads = list(b.attribute(node, "pads", [0] * (2 * spatial)))
    return strides, dilations, pads, _text(b, node, "auto_pad", "NOTSET")


def _along_axis(b: GradientBuilder, gradient: str, axis: int, rank: int, matrix) -> str:
    """``gradient`` times an (out, in) matrix along one axis: the adjoint of a linear map that
    acts on that axis alone (Resize per axis, reflect/edge/wrap Pad per axis)."""
    perm = [a for a in range(rank) if a != axis] + [axis]
    inverse = [perm.index(a) for a in range(rank)]
    moved = b.op("Transpose", [gradient], perm=perm)
    product = b.op("MatMul", [moved, b.const(matrix, hint="axis_adjoint")])
    return b.op("Transpose", [product], perm=inverse)


def _inside(b: GradientBuilder, value: str, low: float, high: float, like: str) -> str:
    above = b.op("Greater", [value, b.scalar(low, like)])
    below = b.op("Less", [value, b.scalar(high, like)])
    return b.op("And", [above, below])

"""The Reduce* operators and CumSum."""

from __future__ import annotations

import numpy as np
import onnx

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _unsupported, rule


def _reduce_axes(b: GradientBuilder, node: onnx.NodeProto) -> list[int] | None:
    rank = b.rank(node.input[0])
    axes = b.attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = b.constant_value(node.input[1])
        if value is None:
            raise _unsupported(node, "axes computed at run time")
        axes = value.tolist()
    if axes is None or len(axes) == 0:
        if b.attribute(node, "noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return sorted(int(a) % rank for a in axes)


@rule("ReduceMean", "ReduceSum")
def _reduce(b, node, dys, needs):
    x = node.input[0]
    axes = _reduce_axes(b, node)
    if axes is None:
        return {x: dys[0]}
    dy = dys[0]
    if not b.attribute(node, "keepdims", 1):
        dy = b.unsqueeze(dy, axes)
    spread = b.op("Expand", [dy, b.shape_of(x)])
    if node.op_type == "ReduceSum":
        return {x: spread}
    shape = b.shape(x)
    count = int(np.prod([shape[a] for a in axes]))
    return {x: b.op("Mul", [spread, b.scalar(1.0 / count, x)])}


@rule("CumSum")
def _cumsum(b, node, dys, needs):
    """The adjoint of a running sum is the running sum the other way, equally exclusive."""
    x = node.input[0]
    exclusive = b.attribute(node, "exclusive", 0)
    reverse = b.attribute(node, "reverse", 0)
    flipped = b.op("CumSum", [dys[0], node.input[1]], exclusive=exclusive, reverse=1 - reverse)
    return {x: flipped}


def _spread(b: GradientBuilder, node: onnx.NodeProto, value: str, axes: list[int]) -> str:
    """A reduced tensor broadcast back over the reduction's input."""
    if not b.attribute(node, "keepdims", 1):
        value = b.unsqueeze(value, axes)
    return b.op("Expand", [value, b.shape_of(node.input[0])])


@rule("ReduceMax", "ReduceMin")
def _reduce_extreme(b, node, dys, needs):
    """To the positions that hold the extreme; ties share it equally (as torch.amax/amin)."""
    x = node.input[0]
    axes = _reduce_axes(b, node)
    if axes is None:  # noop_with_empty_axes: ONNX Runtime returns the input
        return {x: dys[0]}
    hits = b.op(
        "Cast", [b.op("Equal", [x, _spread(b, node, node.output[0], axes)])], to=b.elem_type(x)
    )
    count = b.reduce("ReduceSum", hits, axes, keepdims=1)
    share = b.op("Div", [_spread(b, node, dys[0], axes), count])
    return {x: b.op("Mul", [hits, share])}


# ∂y/∂x of each reduction given x, y spread over x's shape, and the builder.
_REDUCTION_SLOPES = {
    "ReduceL1": lambda b, x, y: b.op("Sign", [x]),
    # x/‖x‖, with ‖x‖ = 0 (then x = 0 there) kept from dividing by zero.
    "ReduceL2": lambda b, x, y: b.op(
        "Div", [x, b.op("Max", [y, b.scalar(float(np.finfo(b.dtype(x)).tiny), x)])]
    ),
    "ReduceSumSquare": lambda b, x, y: b.op("Mul", [x, b.scalar(2, x)]),
    "ReduceLogSumExp": lambda b, x, y: b.op("Exp", [b.op("Sub", [x, y])]),
    "ReduceLogSum": lambda b, x, y: b.op("Exp", [b.op("Neg", [y])]),  # 1/Σx
    "ReduceProd": lambda b, x, y: b.op("Div", [y, x]),  # Π/xᵢ: undefined where an xᵢ is 0
}


@rule(*_REDUCTION_SLOPES)
def _reduce_smooth(b, node, dys, needs):
    x = node.input[0]
    axes = _reduce_axes(b, node)
    if axes is None:  # noop_with_empty_axes: ONNX Runtime returns the input
        return {x: dys[0]}
    slope = _REDUCTION_SLOPES[node.op_type](b, x, _spread(b, node, node.output[0], axes))
    return {x: b.op("Mul", [_spread(b, node, dys[0], axes), slope])}

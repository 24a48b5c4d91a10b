"""Activations and unary math, Softmax and LogSoftmax among them: dy times the local slope."""

from __future__ import annotations

import math

import onnx

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _inside, _text, rule


@rule("Identity", "Dropout")
def _identity(b, node, dys, needs):
    return {node.input[0]: dys[0]}


@rule("Cast")
def _cast(b, node, dys, needs):
    return {node.input[0]: b.op("Cast", [dys[0]], to=b.elem_type(node.input[0]))}


@rule("Relu")
def _relu(b, node, dys, needs):
    x = node.input[0]
    positive = b.op("Greater", [x, b.scalar(0, x)])
    return {x: b.op("Where", [positive, dys[0], b.scalar(0, x)])}


@rule("LeakyRelu")
def _leaky_relu(b, node, dys, needs):
    x = node.input[0]
    alpha = b.attribute(node, "alpha", 0.01)
    positive = b.op("Greater", [x, b.scalar(0, x)])
    return {x: b.op("Where", [positive, dys[0], b.op("Mul", [dys[0], b.scalar(alpha, x)])])}


@rule("PRelu")
def _prelu(b, node, dys, needs):
    x, slope = node.input[0], node.input[1]
    positive = b.op("Greater", [x, b.scalar(0, x)])
    return {x: b.op("Where", [positive, dys[0], b.op("Mul", [dys[0], slope])])}


@rule("Elu")
def _elu(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    alpha = b.attribute(node, "alpha", 1.0)
    positive = b.op("Greater", [x, b.scalar(0, x)])
    slope = b.op("Add", [y, b.scalar(alpha, x)])  # d/dx α(eˣ − 1) = y + α
    return {x: b.op("Where", [positive, dys[0], b.op("Mul", [dys[0], slope])])}


@rule("Sigmoid")
def _sigmoid(b, node, dys, needs):
    y = node.output[0]
    slope = b.op("Mul", [y, b.op("Sub", [b.scalar(1, y), y])])
    return {node.input[0]: b.op("Mul", [dys[0], slope])}


@rule("Tanh")
def _tanh(b, node, dys, needs):
    y = node.output[0]
    slope = b.op("Sub", [b.scalar(1, y), b.op("Mul", [y, y])])
    return {node.input[0]: b.op("Mul", [dys[0], slope])}


@rule("HardSigmoid")
def _hard_sigmoid(b, node, dys, needs):
    x = node.input[0]
    alpha, beta = b.attribute(node, "alpha", 0.2), b.attribute(node, "beta", 0.5)
    linear = b.op("Add", [b.op("Mul", [x, b.scalar(alpha, x)]), b.scalar(beta, x)])
    scaled = b.op("Mul", [dys[0], b.scalar(alpha, x)])
    return {x: b.op("Where", [_inside(b, linear, 0.0, 1.0, x), scaled, b.scalar(0, x)])}


@rule("HardSwish")
def _hard_swish(b, node, dys, needs):
    # y = x·clip(x/6 + 1/2, 0, 1): slope 0 below −3, 1 above 3, (2x + 3)/6 between.
    x = node.input[0]
    middle = b.op("Add", [b.op("Mul", [x, b.scalar(1 / 3, x)]), b.scalar(0.5, x)])
    slope = b.op(
        "Where",
        [
            _inside(b, x, -3.0, 3.0, x),
            middle,
            b.op("Where", [b.op("Greater", [x, b.scalar(0, x)]), b.scalar(1, x), b.scalar(0, x)]),
        ],
    )
    return {x: b.op("Mul", [dys[0], slope])}


@rule("Clip")
def _clip(b, node, dys, needs):
    x = node.input[0]
    if b.opset >= 11:
        low = node.input[1] if len(node.input) > 1 and node.input[1] else None
        high = node.input[2] if len(node.input) > 2 and node.input[2] else None
    else:
        low_value = b.attribute(node, "min")
        high_value = b.attribute(node, "max")
        low = b.scalar(low_value, x) if low_value is not None else None
        high = b.scalar(high_value, x) if high_value is not None else None
    passes = None
    if low is not None:
        passes = b.op("Greater", [x, low])
    if high is not None:
        below = b.op("Less", [x, high])
        passes = below if passes is None else b.op("And", [passes, below])
    if passes is None:
        return {x: dys[0]}
    return {x: b.op("Where", [passes, dys[0], b.scalar(0, x)])}


@rule("Erf")
def _erf(b, node, dys, needs):
    x = node.input[0]
    gauss = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    slope = b.op("Mul", [gauss, b.scalar(2 / math.sqrt(math.pi), x)])
    return {x: b.op("Mul", [dys[0], slope])}


@rule("Exp")
def _exp(b, node, dys, needs):
    return {node.input[0]: b.op("Mul", [dys[0], node.output[0]])}


@rule("Neg")
def _neg(b, node, dys, needs):
    return {node.input[0]: b.op("Neg", [dys[0]])}


@rule("Reciprocal")
def _reciprocal(b, node, dys, needs):
    y = node.output[0]
    return {node.input[0]: b.op("Neg", [b.op("Mul", [dys[0], b.op("Mul", [y, y])])])}


@rule("Sqrt")
def _sqrt(b, node, dys, needs):
    y = node.output[0]
    return {node.input[0]: b.op("Div", [dys[0], b.op("Mul", [y, b.scalar(2, y)])])}


def _softmax_axes(b: GradientBuilder, node: onnx.NodeProto) -> list[int]:
    rank = b.rank(node.input[0])
    if b.opset >= 13:
        axis = b.attribute(node, "axis", -1)
        return [axis % rank]
    axis = b.attribute(node, "axis", 1) % rank  # coerced to 2D: every axis from ``axis`` on
    return list(range(axis, rank))


@rule("Softmax")
def _softmax(b, node, dys, needs):
    y, dy = node.output[0], dys[0]
    weighted = b.reduce("ReduceSum", b.op("Mul", [dy, y]), _softmax_axes(b, node), keepdims=1)
    return {node.input[0]: b.op("Mul", [y, b.op("Sub", [dy, weighted])])}


@rule("LogSoftmax")
def _log_softmax(b, node, dys, needs):
    y, dy = node.output[0], dys[0]
    total = b.reduce("ReduceSum", dy, _softmax_axes(b, node), keepdims=1)
    return {node.input[0]: b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [y]), total])])}


@rule("Abs")
def _abs(b, node, dys, needs):
    x = node.input[0]
    return {x: b.op("Mul", [dys[0], b.op("Sign", [x])])}


@rule("Log")
def _log(b, node, dys, needs):
    return {node.input[0]: b.op("Div", [dys[0], node.input[0]])}


@rule("Sign", "Floor", "Ceil", "Round")
def _piecewise_constant(b, node, dys, needs):
    """Flat almost everywhere: nothing flows back (the input's gradient comes from other paths
    or is zero)."""
    return {}


def _softplus(b: GradientBuilder, x: str) -> str:
    """ln(1 + eˣ) as max(x, 0) + ln(1 + e^−|x|): no overflow, and no Softplus kernel needed
    (ONNX Runtime has none for float64)."""
    tail = b.op("Exp", [b.op("Neg", [b.op("Abs", [x])])])
    return b.op("Add", [b.op("Relu", [x]), b.op("Log", [b.op("Add", [tail, b.scalar(1, x)])])])


@rule("Softplus")
def _softplus_rule(b, node, dys, needs):
    x = node.input[0]
    return {x: b.op("Mul", [dys[0], b.op("Sigmoid", [x])])}


@rule("Softsign")
def _softsign(b, node, dys, needs):
    # y = x/(1 + |x|): slope 1/(1 + |x|)².
    x = node.input[0]
    denominator = b.op("Add", [b.op("Abs", [x]), b.scalar(1, x)])
    return {x: b.op("Div", [dys[0], b.op("Mul", [denominator, denominator])])}


@rule("Mish")
def _mish(b, node, dys, needs):
    # y = x·t, t = tanh(softplus(x)): slope t + x·(1 − t²)·σ(x).
    x = node.input[0]
    t = b.op("Tanh", [_softplus(b, x)])
    one_minus = b.op("Sub", [b.scalar(1, x), b.op("Mul", [t, t])])
    slope = b.op("Add", [t, b.op("Mul", [x, b.op("Mul", [one_minus, b.op("Sigmoid", [x])])])])
    return {x: b.op("Mul", [dys[0], slope])}


@rule("Gelu")
def _gelu(b, node, dys, needs):
    """Exact: Φ(x) + x·φ(x). Tanh approximation 0.5·x·(1 + tanh u), u = √(2/π)(x + 0.044715x³):
    0.5(1 + tanh u) + 0.5·x·(1 − tanh² u)·√(2/π)(1 + 3·0.044715x²)."""
    x = node.input[0]
    square = b.op("Mul", [x, x])
    if _text(b, node, "approximate", "none") == "tanh":
        k = math.sqrt(2 / math.pi)
        cubic = b.op("Add", [x, b.op("Mul", [b.op("Mul", [square, x]), b.scalar(0.044715, x)])])
        t = b.op("Tanh", [b.op("Mul", [cubic, b.scalar(k, x)])])
        half_one_plus = b.op("Mul", [b.op("Add", [t, b.scalar(1, x)]), b.scalar(0.5, x)])
        du = b.op("Add", [b.op("Mul", [square, b.scalar(3 * 0.044715 * k, x)]), b.scalar(k, x)])
        sech2 = b.op("Sub", [b.scalar(1, x), b.op("Mul", [t, t])])
        inner = b.op("Mul", [b.op("Mul", [x, b.scalar(0.5, x)]), b.op("Mul", [sech2, du])])
        slope = b.op("Add", [half_one_plus, inner])
    else:
        erf = b.op("Erf", [b.op("Mul", [x, b.scalar(1 / math.sqrt(2), x)])])
        cdf = b.op("Mul", [b.op("Add", [erf, b.scalar(1, x)]), b.scalar(0.5, x)])
        density = b.op(
            "Mul",
            [
                b.op("Exp", [b.op("Mul", [square, b.scalar(-0.5, x)])]),
                b.scalar(1 / math.sqrt(2 * math.pi), x),
            ],
        )
        slope = b.op("Add", [cdf, b.op("Mul", [x, density])])
    return {x: b.op("Mul", [dys[0], slope])}


@rule("Selu")
def _selu(b, node, dys, needs):
    # y = γx for x > 0, γα(eˣ − 1) otherwise: slope γ, or y + γα.
    x, y = node.input[0], node.output[0]
    alpha = b.attribute(node, "alpha", 1.67326319217681884765625)
    gamma = b.attribute(node, "gamma", 1.05070102214050292968750)
    positive = b.op("Greater", [x, b.scalar(0, x)])
    slope = b.op(
        "Where", [positive, b.scalar(gamma, x), b.op("Add", [y, b.scalar(gamma * alpha, x)])]
    )
    return {x: b.op("Mul", [dys[0], slope])}


@rule("Celu")
def _celu(b, node, dys, needs):
    # y = max(0, x) + min(0, α(e^(x/α) − 1)): slope 1 for x > 0, e^(x/α) otherwise.
    x = node.input[0]
    alpha = b.attribute(node, "alpha", 1.0)
    negative = b.op("Exp", [b.op("Mul", [x, b.scalar(1 / alpha, x)])])
    positive = b.op("Greater", [x, b.scalar(0, x)])
    return {x: b.op("Mul", [dys[0], b.op("Where", [positive, b.scalar(1, x), negative])])}


@rule("ThresholdedRelu")
def _thresholded_relu(b, node, dys, needs):
    x = node.input[0]
    passes = b.op("Greater", [x, b.scalar(b.attribute(node, "alpha", 1.0), x)])
    return {x: b.op("Where", [passes, dys[0], b.scalar(0, x)])}

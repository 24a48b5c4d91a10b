"""Vector-Jacobian products of the ONNX operators segmentation networks are made of.

Each rule gets the builder, the forward node, the gradient of each of its outputs (None where
nothing downstream needs it) and the set of its inputs that need a gradient, and returns the
gradient of those inputs as new tensors. Weights, biases and normalisation statistics are
constants here: only the data path is differentiated. Every rule is checked against central
finite differences in ``tests/graph/test_gradient_rules.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

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


def _along_axis(b: GradientBuilder, gradient: str, axis: int, rank: int, matrix) -> str:
    """``gradient`` times an (out, in) matrix along one axis: the adjoint of a linear map that
    acts on that axis alone (Resize per axis, reflect/edge/wrap Pad per axis)."""
    perm = [a for a in range(rank) if a != axis] + [axis]
    inverse = [perm.index(a) for a in range(rank)]
    moved = b.op("Transpose", [gradient], perm=perm)
    product = b.op("MatMul", [moved, b.const(matrix, hint="axis_adjoint")])
    return b.op("Transpose", [product], perm=inverse)


# ----------------------------------------------------------------------------- elementwise
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


def _inside(b: GradientBuilder, value: str, low: float, high: float, like: str) -> str:
    above = b.op("Greater", [value, b.scalar(low, like)])
    below = b.op("Less", [value, b.scalar(high, like)])
    return b.op("And", [above, below])


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


# ----------------------------------------------------------------------------- arithmetic
@rule("Add", "Sub", "Mul", "Div")
def _binary(b, node, dys, needs):
    first, second = node.input[0], node.input[1]
    y, dy = node.output[0], dys[0]
    grads: dict[str, str] = {}
    if first in needs:
        if node.op_type in ("Add", "Sub"):
            local = dy
        elif node.op_type == "Mul":
            local = b.op("Mul", [dy, second])
        else:
            local = b.op("Div", [dy, second])
        grads[first] = b.unbroadcast(local, first, y)
    if second in needs:
        if node.op_type == "Add":
            local = dy
        elif node.op_type == "Sub":
            local = b.op("Neg", [dy])
        elif node.op_type == "Mul":
            local = b.op("Mul", [dy, first])
        else:  # d(a/b)/db = −a/b² = −y/b
            local = b.op("Neg", [b.op("Div", [b.op("Mul", [dy, y]), second])])
        if first == second and first in grads:
            grads[first] = b.op("Add", [grads[first], b.unbroadcast(local, second, y)])
        else:
            grads[second] = b.unbroadcast(local, second, y)
    return grads


@rule("Sum")
def _sum(b, node, dys, needs):
    return {name: b.unbroadcast(dys[0], name, node.output[0]) for name in node.input if name}


@rule("MatMul")
def _matmul(b, node, dys, needs):
    first, second = node.input[0], node.input[1]
    if b.rank(first) < 2 or b.rank(second) < 2:
        return _matmul_vector(b, node, dys[0], needs)
    y, dy = node.output[0], dys[0]

    def swap_last(name: str) -> str:
        rank = b.rank(name)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return b.op("Transpose", [name], perm=perm)

    grads = {}
    if first in needs:
        grads[first] = b.unbroadcast(b.op("MatMul", [dy, swap_last(second)]), first, y)
    if second in needs:
        grads[second] = b.unbroadcast(b.op("MatMul", [swap_last(first), dy]), second, y)
    return grads


def _matmul_vector(b: GradientBuilder, node: onnx.NodeProto, dy: str, needs: set[str]):
    """MatMul with a 1-D operand, whose axis numpy-style promotion adds and then removes."""
    first, second = node.input[0], node.input[1]
    rank_a, rank_b, rank_y = b.rank(first), b.rank(second), b.rank(node.output[0])
    grads = {}
    if rank_a == 1 and rank_b == 1:  # a dot product
        pairs = ((first, second), (second, first))
        return {name: b.op("Mul", [dy, other]) for name, other in pairs if name in needs}
    if rank_a == 1:  # (k) @ (..., k, n) → (..., n)
        if first in needs:
            column = b.op("MatMul", [second, b.unsqueeze(dy, [rank_y])])  # (..., k, 1)
            grads[first] = b.reduce("ReduceSum", column, [*range(rank_b - 2), rank_b - 1], 0)
        if second in needs:
            grads[second] = b.op("Mul", [b.unsqueeze(first, [1]), b.unsqueeze(dy, [rank_y - 1])])
        return grads
    # (..., m, k) @ (k) → (..., m)
    if first in needs:
        grads[first] = b.op("Mul", [b.unsqueeze(dy, [rank_y]), second])
    if second in needs:
        row = b.op("MatMul", [b.unsqueeze(dy, [rank_y - 1]), first])  # (..., 1, k)
        grads[second] = b.reduce("ReduceSum", row, range(rank_a - 1), keepdims=0)
    return grads


@rule("Gemm")
def _gemm(b, node, dys, needs):
    a, w = node.input[0], node.input[1]
    alpha, beta = b.attribute(node, "alpha", 1.0), b.attribute(node, "beta", 1.0)
    trans_a, trans_b = b.attribute(node, "transA", 0), b.attribute(node, "transB", 0)
    dy = dys[0]
    grads = {}
    if a in needs:
        # Y = α·A'·B' (+ β·C): dA' = α·dY·B'ᵀ; dA = dA' or its transpose.
        product = b.op("Gemm", [dy, w], transB=0 if trans_b else 1, alpha=alpha)
        grads[a] = b.op("Transpose", [product], perm=[1, 0]) if trans_a else product
    if w in needs:
        product = b.op("Gemm", [a, dy], transA=0 if trans_a else 1, alpha=alpha)
        grads[w] = b.op("Transpose", [product], perm=[1, 0]) if trans_b else product
    if len(node.input) > 2 and node.input[2] in needs:
        scaled = b.op("Mul", [dy, b.scalar(beta, node.output[0])])
        grads[node.input[2]] = b.unbroadcast(scaled, node.input[2], node.output[0])
    return grads


# ----------------------------------------------------------------------------- normalisation
@rule("BatchNormalization")
def _batch_norm(b, node, dys, needs):
    x = node.input[0]
    scale, variance = node.input[1], node.input[4]
    epsilon = b.attribute(node, "epsilon", 1e-5)
    std = b.op("Sqrt", [b.op("Add", [variance, b.scalar(epsilon, x)])])
    factor = b.channel_view(b.op("Div", [scale, std]), b.rank(x))
    return {x: b.op("Mul", [dys[0], factor])}


def _normalised_adjoint(
    b: GradientBuilder, x: str, d_normalised: str, axes: list[int], epsilon: float, like: str
) -> str:
    """dX of X̂ = (X − mean)/√(var + ε), statistics over ``axes``, given dX̂:
    (dX̂ − mean dX̂ − X̂·mean(dX̂·X̂)) / √(var + ε), with X̂ recomputed from X."""
    mean = b.reduce("ReduceMean", x, axes)
    centred = b.op("Sub", [x, mean])
    variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), axes)
    std = b.op("Sqrt", [b.op("Add", [variance, b.scalar(epsilon, like)])])
    normalised = b.op("Div", [centred, std])
    mean_d = b.reduce("ReduceMean", d_normalised, axes)
    mean_dx = b.reduce("ReduceMean", b.op("Mul", [d_normalised, normalised]), axes)
    inner = b.op("Sub", [b.op("Sub", [d_normalised, mean_d]), b.op("Mul", [normalised, mean_dx])])
    return b.op("Div", [inner, std])


@rule("InstanceNormalization")
def _instance_norm(b, node, dys, needs):
    x, scale = node.input[0], node.input[1]
    epsilon = b.attribute(node, "epsilon", 1e-5)
    rank = b.rank(x)
    d_normalised = b.op("Mul", [dys[0], b.channel_view(scale, rank)])
    return {x: _normalised_adjoint(b, x, d_normalised, list(range(2, rank)), epsilon, x)}


@rule("LayerNormalization")
def _layer_norm(b, node, dys, needs):
    """Statistics over the axes from ``axis`` on; Scale (and B) broadcast over those axes."""
    x = node.input[0]
    if any(dy is not None for dy in dys[1:]):
        raise _unsupported(node, "its Mean or InvStdDev output on the path")
    rank = b.rank(x)
    axis = b.attribute(node, "axis", -1) % rank
    epsilon = b.attribute(node, "epsilon", 1e-5)
    d_normalised = b.op("Mul", [dys[0], node.input[1]])
    return {x: _normalised_adjoint(b, x, d_normalised, list(range(axis, rank)), epsilon, x)}


@rule("GroupNormalization")
def _group_norm(b, node, dys, needs):
    """Statistics per (sample, group of C/G channels). Opset 18 scales per group (G,), opset
    21 per channel (C,): the scale is applied in the grouped (N, G, −1) view or the input's."""
    x, scale = node.input[0], node.input[1]
    groups = b.attribute(node, "num_groups")
    epsilon = b.attribute(node, "epsilon", 1e-5)
    grouped_shape = b.const(np.array([0, groups, -1], np.int64), hint="groups")
    dy = dys[0]
    if b.opset >= 21:
        dy = b.op("Mul", [dy, b.channel_view(scale, b.rank(x))])
    grouped_dy = b.op("Reshape", [dy, grouped_shape])
    if b.opset < 21:
        grouped_dy = b.op("Mul", [grouped_dy, b.channel_view(scale, 3)])
    grouped_x = b.op("Reshape", [x, grouped_shape])
    return {x: b.reshape_like(_normalised_adjoint(b, grouped_x, grouped_dy, [2], epsilon, x), x)}


# ----------------------------------------------------------------------------- convolution
def _conv_geometry(b: GradientBuilder, node: onnx.NodeProto, small: str, large: str):
    """Strides, dilations, kernel and explicit pads of a Conv (``small`` = its output) or a
    ConvTranspose (``small`` = its input), resolving auto_pad from the static shapes."""
    weight_shape = b.shape(node.input[1])
    kernel = list(b.attribute(node, "kernel_shape", weight_shape[2:]))
    spatial = len(kernel)
    strides = list(b.attribute(node, "strides", [1] * spatial))
    dilations = list(b.attribute(node, "dilations", [1] * spatial))
    pads = list(b.attribute(node, "pads", [0] * (2 * spatial)))
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    small_shape, large_shape = b.shape(small)[2:], b.shape(large)[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            extent = dilations[i] * (kernel[i] - 1) + 1
            total = max(0, (small_shape[i] - 1) * strides[i] + extent - large_shape[i])
            low = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + spatial] = low, total - low
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return kernel, strides, dilations, pads, small_shape, large_shape


def _flipped_transposed_kernel(b: GradientBuilder, weight: str, group: int) -> str:
    """W'[c, m] = flip(W[m, c]) per group: the kernel whose correlation is Conv's adjoint."""
    shape = b.shape(weight)
    out_channels, in_per_group = int(shape[0]), int(shape[1])
    spatial = list(shape[2:])
    rank = len(shape)
    grouped = b.op(
        "Reshape",
        [
            weight,
            b.const(np.array([group, out_channels // group, in_per_group, *spatial], np.int64)),
        ],
    )
    swapped = b.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, rank + 1)])
    merged = b.op(
        "Reshape",
        [
            swapped,
            b.const(np.array([group * in_per_group, out_channels // group, *spatial], np.int64)),
        ],
    )
    axes = list(range(2, rank))
    big = np.iinfo(np.int64).max
    return b.op(
        "Slice",
        [
            merged,
            b.const(np.full(len(axes), -1, np.int64)),
            b.const(np.full(len(axes), -big, np.int64)),
            b.const(np.array(axes, np.int64)),
            b.const(np.full(len(axes), -1, np.int64)),
        ],
        "flip",
    )


@rule("Conv")
def _conv(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    if x not in needs:
        return {}
    kernel, strides, dilations, pads, out_shape, in_shape = _conv_geometry(b, node, y, x)
    spatial = len(kernel)
    group = b.attribute(node, "group", 1)
    reach = [dilations[i] * (kernel[i] - 1) for i in range(spatial)]
    adjoint_pads = [reach[i] - pads[i] for i in range(spatial)] + [
        reach[i] - pads[i + spatial] for i in range(spatial)
    ]
    if all(s == 1 for s in strides) and min(adjoint_pads) >= 0 and b.opset >= 10:
        # Stride 1: the adjoint is a correlation with the flipped, channel-swapped kernel — a
        # plain Conv, which runtimes run far faster than ConvTranspose (notably in 3D).
        flipped = _flipped_transposed_kernel(b, node.input[1], group)
        return {
            x: b.op(
                "Conv",
                [dys[0], flipped],
                "conv_grad",
                dilations=dilations,
                pads=adjoint_pads,
                group=group,
                kernel_shape=kernel,
            )
        }
    # The transposed convolution's output is short by the rows the forward floor dropped.
    output_padding = []
    for i in range(spatial):
        produced = (out_shape[i] - 1) * strides[i] + reach[i] + 1 - pads[i] - pads[i + spatial]
        output_padding.append(in_shape[i] - produced)
    attributes = dict(
        strides=strides, dilations=dilations, pads=pads, group=group, kernel_shape=kernel
    )
    if any(output_padding):
        attributes["output_padding"] = output_padding
    return {x: b.op("ConvTranspose", [dys[0], node.input[1]], "conv_grad", **attributes)}


@rule("ConvTranspose")
def _conv_transpose(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    if x not in needs:
        return {}
    if b.attribute(node, "output_shape") is not None:
        raise _unsupported(node, "the output_shape attribute")
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad.startswith("SAME") and any(b.attribute(node, "output_padding", [])):
        # ONNX shape inference and ONNX Runtime disagree on this output's size.
        raise _unsupported(node, "auto_pad SAME together with output_padding")
    kernel, strides, dilations, pads, _, _ = _conv_geometry(b, node, x, y)
    attributes = dict(
        strides=strides,
        dilations=dilations,
        pads=pads,
        group=b.attribute(node, "group", 1),
        kernel_shape=kernel,
    )
    return {x: b.op("Conv", [dys[0], node.input[1]], "convT_grad", **attributes)}


# ----------------------------------------------------------------------------- pooling
@rule("MaxPool")
def _max_pool(b, node, dys, needs):
    x = node.input[0]
    kernel = list(b.attribute(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(b.attribute(node, "strides", [1] * spatial))
    dilations = list(b.attribute(node, "dilations", [1] * spatial))
    pads = list(b.attribute(node, "pads", [0] * (2 * spatial)))
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if b.attribute(node, "storage_order", 0):
        raise _unsupported(node, "column-major indices (storage_order=1)")
    if len(node.output) < 2 or not node.output[1]:
        indices = b.fresh("maxpool_indices")
        if len(node.output) < 2:
            node.output.append(indices)
        else:
            node.output[1] = indices
    indices = node.output[1]
    extents = [d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True)]
    overlapping = any(s < e for s, e in zip(strides, extents, strict=True))
    plain = (
        not overlapping
        and not any(pads)
        and auto_pad == "NOTSET"
        and not b.attribute(node, "ceil_mode", 0)
        and all(d == 1 for d in dilations)
    )
    if plain:
        # Windows tile the input exactly: MaxUnpool, MaxPool's own inverse, routes the gradient.
        return {
            x: b.op(
                "MaxUnpool",
                [dys[0], indices, b.shape_of(x)],
                kernel_shape=kernel,
                strides=strides,
            )
        }
    # Otherwise scatter into the flattened input (indices are flat positions in it); windows
    # that overlap may pick one position several times, so those need scatter-add.
    if b.opset < (16 if overlapping else 11):
        raise _unsupported(node, "overlapping, padded or dilated windows at this opset")
    flat = b.const(np.array([-1], np.int64))
    flat_x = b.op("Reshape", [b.zeros_like(x), flat])
    flat_dy = b.op("Reshape", [dys[0], flat])
    flat_idx = b.op("Reshape", [indices, flat])
    extra = {"reduction": "add"} if overlapping else {}
    scattered = b.op("ScatterElements", [flat_x, flat_idx, flat_dy], **extra)
    return {x: b.reshape_like(scattered, x)}


@rule("AveragePool")
def _average_pool(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    if b.attribute(node, "ceil_mode", 0):
        raise _unsupported(node, "ceil_mode=1")
    if any(d != 1 for d in b.attribute(node, "dilations", [])):
        raise _unsupported(node, "dilated windows")
    kernel = list(b.attribute(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(b.attribute(node, "strides", [1] * spatial))
    pads = list(b.attribute(node, "pads", [0] * (2 * spatial)))
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        raise _unsupported(node, "auto_pad")
    channels = b.shape(x)[1]
    if not isinstance(channels, int):
        raise _unsupported(node, "an unknown channel count")
    size = int(np.prod(kernel))
    dy = dys[0]
    if any(pads) and not b.attribute(node, "count_include_pad", 0):
        # Border windows average fewer voxels: divide by each window's own count first.
        counts = b.op(
            "Mul",
            [
                b.op(
                    "AveragePool",
                    [
                        b.op(
                            "ConstantOfShape",
                            [b.shape_of(x)],
                            value=numpy_helper.from_array(np.ones(1, b.dtype(x)), "one"),
                        )
                    ],
                    kernel_shape=kernel,
                    strides=strides,
                    pads=pads,
                    count_include_pad=1,
                ),
                b.scalar(size, x),
            ],
        )
        dy, weight = b.op("Div", [dy, counts]), 1.0
    else:
        weight = 1.0 / size
    ones = b.const(np.full((channels, 1, *kernel), weight, dtype=b.dtype(x)), hint="avg_kernel")
    in_shape, out_shape = b.shape(x)[2:], b.shape(y)[2:]
    output_padding = [
        in_shape[i] - ((out_shape[i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + spatial])
        for i in range(spatial)
    ]
    attributes = dict(strides=strides, pads=pads, group=channels, kernel_shape=kernel)
    if any(output_padding):
        attributes["output_padding"] = output_padding
    return {x: b.op("ConvTranspose", [dy, ones], "avgpool_grad", **attributes)}


@rule("GlobalAveragePool")
def _global_average_pool(b, node, dys, needs):
    x = node.input[0]
    spatial = [d for d in b.shape(x)[2:]]
    if not all(isinstance(d, int) for d in spatial):
        raise _unsupported(node, "unknown spatial size")
    spread = b.op("Expand", [dys[0], b.shape_of(x)])
    return {x: b.op("Mul", [spread, b.scalar(1.0 / int(np.prod(spatial)), x)])}


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


# ----------------------------------------------------------------------------- layout
@rule("Transpose")
def _transpose(b, node, dys, needs):
    rank = b.rank(node.input[0])
    perm = list(b.attribute(node, "perm", list(range(rank))[::-1]))
    inverse = [perm.index(axis) for axis in range(rank)]
    return {node.input[0]: b.op("Transpose", [dys[0]], perm=inverse)}


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, dys, needs):
    return {node.input[0]: b.reshape_like(dys[0], node.input[0])}


@rule("Expand")
def _expand(b, node, dys, needs):
    return {node.input[0]: b.unbroadcast(dys[0], node.input[0], node.output[0])}


@rule("Gather")
def _gather(b, node, dys, needs):
    """Scatter the gradient back to the gathered positions (1-D indices: class picks; a scalar
    index, as exporters write x[:, k], is the one-index case with its axis dropped)."""
    x, indices = node.input[0], node.input[1]
    if x not in needs:
        return {}
    rank = b.rank(x)
    axis = b.attribute(node, "axis", 0) % rank
    dy = dys[0]
    if b.rank(indices) == 0:
        dy = b.unsqueeze(dy, [axis])
        indices = b.op("Reshape", [indices, b.const(np.array([1], np.int64))])
        count = 1
    elif b.rank(indices) == 1:
        (count,) = b.shape(indices)
    else:
        raise _unsupported(node, "indices of rank 2 or more")
    view = [1] * rank
    view[axis] = -1
    spread = b.op(
        "Expand",
        [b.op("Reshape", [indices, b.const(np.array(view, np.int64))]), b.shape_of(dy)],
    )
    if count == 1:
        return {x: b.op("ScatterElements", [b.zeros_like(x), spread, dy], axis=axis)}
    if b.opset < 16:
        raise _unsupported(node, "several indices before opset 16 (they may repeat)")
    added = b.op("ScatterElements", [b.zeros_like(x), spread, dy], axis=axis, reduction="add")
    return {x: added}


@rule("Concat")
def _concat(b, node, dys, needs):
    rank = b.rank(node.output[0])
    axis = b.attribute(node, "axis") % rank
    grads, start = {}, 0
    for name in node.input:
        size = b.shape(name)[axis]
        if not isinstance(size, int):
            raise _unsupported(node, "an input of unknown size along the concatenation axis")
        if name in needs:
            grads[name] = b.slice(dys[0], [start], [start + size], [axis])
        start += size
    return grads


@rule("Split")
def _split(b, node, dys, needs):
    rank = b.rank(node.input[0])
    axis = b.attribute(node, "axis", 0) % rank
    parts = [
        dy if dy is not None else b.zeros_like(out)
        for dy, out in zip(dys, node.output, strict=True)
    ]
    return {node.input[0]: b.op("Concat", parts, axis=axis)}


@rule("Slice")
def _slice(b, node, dys, needs):
    x = node.input[0]
    shape = b.shape(x)
    rank = len(shape)
    if b.opset >= 10:
        names = [*list(node.input[1:5]), "", "", ""][:4]
        values = [b.constant_value(n) if n else None for n in names]
        if any(name and value is None for name, value in zip(names, values, strict=True)):
            raise _unsupported(node, "starts, ends, axes or steps computed at run time")
        starts, ends, axes, steps = values
    else:
        starts = np.array(b.attribute(node, "starts"))
        ends = np.array(b.attribute(node, "ends"))
        axes, steps = b.attribute(node, "axes"), None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    if steps is not None and any(int(s) != 1 for s in np.asarray(steps).reshape(-1)):
        raise _unsupported(node, "steps other than 1")
    pads = [0] * (2 * rank)
    for start, end, axis in zip(
        np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1), axes, strict=True
    ):
        size = shape[axis]
        if not isinstance(size, int):
            raise _unsupported(node, "an unknown size along a sliced axis")
        start, end = int(start), int(end)
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        pads[axis], pads[axis + rank] = start, size - max(end, start)
    return {x: b.pad(dys[0], pads)}


def _pad_amounts(b: GradientBuilder, node: onnx.NodeProto) -> list[int]:
    """[begin_0, ..., begin_r, end_0, ..., end_r] from the attribute (opset 2-10) or the pads
    input (11+), spread over every axis when the optional axes input (18+) names a few."""
    rank = b.rank(node.input[0])
    if b.opset < 11:
        pads = b.attribute(node, "pads")
        if pads is None:
            raise _unsupported(node, "the opset-1 paddings attribute")
        return [int(p) for p in pads]
    pads = b.constant_value(node.input[1])
    axes_name = node.input[3] if len(node.input) > 3 else ""
    axes = b.constant_value(axes_name) if axes_name else None
    if pads is None or (axes_name and axes is None):
        raise _unsupported(node, "pads or axes computed at run time")
    pads = [int(p) for p in pads]
    if axes is None:
        return pads
    full = [0] * (2 * rank)
    for i, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
        full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
    return full


@rule("Pad")
def _pad(b, node, dys, needs):
    """Constant: crop the border (and zero-fill what negative pads cut). Reflect, edge and wrap
    copy input rows into the border: per axis a 0/1 (out, in) matrix, read off numpy's pad of
    the row indices, whose transpose adds each border row back onto the row it copies."""
    x = node.input[0]
    mode = _text(b, node, "mode", "constant")
    rank = b.rank(x)
    pads = _pad_amounts(b, node)
    if mode in ("reflect", "edge", "wrap"):
        if min(pads) < 0:
            raise _unsupported(node, f"negative pads with mode {mode!r}")
        gradient = dys[0]
        for axis, size in enumerate(b.shape(x)):
            before, after = pads[axis], pads[axis + rank]
            if not before and not after:
                continue
            if not isinstance(size, int):
                raise _unsupported(node, f"{mode} padding an axis of unknown size")
            source = np.pad(np.arange(size), (before, after), mode=mode)  # out row → in row
            matrix = np.zeros((len(source), size), dtype=b.dtype(x))
            matrix[np.arange(len(source)), source] = 1
            gradient = _along_axis(b, gradient, axis, rank, matrix)
        return {x: gradient}
    if mode != "constant":
        raise _unsupported(node, f"mode {mode!r}")
    out_shape = b.shape(node.output[0])
    # Positive pads added rows: crop them. Negative pads cropped rows: pad them back with 0.
    starts = [max(p, 0) for p in pads[:rank]]
    ends = []
    for axis in range(rank):
        crop = max(pads[axis + rank], 0)
        if not crop:
            ends.append(np.iinfo(np.int64).max)  # up to the end, whatever its size
        elif isinstance(out_shape[axis], int):
            ends.append(out_shape[axis] - crop)
        else:
            raise _unsupported(node, "padding an axis of unknown size")
    dy = b.slice(dys[0], starts, ends, list(range(rank)))
    regrow = [max(-p, 0) for p in pads]
    return {x: b.pad(dy, regrow) if any(regrow) else dy}


# ----------------------------------------------------------------------------- resampling
def _resize_matrix(
    b: GradientBuilder,
    node: onnx.NodeProto,
    axis: int,
    size_in: int,
    size_out: int,
    scale: float | None,
) -> np.ndarray:
    """The (out, in) matrix of the node's own Resize along one axis, read off by running that
    Resize on the identity basis: exact for every mode ONNX Runtime implements."""
    rank = b.rank(node.input[0])
    basis_shape = [size_in] + [1] * (rank - 1)
    basis_shape[axis] = size_in
    basis = np.eye(size_in, dtype=np.float32).reshape(basis_shape)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    opset = b.opset
    scales = np.ones(rank, np.float32)
    scales[axis] = scale if scale is not None else size_out / size_in
    sizes = np.array(basis_shape, np.int64)
    sizes[axis] = size_out
    empty = np.zeros(0, np.float32)
    constants: dict[str, np.ndarray] = {}
    if opset >= 11:
        # roi and scales are required inputs at 11-12 (empty when unused), optional from 13.
        constants["roi"] = empty
        constants["scales"] = scales if scale is not None else empty
        inputs = ["basis", "roi", "scales"]
        if scale is None:
            constants["sizes"] = sizes
            inputs.append("sizes")
        op_type = "Resize"
    elif opset >= 9:
        constants["scales"] = scales
        inputs, op_type = ["basis", "scales"], "Resize" if opset >= 10 else "Upsample"
    elif opset >= 7:
        attributes["scales"] = [float(v) for v in scales]
        inputs, op_type = ["basis"], "Upsample"
    else:
        raise _unsupported(node, f"opset {opset}")
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["out"], **attributes)],
        "resize_probe",
        [helper.make_tensor_value_info("basis", onnx.TensorProto.FLOAT, basis_shape)],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    probe = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=min(max(b.model.ir_version, 3), 10),
    )
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        out = session.run(None, {"basis": basis})[0]
    except Exception as exc:  # ORT's own types: this node's settings cannot be replayed
        raise _unsupported(node, f"its resampling could not be replayed ({exc})") from exc
    rows = np.moveaxis(out, axis, -1).reshape(size_in, -1)  # row i: the resized basis vector e_i
    if rows.shape[1] != size_out:
        raise _unsupported(node, f"a probe gave {rows.shape[1]} outputs, expected {size_out}")
    return rows.T  # (out, in)


@rule("Resize", "Upsample")
def _resize(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    transform = b.attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if isinstance(transform, bytes):
        transform = transform.decode()
    if transform == "tf_crop_and_resize" or b.attribute(node, "axes") is not None:
        raise _unsupported(node, "crop-and-resize or the axes attribute")
    in_shape, out_shape = b.shape(x), b.shape(y)
    scales = None
    scale_input = 1 if node.op_type == "Upsample" or b.opset < 11 else 2
    if len(node.input) > scale_input and node.input[scale_input]:
        scales = b.constant_value(node.input[scale_input])
        if scales is not None and scales.size == 0:
            scales = None
    gradient = dys[0]
    for axis, (size_in, size_out) in enumerate(zip(in_shape, out_shape, strict=True)):
        scale = float(scales[axis]) if scales is not None else None
        if size_in == size_out and (scale is None or scale == 1.0):
            continue
        if axis == 0:
            if scale is None or scale == 1.0:
                continue  # the batch: its symbols may differ by name, it is never resized
            raise _unsupported(node, "resizing the batch axis")
        if not (isinstance(size_in, int) and isinstance(size_out, int)):
            raise _unsupported(node, f"resizing the batch or an unknown axis ({axis})")
        matrix = _resize_matrix(b, node, axis, size_in, size_out, scale).astype(b.dtype(x))
        gradient = _along_axis(b, gradient, axis, len(in_shape), matrix)
    return {x: gradient}


# ----------------------------------------------------------------------------- quantisation
def _per_axis(b: GradientBuilder, node: onnx.NodeProto, vector: str, like: str) -> str:
    if b.rank(vector) == 0 or b.shape(vector) == (1,):
        return vector
    return b.channel_view(vector, b.rank(like), b.attribute(node, "axis", 1) % b.rank(like))


@rule("DequantizeLinear")
def _dequantize(b, node, dys, needs):
    # Straight-through: y = (q − z)·s, so dq = dy·s; with QuantizeLinear's dy/s the pair is 1.
    scale = _per_axis(b, node, node.input[1], node.output[0])
    return {node.input[0]: b.op("Mul", [dys[0], scale])}


_INTEGER_RANGES = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
}


@rule("QuantizeLinear")
def _quantize(b, node, dys, needs):
    """Straight-through inside the integer range, 0 where the value saturated — the fake-quant
    backward. Static quantisation drops ReLUs and lets saturation at the zero point clip, so
    this is where a QDQ model's ReLU derivative lives."""
    x, q = node.input[0], node.output[0]
    scale = _per_axis(b, node, node.input[1], x)
    passed = b.op("Div", [dys[0], scale])
    elem_type = b.elem_type(q) if q in b.infos else onnx.TensorProto.UINT8
    bounds = _INTEGER_RANGES.get(elem_type)
    if bounds is None:
        return {x: passed}
    as_float = b.op("Cast", [q], to=b.elem_type(x))
    inside = _inside(b, as_float, bounds[0], bounds[1], x)
    return {x: b.op("Where", [inside, passed, b.scalar(0, x)])}


# ----------------------------------------------------------------------------- more elementwise
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


def _elem_type_of(b: GradientBuilder, name: str) -> int:
    value = b.constant_value(name)
    if value is not None:
        return helper.np_dtype_to_tensor_dtype(value.dtype)
    return b.elem_type(name)


@rule("Pow")
def _pow(b, node, dys, needs):
    """y = aᵇ: da = dy·b·aᵇ⁻¹; db = dy·y·ln a, taken as 0 where a ≤ 0 (no real logarithm)."""
    base, exponent = node.input[0], node.input[1]
    y, dy = node.output[0], dys[0]
    base_type, exponent_type = b.elem_type(base), _elem_type_of(b, exponent)
    grads = {}
    if base in needs:
        power = exponent
        if exponent_type != base_type:  # integer (or other float) exponents, opset 12+
            power = b.op("Cast", [exponent], to=base_type)
        lowered = b.op("Pow", [base, b.op("Sub", [power, b.scalar(1, base)])])
        grads[base] = b.unbroadcast(b.op("Mul", [dy, b.op("Mul", [power, lowered])]), base, y)
    if exponent in needs:
        positive = b.op("Greater", [base, b.scalar(0, base)])
        log = b.op("Log", [b.op("Where", [positive, base, b.scalar(1, base)])])
        local = b.op("Mul", [dy, b.op("Mul", [y, log])])
        if exponent_type != base_type:
            local = b.op("Cast", [local], to=exponent_type)
        grads[exponent] = b.unbroadcast(local, exponent, y)
    return grads


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


# ----------------------------------------------------------------------------- selection
@rule("Where")
def _where(b, node, dys, needs):
    """X where the condition holds, Y elsewhere; the boolean condition gets nothing."""
    condition, first, second = node.input[0], node.input[1], node.input[2]
    y, dy = node.output[0], dys[0]
    zero = b.scalar(0, y)
    grads = {}
    if first in needs:
        grads[first] = b.unbroadcast(b.op("Where", [condition, dy, zero]), first, y)
    if second in needs:
        grads[second] = b.unbroadcast(b.op("Where", [condition, zero, dy]), second, y)
    return grads


@rule("Max", "Min")
def _min_max(b, node, dys, needs):
    """Each input gets the gradient where it is the result. On ties the first such input takes
    all of it (torch splits maximum/minimum ties evenly): the inputs' gradients still sum to dy."""
    y, dy = node.output[0], dys[0]
    zero = b.scalar(0, y)
    grads, taken = {}, None
    for name in node.input:
        if not name:
            continue
        hits = b.op("Equal", [name, y])
        own = hits if taken is None else b.op("And", [hits, b.op("Not", [taken])])
        taken = hits if taken is None else b.op("Or", [taken, hits])
        if name in needs:
            grads[name] = b.unbroadcast(b.op("Where", [own, dy, zero]), name, y)
    return grads


@rule("Mean")
def _mean(b, node, dys, needs):
    inputs = [name for name in node.input if name]
    share = b.op("Mul", [dys[0], b.scalar(1.0 / len(inputs), node.output[0])])
    return {name: b.unbroadcast(share, name, node.output[0]) for name in inputs if name in needs}


@rule("TopK")
def _top_k(b, node, dys, needs):
    """Values go back to the positions TopK's own indices name (distinct along the axis)."""
    x = node.input[0]
    if dys[0] is None:
        return {}
    if b.opset < 11:
        raise _unsupported(node, "opset below 11 (no ScatterElements)")
    axis = b.attribute(node, "axis", -1) % b.rank(x)
    return {x: b.op("ScatterElements", [b.zeros_like(x), node.output[1], dys[0]], axis=axis)}


@rule("GatherElements")
def _gather_elements(b, node, dys, needs):
    x = node.input[0]
    if x not in needs:
        return {}
    if b.opset < 16:
        raise _unsupported(node, "opset below 16 (indices may repeat: needs scatter-add)")
    axis = b.attribute(node, "axis", 0)
    added = b.op(
        "ScatterElements",
        [b.zeros_like(x), node.input[1], dys[0]],
        axis=axis,
        reduction="add",
    )
    return {x: added}


@rule("GatherND")
def _gather_nd(b, node, dys, needs):
    x = node.input[0]
    if x not in needs:
        return {}
    if b.attribute(node, "batch_dims", 0):
        raise _unsupported(node, "batch_dims (ScatterND has none)")
    if b.opset < 16:
        raise _unsupported(node, "opset below 16 (indices may repeat: needs scatter-add)")
    added = b.op("ScatterND", [b.zeros_like(x), node.input[1], dys[0]], reduction="add")
    return {x: added}


# ----------------------------------------------------------------------------- more layout
@rule("Tile")
def _tile(b, node, dys, needs):
    """Y repeats X rᵢ times along axis i: view dY as (r₀, n₀, r₁, n₁, ...), sum the r axes."""
    x = node.input[0]
    if b.opset < 6:
        raise _unsupported(node, "the opset-1 tiles/axis inputs")
    repeats = b.constant_value(node.input[1])
    if repeats is None:
        raise _unsupported(node, "repeats computed at run time")
    shape = b.shape(x)
    if sum(not isinstance(d, int) for d in shape) > 1:
        raise _unsupported(node, "more than one axis of unknown size")
    view = []
    for count, size in zip(repeats.reshape(-1).tolist(), shape, strict=True):
        view += [int(count), size if isinstance(size, int) else -1]
    viewed = b.op("Reshape", [dys[0], b.const(np.array(view, np.int64), hint="tile_view")])
    return {x: b.reduce("ReduceSum", viewed, range(0, 2 * len(shape), 2), keepdims=0)}


def _regroup_adjoint(b: GradientBuilder, x: str, dy: str, view: list, perm: list[int]) -> str:
    """Adjoint of Reshape(view) → Transpose(perm) → Reshape: the same steps undone."""
    moved = b.op("Reshape", [dy, b.const(np.array([view[p] for p in perm], np.int64), hint="view")])
    back = b.op("Transpose", [moved], perm=[perm.index(a) for a in range(len(perm))])
    return b.reshape_like(back, x)


def _block_geometry(b: GradientBuilder, node: onnx.NodeProto):
    x = node.input[0]
    batch, channels, height, width = b.shape(x)
    if not all(isinstance(d, int) for d in (channels, height, width)):
        raise _unsupported(node, "unknown channel or spatial sizes")
    return (batch if isinstance(batch, int) else -1), channels, height, width


@rule("DepthToSpace")
def _depth_to_space(b, node, dys, needs):
    """DCR: (N, b, b, C/b², H, W) → perm (0, 3, 4, 1, 5, 2); CRD: (N, C/b², b, b, H, W) →
    perm (0, 1, 4, 2, 5, 3); then (N, C/b², H·b, W·b)."""
    x = node.input[0]
    n, c, h, w = _block_geometry(b, node)
    k = b.attribute(node, "blocksize")
    if _text(b, node, "mode", "DCR") == "CRD":
        view, perm = [n, c // (k * k), k, k, h, w], [0, 1, 4, 2, 5, 3]
    else:
        view, perm = [n, k, k, c // (k * k), h, w], [0, 3, 4, 1, 5, 2]
    return {x: _regroup_adjoint(b, x, dys[0], view, perm)}


@rule("SpaceToDepth")
def _space_to_depth(b, node, dys, needs):
    """(N, C, H/b, b, W/b, b) → perm (0, 3, 5, 1, 2, 4) → (N, C·b², H/b, W/b)."""
    x = node.input[0]
    n, c, h, w = _block_geometry(b, node)
    k = b.attribute(node, "blocksize")
    view, perm = [n, c, h // k, k, w // k, k], [0, 3, 5, 1, 2, 4]
    return {x: _regroup_adjoint(b, x, dys[0], view, perm)}


@rule("CumSum")
def _cumsum(b, node, dys, needs):
    """The adjoint of a running sum is the running sum the other way, equally exclusive."""
    x = node.input[0]
    exclusive = b.attribute(node, "exclusive", 0)
    reverse = b.attribute(node, "reverse", 0)
    flipped = b.op("CumSum", [dys[0], node.input[1]], exclusive=exclusive, reverse=1 - reverse)
    return {x: flipped}


@rule("Einsum")
def _einsum(b, node, dys, needs):
    """d operand k = Einsum(dY, the other operands → k's letters). Letters only operand k has
    (summed in the forward) are missing from that product: it is broadcast back along them."""
    equation = _text(b, node, "equation", "").replace(" ", "")
    if "..." in equation:
        raise _unsupported(node, f"an ellipsis in equation {equation!r}")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if "->" not in equation:  # implicit output: the letters used once, alphabetically
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if any(len(set(term)) != len(term) for term in terms):
        raise _unsupported(node, f"a letter repeated within one operand of {equation!r}")
    sizes: dict[str, set] = {}
    for term, name in zip(terms, node.input, strict=True):
        for letter, size in zip(term, b.shape(name), strict=True):
            sizes.setdefault(letter, set()).add(size)
    if any(len(found) > 1 for found in sizes.values()):
        raise _unsupported(node, f"a letter with different sizes (broadcast) in {equation!r}")
    grads = {}
    for k, name in enumerate(node.input):
        if name not in needs:
            continue
        others = [j for j in range(len(terms)) if j != k]
        available = set(output).union(*(terms[j] for j in others))
        kept = "".join(c for c in terms[k] if c in available)
        backward = ",".join([output, *(terms[j] for j in others)]) + "->" + kept
        gradient = b.op("Einsum", [dys[0], *(node.input[j] for j in others)], equation=backward)
        missing = [i for i, c in enumerate(terms[k]) if c not in available]
        if missing:
            gradient = b.op("Expand", [b.unsqueeze(gradient, missing), b.shape_of(name)])
        grads[name] = gradient
    return grads


# ----------------------------------------------------------------------------- more reductions
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


# ----------------------------------------------------------------------------- sampling
def _grid_taps(
    grid: np.ndarray, spatial: tuple, nearest: bool, align_corners: bool, border: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each batch item and output point, the flat input positions GridSample reads and
    their weights, (N, O·T) each (T taps: 1 nearest, 2ᴰ linear), as ONNX Runtime computes them:
    grid[..., k] is the coordinate of spatial axis D−1−k, out-of-range taps weigh 0 (zeros
    padding) or coordinates are clamped first (border)."""
    batch, dims = grid.shape[0], len(spatial)
    per_axis = []
    for axis, size in enumerate(spatial):
        g = grid[..., dims - 1 - axis].astype(np.float64).reshape(batch, -1)
        c = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
        if border:
            c = np.clip(c, 0, size - 1)
        if nearest:
            per_axis.append([(np.rint(c), np.ones_like(c))])
        else:
            low = np.floor(c)
            per_axis.append([(low, 1 - (c - low)), (low + 1, c - low)])
    indices, weights = [], []
    for taps in np.ndindex(*(len(t) for t in per_axis)):
        position = [per_axis[a][t][0].astype(np.int64) for a, t in enumerate(taps)]
        weight = np.prod([per_axis[a][t][1] for a, t in enumerate(taps)], axis=0)
        inside = np.all([(p >= 0) & (p < s) for p, s in zip(position, spatial, strict=True)], 0)
        clipped = [np.clip(p, 0, s - 1) for p, s in zip(position, spatial, strict=True)]
        indices.append(np.ravel_multi_index(clipped, spatial))
        weights.append(np.where(inside, weight, 0.0))
    return np.stack(indices, -1).reshape(batch, -1), np.stack(weights, -1).reshape(batch, -1)


@rule("GridSample")
def _grid_sample(b, node, dys, needs):
    """With a constant grid GridSample is a fixed sparse linear map of the image: its taps and
    weights are computed here, and dY·weight is scatter-added back onto the tapped pixels. The
    grid itself is not differentiated; reflection padding and cubic modes are refused."""
    x, grid_name = node.input[0], node.input[1]
    if x not in needs:
        return {}
    grid = b.constant_value(grid_name)
    if grid is None or grid_name in needs:
        raise _unsupported(node, "a grid that is not a constant")
    mode = _text(b, node, "mode", "bilinear" if b.opset < 20 else "linear")
    padding = _text(b, node, "padding_mode", "zeros")
    if mode not in ("bilinear", "linear", "nearest") or padding not in ("zeros", "border"):
        raise _unsupported(node, f"mode {mode!r} with padding_mode {padding!r}")
    shape = b.shape(x)
    if not all(isinstance(d, int) for d in shape) or shape[0] != grid.shape[0]:
        raise _unsupported(node, "an input of unknown size or another batch than the grid's")
    align_corners = bool(b.attribute(node, "align_corners", 0))
    nearest, border = mode == "nearest", padding == "border"
    indices, weights = _grid_taps(grid, tuple(shape[2:]), nearest, align_corners, border)
    taps = weights.shape[1] // int(np.prod(b.shape(node.output[0])[2:]))
    flat = b.const(np.array([0, 0, -1], np.int64), hint="flat")
    rows = b.op("Reshape", [dys[0], flat])  # (N, C, O)
    weight_view = weights.reshape(shape[0], 1, -1, taps).astype(b.dtype(x))
    spread = b.op("Mul", [b.unsqueeze(rows, [3]), b.const(weight_view, hint="grid_weights")])
    updates = b.op("Reshape", [spread, flat])  # (N, C, O·T)
    where = b.op(
        "Expand",
        [b.const(indices.reshape(shape[0], 1, -1), hint="grid_taps"), b.shape_of(updates)],
    )
    zeros = b.op("Reshape", [b.zeros_like(x), flat])
    added = b.op("ScatterElements", [zeros, where, updates], axis=2, reduction="add")
    return {x: b.reshape_like(added, x)}

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
        raise _unsupported(node, "1-D MatMul operands")
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


@rule("InstanceNormalization")
def _instance_norm(b, node, dys, needs):
    x, scale = node.input[0], node.input[1]
    epsilon = b.attribute(node, "epsilon", 1e-5)
    rank = b.rank(x)
    spatial = list(range(2, rank))
    mean = b.reduce("ReduceMean", x, spatial)
    centred = b.op("Sub", [x, mean])
    variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), spatial)
    std = b.op("Sqrt", [b.op("Add", [variance, b.scalar(epsilon, x)])])
    normalised = b.op("Div", [centred, std])
    d_normalised = b.op("Mul", [dys[0], b.channel_view(scale, rank)])
    mean_d = b.reduce("ReduceMean", d_normalised, spatial)
    mean_dx = b.reduce("ReduceMean", b.op("Mul", [d_normalised, normalised]), spatial)
    inner = b.op("Sub", [b.op("Sub", [d_normalised, mean_d]), b.op("Mul", [normalised, mean_dx])])
    return {x: b.op("Div", [inner, std])}


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
    """Scatter the gradient back to the gathered positions (1-D indices: class picks)."""
    x, indices = node.input[0], node.input[1]
    if x not in needs:
        return {}
    rank = b.rank(x)
    axis = b.attribute(node, "axis", 0) % rank
    if b.rank(indices) != 1:
        raise _unsupported(node, "indices that are not one-dimensional")
    view = [1] * rank
    view[axis] = -1
    spread = b.op(
        "Expand",
        [b.op("Reshape", [indices, b.const(np.array(view, np.int64))]), b.shape_of(dys[0])],
    )
    (count,) = b.shape(indices)
    if count == 1:
        return {x: b.op("ScatterElements", [b.zeros_like(x), spread, dys[0]], axis=axis)}
    if b.opset < 16:
        raise _unsupported(node, "several indices before opset 16 (they may repeat)")
    added = b.op("ScatterElements", [b.zeros_like(x), spread, dys[0]], axis=axis, reduction="add")
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


@rule("Pad")
def _pad(b, node, dys, needs):
    x = node.input[0]
    mode = b.attribute(node, "mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        raise _unsupported(node, f"mode {mode!r} (only constant padding has a rule)")
    rank = b.rank(x)
    if b.opset >= 11:
        pads = b.constant_value(node.input[1])
        axes_name = node.input[3] if len(node.input) > 3 else ""
        if pads is None or (axes_name and b.constant_value(axes_name) is None):
            raise _unsupported(node, "pads or axes computed at run time")
        pads = [int(p) for p in pads]
        if len(node.input) > 3 and node.input[3]:
            axes = [int(a) % rank for a in b.constant_value(node.input[3])]
            full = [0] * (2 * rank)
            for i, axis in enumerate(axes):
                full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
            pads = full
    else:
        pads = list(b.attribute(node, "pads"))
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
        perm = [a for a in range(len(in_shape)) if a != axis] + [axis]
        inverse = [perm.index(a) for a in range(len(in_shape))]
        moved = b.op("Transpose", [gradient], perm=perm)
        product = b.op("MatMul", [moved, b.const(matrix, hint="resize_adjoint")])
        gradient = b.op("Transpose", [product], perm=inverse)
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

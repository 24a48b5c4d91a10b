"""Batch, instance, layer and group normalisation."""

from __future__ import annotations

import numpy as np

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _unsupported, rule


@rule("BatchNormalization")
def _batch_norm(b, node, dys, needs):
    if b.attribute(node, "training_mode", 0):
        raise _unsupported(node, "training_mode=1 (batch statistics)")
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

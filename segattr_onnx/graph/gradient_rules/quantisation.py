"""QuantizeLinear and DequantizeLinear: the straight-through (fake-quant) backward."""

from __future__ import annotations

import onnx

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _inside, rule


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

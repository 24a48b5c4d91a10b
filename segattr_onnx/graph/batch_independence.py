"""Proving from the graph alone that a model keeps the cases of a batch apart.

Batched runs depend on it (``runtime/batch_check.py``), and the run that tests it costs three
passes of the full model: 0.2 s of the first ``segattr explain`` call on the benchmark U-Net,
most of what that call pays over the next. Most exported segmentation networks are made only
of operators that work on each case alone: convolutions, pooling, per-case normalisations,
activations, channel concatenations. When every node that reads the input (directly or
through other nodes) is one of those, with attributes that keep axis 0 out of its arithmetic,
the answer is known without running anything.

The proof is deliberately narrow: an operator not listed, an attribute that could touch the
batch axis, a constant that could broadcast along it, or anything not statically known
(computed weights, scales or pads) leaves the question to the run, exactly as before. Nodes
that read only constants (a quantised weight's DequantizeLinear, say) are not the input's and
are never restricted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from segattr_onnx.graph.index import opset_of

# fmt: off
# Elementwise on one tensor (parameters, if any, checked below).
_ELEMENTWISE = frozenset((
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos",
    "Cosh", "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu",
    "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt",
    "Tan", "Tanh", "ThresholdedRelu",
))
# Broadcasting between their inputs: fine when no constant operand reaches axis 0.
_BROADCASTING = frozenset((
    "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Clip", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "PRelu",
    "Pow", "Sub", "Sum", "Where", "Xor",
))
# Each case alone whatever the attributes (parameters must not depend on the input).
_PER_CASE = frozenset((
    "AveragePool", "Conv", "ConvTranspose", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
    "GroupNormalization", "InstanceNormalization", "LpPool", "LRN", "MaxPool",
))
# fmt: on
_SOFTMAX = frozenset(("Softmax", "LogSoftmax", "Hardmax"))


def provably_keeps_cases_apart(model: onnx.ModelProto, input_name: str, rank: int) -> bool:
    """True when every node reached from ``input_name`` (a batch-first tensor of ``rank``
    axes) computes each case alone; False means "not proven", never "mixes"."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            constants.setdefault(node.output[0], node)
    opset = opset_of(model)
    batched = {input_name}
    for node in graph.node:  # a valid graph lists its nodes in topological order
        reads = [name for name in node.input if name]
        if not any(name in batched for name in reads):
            continue  # computed from constants only: not the input's business
        if not _node_keeps_cases_apart(node, batched, constants, rank, opset):
            return False
        batched.update(name for name in node.output if name)
    return True


def _node_keeps_cases_apart(
    node: onnx.NodeProto, batched: set[str], constants: dict, rank: int, opset: int
) -> bool:
    if node.domain not in ("", "ai.onnx") or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        return False
    op = node.op_type
    data, *parameters = node.input
    others = [name for name in parameters if name]
    # Weights, scales and biases must not depend on the input (constants, or computed from
    # them: a quantised weight's DequantizeLinear).
    fixed = not any(name in batched for name in others)
    if op == "Dropout" and len(others) > 1:
        return False  # a training_mode input: random masks, left to the run
    if op == "MaxPool" and len([o for o in node.output if o]) > 1:
        return False  # its indices count across the whole batch
    if op in _ELEMENTWISE or op in _PER_CASE:
        return data in batched and fixed
    if op in _BROADCASTING:
        return all(
            name in batched or _broadcasts_past_axis0(constants.get(name), rank)
            for name in node.input
            if name
        )
    if op == "BatchNormalization":
        return (
            data in batched
            and len([o for o in node.output if o]) == 1
            and not _attribute(node, "training_mode", 0)
            and fixed
        )
    if op == "LayerNormalization":
        axis = _attribute(node, "axis", -1) % rank
        return data in batched and axis != 0 and fixed
    if op == "Concat":
        return _attribute(node, "axis", None) is not None and (
            _attribute(node, "axis", 0) % rank != 0 and all(name in batched for name in node.input)
        )
    if op in _SOFTMAX:
        axis = _attribute(node, "axis", -1 if opset >= 13 else 1) % rank
        return axis != 0
    if op == "Transpose":
        perm = _attribute(node, "perm", None)
        return perm is not None and len(perm) == rank and int(perm[0]) == 0
    if op in ("Resize", "Upsample"):
        return _resize_keeps_batch(node, constants, opset)
    if op in ("DequantizeLinear", "QuantizeLinear"):
        # Per-tensor (scalar) scale and zero point, constants: elementwise.
        return data in batched and all(
            name in constants and _size(constants[name]) == 1 for name in others
        )
    return False


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _value(constant) -> np.ndarray | None:
    """A constant's value: an initializer, or a Constant node's ``value`` tensor."""
    if isinstance(constant, onnx.TensorProto):
        tensor = constant
    elif isinstance(constant, onnx.NodeProto):
        tensor = _attribute(constant, "value", None)
        if not isinstance(tensor, onnx.TensorProto):
            return None
    else:
        return None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return onnx.numpy_helper.to_array(tensor)


def _shape(constant) -> tuple[int, ...] | None:
    if isinstance(constant, onnx.TensorProto):
        return tuple(int(d) for d in constant.dims)
    value = _value(constant)
    return None if value is None else value.shape


def _size(constant) -> int:
    shape = _shape(constant)
    return -1 if shape is None else int(np.prod(shape, dtype=np.int64))


def _broadcasts_past_axis0(constant, rank: int) -> bool:
    """A constant operand that broadcasts onto a batch-first tensor of ``rank`` axes without
    reaching axis 0: fewer axes (aligned to the last ones), or a leading axis of 1."""
    if constant is None:
        return False
    shape = _shape(constant)
    if shape is None or len(shape) > rank:
        return False
    return len(shape) < rank or shape[0] == 1


def _resize_keeps_batch(node: onnx.NodeProto, constants: dict, opset: int) -> bool:
    """Resize or Upsample by constant scales that leave axis 0 alone (not to fixed sizes)."""
    if node.op_type == "Upsample" and opset < 9:
        scales = _attribute(node, "scales", None)
        return scales is not None and float(scales[0]) == 1.0
    position = 1 if node.op_type == "Upsample" or opset < 11 else 2
    if node.op_type == "Resize" and opset >= 11 and len(node.input) > 3 and node.input[3]:
        return False  # sizes: fixed, batch included
    if _attribute(node, "axes", None) is not None:
        return False  # scales for some axes only: left to the run
    if len(node.input) <= position or node.input[position] not in constants:
        return False
    scales = _value(constants[node.input[position]])
    return scales is not None and scales.size >= 1 and float(scales.reshape(-1)[0]) == 1.0

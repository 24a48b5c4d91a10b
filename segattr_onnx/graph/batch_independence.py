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

import math

import onnx

from segattr_onnx.graph.index import GraphIndex, opset_of, outer_scope_reads

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
    index = GraphIndex(model.graph)
    opset = opset_of(model)
    batched = {input_name}
    for position in index.order:  # exporters may list nodes out of order
        node = index.nodes[position]
        # Reads from inside an If/Loop/Scan body count as reads of that node.
        reads = {name for name in node.input if name} | outer_scope_reads(node)
        if not reads & batched:
            continue  # computed from constants only: not the input's business
        if not _node_keeps_cases_apart(index, position, batched, rank, opset):
            return False
        batched.update(name for name in node.output if name)
    return True


def _node_keeps_cases_apart(
    index: GraphIndex, position: int, batched: set[str], rank: int, opset: int
) -> bool:
    node = index.nodes[position]
    if node.domain not in ("", "ai.onnx") or outer_scope_reads(node):
        return False

    def attribute(name: str, default=None):
        return index.node_attribute(position, name, default)

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
            name in batched or _broadcasts_past_axis0(index, name, rank)
            for name in node.input
            if name
        )
    if op == "BatchNormalization":
        return (
            data in batched
            and len([o for o in node.output if o]) == 1
            and not attribute("training_mode", 0)
            and fixed
        )
    if op == "LayerNormalization":
        return data in batched and attribute("axis", -1) % rank != 0 and fixed
    if op == "Concat":
        axis = attribute("axis")
        return axis is not None and axis % rank != 0 and all(n in batched for n in node.input)
    if op in _SOFTMAX:
        return attribute("axis", -1 if opset >= 13 else 1) % rank != 0
    if op == "Transpose":
        perm = attribute("perm")
        return perm is not None and len(perm) == rank and int(perm[0]) == 0
    if op in ("Resize", "Upsample"):
        return _resize_keeps_batch(index, position, opset)
    if op in ("DequantizeLinear", "QuantizeLinear"):
        # Per-tensor (scalar) scale and zero point, constants: elementwise.
        return data in batched and all(_size(index, name) == 1 for name in others)
    return False


def _shape(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    """A constant's shape (an initializer's without reading its data); None if not one."""
    if name in index.initializers:
        return tuple(int(d) for d in index.initializers[name].dims)
    value = index.constant_value(name)
    return None if value is None else value.shape


def _size(index: GraphIndex, name: str) -> int:
    shape = _shape(index, name)
    return -1 if shape is None else math.prod(shape)


def _broadcasts_past_axis0(index: GraphIndex, name: str, rank: int) -> bool:
    """A constant operand that broadcasts onto a batch-first tensor of ``rank`` axes without
    reaching axis 0: fewer axes (aligned to the last ones), or a leading axis of 1."""
    shape = _shape(index, name)
    if shape is None or len(shape) > rank:
        return False
    return len(shape) < rank or shape[0] == 1


def _resize_keeps_batch(index: GraphIndex, position: int, opset: int) -> bool:
    """Resize or Upsample by constant scales that leave axis 0 alone (not to fixed sizes)."""
    node = index.nodes[position]
    if node.op_type == "Upsample" and opset < 9:
        scales = index.node_attribute(position, "scales")
        return scales is not None and float(scales[0]) == 1.0
    at = 1 if node.op_type == "Upsample" or opset < 11 else 2
    if node.op_type == "Resize" and opset >= 11 and len(node.input) > 3 and node.input[3]:
        return False  # sizes: fixed, batch included
    if index.node_attribute(position, "axes") is not None:
        return False  # scales for some axes only: left to the run
    if len(node.input) <= at:
        return False
    scales = index.constant_value(node.input[at])
    return scales is not None and scales.size >= 1 and float(scales.reshape(-1)[0]) == 1.0

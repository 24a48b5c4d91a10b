"""Reverse-mode differentiation of an ONNX graph, built out of ONNX nodes.

ONNX Runtime has no autograd for inference models, so gradient methods (Grad-CAM, Grad-CAM++)
get their ∂T/∂A from nodes added to the model itself: ``add_vjp`` walks the nodes between the
chosen activations and the seeded outputs in reverse topological order and asks each
operator's rule (``graph/gradient_rules/``) for the vector-Jacobian product of its inputs.
The forward and backward passes then run in one session, one run.

Gradients keep the dtype of the tensor they belong to; constants (weights, norm statistics) are
not differentiated, nor are integer and boolean tensors (shapes, indices, masks) or floats made
only from them. An operator on the path without a rule stops the build with a message that
names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.errors import GradientRuleError
from segattr_onnx.graph.index import GraphIndex, opset_of, outer_scope_reads
from segattr_onnx.graph.shapes import FLOAT_TYPES, TensorInfo
from segattr_onnx.text import setting

GRADIENT_PREFIX = "segattr_grad"


class GradientBuilder:
    """Emits backward nodes into a model copy, with opset-aware helpers for the rules."""

    def __init__(self, model: onnx.ModelProto, infos: Mapping[str, TensorInfo]) -> None:
        self.model = model
        self.graph = model.graph
        self.infos = dict(infos)
        self.opset = opset_of(model)
        self.index = GraphIndex(model.graph)
        self.nodes: list[onnx.NodeProto] = []
        self._taken = {n for node in model.graph.node for n in (*node.input, *node.output)}
        self._taken |= {t.name for t in model.graph.initializer}
        self._taken |= {i.name for i in model.graph.input}
        self._counter = 0

    # ------------------------------------------------------------------ naming and emitting
    def fresh(self, hint: str) -> str:
        base = f"{GRADIENT_PREFIX}/{re.sub(r'[^A-Za-z0-9_.]+', '_', hint)[-60:]}"
        while True:
            self._counter += 1
            name = f"{base}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str = "", **attributes: Any) -> str:
        """Add one node with one output; returns the output's name."""
        output = self.fresh(hint or op_type)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [output], name=output, **attributes)
        )
        return output

    def op_multi(
        self, op_type: str, inputs: Sequence[str], outputs: int, hint: str = "", **attributes: Any
    ) -> list[str]:
        names = [self.fresh(f"{hint or op_type}_{i}") for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=names[0], **attributes)
        )
        return names

    def const(self, value: np.ndarray | float | int | Sequence, dtype=None, hint="c") -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    # ------------------------------------------------------------------ tensor facts
    def info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None and name in self.index.initializers:
            array = numpy_helper.to_array(self.index.initializers[name])
            info = TensorInfo(tuple(array.shape), self.index.initializers[name].data_type)
        if info is None or info.shape is None:
            raise GradientRuleError(
                f"the shape of tensor {name!r} is unknown, which its gradient rule needs; give "
                f"the input size ({setting('--input-shape', 'input_shape=')})"
            )
        return info

    def shape(self, name: str) -> tuple:
        return tuple(self.info(name).shape)

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).numpy_dtype

    def elem_type(self, name: str) -> int:
        return self.info(name).elem_type

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant in the dtype of tensor ``like`` (broadcasts against it)."""
        return self.const(np.array(value, dtype=self.dtype(like)), hint="scalar")

    def constant_value(self, name: str) -> np.ndarray | None:
        return self.index.constant_value(name) if name else None

    def attribute(self, node: onnx.NodeProto, name: str, default=None):
        for attribute in node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    # ------------------------------------------------------------------ opset-aware helpers
    def shape_of(self, name: str) -> str:
        return self.op("Shape", [name], "shape")

    def reduce(self, op_type: str, source: str, axes: Iterable[int], keepdims: int = 1) -> str:
        """ReduceSum/ReduceMean/... with ``axes`` as attribute or input as the opset wants."""
        axes = [int(a) for a in axes]
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(
                op_type,
                [source, self.const(np.array(axes, np.int64), hint="axes")],
                keepdims=keepdims,
            )
        return self.op(op_type, [source], axes=axes, keepdims=keepdims)

    def unsqueeze(self, source: str, axes: Iterable[int]) -> str:
        axes = [int(a) for a in axes]
        if self.opset >= 13:
            return self.op("Unsqueeze", [source, self.const(np.array(axes, np.int64), hint="axes")])
        return self.op("Unsqueeze", [source], axes=axes)

    def reshape_like(self, source: str, like: str) -> str:
        return self.op("Reshape", [source, self.shape_of(like)], "reshape")

    def slice(self, source: str, starts, ends, axes) -> str:
        return self.op(
            "Slice",
            [
                source,
                self.const(np.array(starts, np.int64), hint="starts"),
                self.const(np.array(ends, np.int64), hint="ends"),
                self.const(np.array(axes, np.int64), hint="axes"),
            ],
        )

    def pad(self, source: str, pads: Sequence[int]) -> str:
        """Zero padding; ``pads`` = [begin_0, ..., begin_r, end_0, ..., end_r]."""
        if self.opset >= 11:
            return self.op("Pad", [source, self.const(np.array(pads, np.int64), hint="pads")])
        return self.op("Pad", [source], pads=list(pads), mode="constant")

    def zeros_like(self, name: str) -> str:
        value = numpy_helper.from_array(np.zeros(1, dtype=self.dtype(name)), "zero")
        return self.op("ConstantOfShape", [self.shape_of(name)], "zeros", value=value)

    def channel_view(self, vector: str, rank: int, axis: int = 1) -> str:
        """A per-channel vector (C,) reshaped to broadcast along ``axis`` of a rank-r tensor."""
        shape = [1] * rank
        shape[axis] = -1
        return self.op("Reshape", [vector, self.const(np.array(shape, np.int64), hint="view")])

    def unbroadcast(self, gradient: str, operand: str, result: str) -> str:
        """Sum a gradient over the axes numpy broadcasting stretched ``operand`` along."""
        operand_shape = self.shape(operand)
        result_shape = self.shape(result)
        lead = len(result_shape) - len(operand_shape)
        axes = list(range(lead))
        for position, size in enumerate(operand_shape):
            if size == 1 and result_shape[lead + position] != 1:
                axes.append(lead + position)
        if not axes:
            return gradient
        summed = self.reduce("ReduceSum", gradient, axes, keepdims=1)
        return self.reshape_like(summed, operand)

    def accumulate(self, gradients: list[str]) -> str:
        if len(gradients) == 1:
            return gradients[0]
        return self.op("Sum", gradients, "accumulate")


def _separate_repeated_inputs(model: onnx.ModelProto, infos: dict[str, TensorInfo]) -> None:
    """Give every repeated input of a node (Concat([a, a]), Mul(a, a)) its own Identity copy,
    so each rule sees distinct names and no contribution is lost when gradients are keyed by
    input name."""
    nodes = list(model.graph.node)
    rebuilt: list[onnx.NodeProto] = []
    counter = 0
    for node in nodes:
        seen: set[str] = set()
        for position, name in enumerate(node.input):
            if not name:
                continue
            if name in seen:
                counter += 1
                copy = f"{GRADIENT_PREFIX}/repeat_{counter}/{name}"
                rebuilt.append(helper.make_node("Identity", [name], [copy], name=copy))
                node.input[position] = copy
                if name in infos:
                    infos[copy] = infos[name]
            seen.add(name)
        rebuilt.append(node)
    if counter:
        del model.graph.node[:]
        model.graph.node.extend(rebuilt)


# Outputs that are indices, shapes or truth values by the op's nature: they carry no gradient,
# so nodes that only make them need no rule. Every other output of a node that reads the path,
# integer or not, stays on it: an integer op such as QLinearConv then meets the "no rule"
# refusal instead of silently ending the path with a zero gradient.
# fmt: off
_INDEX_OPS = {
    "Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonMaxSuppression",
    "Range", "ConstantOfShape", "BitShift",
}
# fmt: on
_INDEX_OUTPUTS = {("TopK", 1), ("MaxPool", 1), ("Unique", 1), ("Unique", 2), ("Unique", 3)}


def _reads(node: onnx.NodeProto) -> set[str]:
    return {n for n in node.input if n} | outer_scope_reads(node)


def _carries_gradient(node: onnx.NodeProto, position: int) -> bool:
    if node.op_type in _INDEX_OPS or (node.op_type, position) in _INDEX_OUTPUTS:
        return False
    if node.op_type == "Cast":  # to an integer or bool type: piecewise constant
        target = next((a.i for a in node.attribute if a.name == "to"), None)
        return target in FLOAT_TYPES
    return True


def _differentiable_tensors(index: GraphIndex, wrt: Sequence[str]) -> set[str]:
    """The ``wrt`` tensors and every tensor computed from one of them that can carry a
    gradient: not the shapes, indices and truth values (Shape, ArgMax, Equal, TopK's indices,
    a Cast to int ...), so a float made only from those (Cast(Shape(x)), ConstantOfShape) is a
    constant of the backward pass."""
    differentiable = set(wrt)
    for node_index in index.order:
        node = index.nodes[node_index]
        if not _reads(node) & differentiable:
            continue
        for position, name in enumerate(node.output):
            if name and _carries_gradient(node, position):
                differentiable.add(name)
    return differentiable


def add_vjp(
    model: onnx.ModelProto,
    infos: Mapping[str, TensorInfo],
    cotangents: Mapping[str, str],
    wrt: Sequence[str],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` that also outputs Σ_out cotangent·∂out/∂t for each ``t`` in ``wrt``.

    ``cotangents`` maps forward tensors to tensors (inputs or constants of the model) holding
    the seed gradient of each. Returns the model and, per ``wrt`` tensor, the output name of
    its gradient.
    """
    from segattr_onnx.graph.gradient_rules import RULES  # rules import this module's builder

    result = onnx.ModelProto()
    result.CopyFrom(model)
    infos = dict(infos)
    _separate_repeated_inputs(result, infos)
    builder = GradientBuilder(result, infos)
    index = builder.index
    wrt = list(dict.fromkeys(wrt))
    differentiable = _differentiable_tensors(index, wrt)
    depends = {i for i in index.order if _reads(index.nodes[i]) & differentiable}
    on_path = depends & index.ancestor_nodes(list(cotangents))

    gradients: dict[str, list[str]] = {name: [seed] for name, seed in cotangents.items()}
    for node_index in reversed(index.order):
        if node_index not in on_path:
            continue
        node = index.nodes[node_index]
        output_gradients = [
            builder.accumulate(gradients[o]) if o in gradients else None for o in node.output
        ]
        for output, gradient in zip(node.output, output_gradients, strict=True):
            if gradient is not None:
                gradients[output] = [gradient]  # summed once, reusable
        if all(g is None for g in output_gradients):
            continue
        needs = {name for name in node.input if name and name in differentiable}
        if outer_scope_reads(node) & differentiable:
            raise GradientRuleError(
                f"{node.op_type} node {node.name or node_index!r} reads a tensor on the path "
                "inside its body, which segattr-onnx cannot differentiate; use a gradient-free "
                "method (kwc, scorecam, ablationcam) or layers after that node"
            )
        if not needs:
            continue
        rule = RULES.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            raise GradientRuleError(
                f"no gradient rule for {node.op_type} (node {node.name or node_index!r}) on the "
                "path from the selected layers to the target; use a gradient-free method "
                "(kwc, scorecam, ablationcam) or layers after that node"
            )
        for name, gradient in rule(builder, node, output_gradients, needs).items():
            if gradient is not None and name in needs:
                gradients.setdefault(name, []).append(gradient)

    outputs: dict[str, str] = {}
    for name in wrt:
        if name in gradients:
            final = builder.accumulate(gradients[name])
        else:
            final = builder.zeros_like(name)  # the target does not depend on it
        output = f"{GRADIENT_PREFIX}.{name}"
        builder.nodes.append(helper.make_node("Identity", [final], [output], name=output))
        result.graph.output.append(
            helper.make_tensor_value_info(output, builder.elem_type(name), None)
        )
        outputs[name] = output
    result.graph.node.extend(builder.nodes)
    return result, outputs

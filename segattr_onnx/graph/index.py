"""Read-only lookups over a graph: who produces a tensor, who reads it, what is constant.

Every analysis and rewrite needs the same few questions answered; building the maps once per
graph keeps those questions O(1) and the code that asks them short.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Collection, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

# Ops whose output is a constant when all their inputs are (used to see through weight chains).
_WEIGHT_PASS_THROUGH = {
    "DequantizeLinear",
    "Cast",
    "Identity",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
}


def opset_of(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (which op semantics apply)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def outer_scope_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            local = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            local |= {t.name for t in sub.initializer}
            for inner in sub.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(outer_scope_reads(inner) - local)
    return names


def _constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node, whichever of its value attributes it uses."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t
        if attribute.name in ("value_float", "value_int", "value_floats", "value_ints"):
            value = onnx.helper.get_attribute_value(attribute)
            dtype = np.float32 if "float" in attribute.name else np.int64
            return numpy_helper.from_array(np.array(value, dtype=dtype), node.output[0])
    return None


class GraphIndex:
    """Producer/consumer maps and constant lookups for one ``GraphProto`` (never modified)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in graph.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
            # Reads from inside If/Loop/Scan bodies make the node a consumer too.
            for name in outer_scope_reads(node):
                if index not in self.consumers[name]:
                    self.consumers[name].append(index)
        self.order = self._topological_order()

    def _topological_order(self) -> list[int]:
        """Kahn's order over node indices; ONNX requires it already, but exporters slip."""
        remaining = [0] * len(self.nodes)
        successors: dict[int, list[int]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            parents = {self.producer[n] for n in node.input if n in self.producer}
            remaining[index] = len(parents)
            for parent in parents:
                successors[parent].append(index)
        queue = deque(i for i, count in enumerate(remaining) if count == 0)
        order: list[int] = []
        while queue:
            index = queue.popleft()
            order.append(index)
            for child in successors[index]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    queue.append(child)
        if len(order) != len(self.nodes):
            order.extend(i for i in range(len(self.nodes)) if i not in set(order))
        return order

    # ----------------------------------------------------------------- constants
    def is_constant(self, name: str) -> bool:
        """True when a tensor is an initializer or computed from initializers/Constants only."""
        return self._constant_source(name) is not None

    def _constant_source(self, name: str, depth: int = 0) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        if depth > 8 or name not in self.producer:
            return None
        node = self.nodes[self.producer[name]]
        if node.op_type == "Constant":
            return _constant_node_tensor(node)
        if (
            node.op_type in _WEIGHT_PASS_THROUGH
            and node.input
            and all(self.is_constant(n) for n in node.input[1:] if n)
        ):
            return self._constant_source(node.input[0], depth + 1)
        return None

    def constant_source(self, name: str) -> onnx.TensorProto | None:
        """The stored tensor a constant chain starts from (e.g. the int8 weights behind a DQ)."""
        return self._constant_source(name)

    def constant_value(self, name: str) -> np.ndarray | None:
        """Value of an inline initializer or Constant read directly (None if external/derived)."""
        tensor = None
        if name in self.initializers:
            tensor = self.initializers[name]
        elif name in self.producer and self.nodes[self.producer[name]].op_type == "Constant":
            tensor = self._constant_source(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    # ----------------------------------------------------------------- reachability
    def descendant_nodes(self, tensors: Iterable[str]) -> set[int]:
        """Indices of every node that (transitively) reads any of ``tensors``."""
        seen: set[int] = set()
        stack = [c for t in tensors for c in self.consumers.get(t, [])]
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            for name in self.nodes[index].output:
                stack.extend(self.consumers.get(name, []))
        return seen

    def ancestor_nodes(self, tensors: Iterable[str], stop_at: Collection[int] = ()) -> set[int]:
        """Indices of every node that (transitively) produces an input of ``tensors``; nodes in
        ``stop_at`` are included but not looked behind (their output is known otherwise)."""
        seen: set[int] = set()
        stack = [self.producer[t] for t in tensors if t in self.producer]
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            if index in stop_at:
                continue
            node = self.nodes[index]
            # Tensors an If/Loop/Scan body reads from this graph are inputs of that node too.
            reads = [*node.input, *outer_scope_reads(node)]
            stack.extend(self.producer[n] for n in reads if n in self.producer)
        return seen

    def node_attribute(self, index: int, name: str, default=None):
        """Decoded attribute value of a node, or ``default``."""
        for attribute in self.nodes[index].attribute:
            if attribute.name == name:
                return onnx.helper.get_attribute_value(attribute)
        return default

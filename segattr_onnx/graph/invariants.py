"""Hoisting the part of a graph that no batched input reaches, so it runs once, not per batch.

The graphs an ablation runs many times (a layer's suffix or linear tail) read two kinds of
input: the rows that vary (masks, row indices) and tensors shared by every row (the skip
tensors the prefix computed at batch 1). Whatever depends on the shared tensors alone (the
skip half of a split convolution, ``graph/shared_concat.py``) gives the same result in every
run, yet a session computes it again at each one. With batches kept within the CPU's cache
(``runtime/cpu_cache.py``), one layer's rows take some 30 runs, and on the benchmark U-Net at
256² the skip halves took 9 % of KWC's kernel time. Split off, they run once per layer and
their outputs (the *frontier*) are fed to the varying part like any shared tensor.

Tensors fall in three classes: constant (initializers and what only they feed, which ONNX
Runtime folds itself), invariant (reached by a shared input but by no varying one) and
varying. The invariant part keeps the constants it reads; the varying part keeps its own.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import onnx
from onnx import helper

# Operators whose result changes from run to run without any input doing so: computing them
# once would change what the graph means.
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"}  # fmt: skip


@dataclass(frozen=True)
class HoistedGraph:
    """A graph split in two: ``invariant`` (shared inputs → ``frontier``) runs once,
    ``varying`` (the frontier as inputs, beside the rest) runs per batch."""

    invariant: onnx.ModelProto = field(repr=False)
    varying: onnx.ModelProto = field(repr=False)
    invariant_inputs: tuple[str, ...]
    frontier: tuple[str, ...]


def hoist_invariants(
    model: onnx.ModelProto, varying_inputs: Collection[str]
) -> HoistedGraph | None:
    """Split ``model`` as above, or None when nothing is worth it or it cannot be done safely
    (no invariant node, a subgraph or a random operator, an invariant graph output, a frontier
    tensor whose type is unknown)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in constants]
    if not set(varying_inputs) & set(inputs):
        return None
    kind: dict[str, str] = {name: "constant" for name in constants}
    kind.update({name: "varying" if name in varying_inputs else "invariant" for name in inputs})
    kinds = []
    for node in graph.node:
        if node.op_type in _NONDETERMINISTIC or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return None
        read = {kind.get(name, "varying") for name in node.input if name}  # unknown: varying
        node_kind = next((k for k in ("varying", "invariant") if k in read), "constant")
        kinds.append(node_kind)
        for name in node.output:
            kind[name] = node_kind
    if "invariant" not in kinds:
        return None
    outputs = [o.name for o in graph.output]
    if any(kind.get(name) != "varying" for name in outputs):
        return None

    def tensors(wanted: str, side: str) -> set[str]:
        """The inputs or outputs (``side``) of the nodes of one kind."""
        return {
            name
            for node, node_kind in zip(graph.node, kinds, strict=True)
            if node_kind == wanted
            for name in getattr(node, side)
            if name
        }

    frontier = tuple(sorted(tensors("invariant", "output") & tensors("varying", "input")))
    if not frontier:
        return None
    types = _value_types(model, frontier)
    if types is None:
        return None
    invariant_nodes = [n for n, k in zip(graph.node, kinds, strict=True) if k != "varying"]
    invariant = _keep_for(model, invariant_nodes, [], frontier, types, "invariant")
    varying_nodes = [n for n, k in zip(graph.node, kinds, strict=True) if k != "invariant"]
    varying = _keep_for(model, varying_nodes, frontier, tuple(outputs), types, "varying")
    return HoistedGraph(
        invariant=invariant,
        varying=varying,
        invariant_inputs=tuple(i.name for i in invariant.graph.input),
        frontier=frontier,
    )


def _value_types(model: onnx.ModelProto, names: tuple[str, ...]) -> dict | None:
    """Each name's TypeProto from the model's value_info, else from shape inference."""
    known = {v.name: v.type for v in model.graph.value_info}
    if not all(name in known for name in names):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        known.update({v.name: v.type for v in inferred.graph.value_info})
    found = {}
    for name in names:
        value_type = known.get(name)
        if value_type is None or not value_type.tensor_type.elem_type:
            return None
        found[name] = value_type
    return found


def _value_info(name: str, value_type: onnx.TypeProto) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    info.type.CopyFrom(value_type)
    return info


def _keep_for(
    model: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    fed: tuple[str, ...],
    outputs: tuple[str, ...],
    types: dict,
    part: str,
) -> onnx.ModelProto:
    """Of ``nodes``, those ``outputs`` need, with the graph inputs, initializers and value
    info they read; ``fed`` (frontier tensors) become inputs of their own."""
    graph = model.graph
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if needed & set(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    kept.reverse()
    initializers = {t.name for t in graph.initializer}
    declared = [i for i in graph.input if i.name in needed and i.name not in initializers]
    produced = {name for node in kept for name in node.output}
    declared_outputs = {o.name: o for o in graph.output}
    new_graph = helper.make_graph(
        kept,
        f"{graph.name}_{part}",
        [*declared, *(_value_info(name, types[name]) for name in fed)],
        [declared_outputs.get(name) or _value_info(name, types[name]) for name in outputs],
        [t for t in graph.initializer if t.name in needed],
        value_info=[v for v in graph.value_info if v.name in produced and v.name not in outputs],
    )
    return _model_like(model, new_graph)


def _model_like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    made = helper.make_model(graph, opset_imports=list(model.opset_import))
    made.ir_version = model.ir_version
    made.functions.extend(model.functions)
    return made

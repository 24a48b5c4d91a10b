"""Folding the constant parts of a graph into initializers.

Exporters often compute padding amounts, shapes and slice bounds with small chains of ops on
constants (PyTorch's F.pad to a skip connection's size becomes ConstantOfShape → Concat →
Reshape → Slice → Transpose → Cast). Runtimes fold these when they optimise, but shape
inference and the gradient rules read the graph as written: an unfolded chain leaves a Pad's
output size unknown and a Slice's axes unreadable. Folding them first, by running just those
nodes once, gives every rule literal values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from segattr_onnx.graph.index import GraphIndex

_log = logging.getLogger(__name__)
# Ops whose outputs differ from run to run even on constant inputs, and Q/DQ: a quantised
# weight must stay quantised, or runtimes no longer fuse the QDQ model's integer kernels and
# the rewritten model computes (slightly) differently from the original.
_NOT_FOLDABLE = {
    "DequantizeLinear",
    "QuantizeLinear",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
MAX_FOLDED_ELEMENTS = 1 << 20  # a folded tensor is stored in the graph: keep it small


def fold_constants(
    model: onnx.ModelProto,
    external_data_dir: Path | str | None = None,
    shapes: Mapping[str, tuple] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` where nodes computing only from constants are replaced by their
    values (as initializers). The model is returned unchanged when there is nothing to fold or
    the constant part cannot be run on its own.

    With ``shapes`` (tensor → fully known shape), Shape nodes of those tensors count as
    constants too: a model specialised to one input size, such as the backward model run on
    one case at a time, then loses the size arithmetic dynamic exports compute at run time.
    """
    import onnxruntime as ort

    index = GraphIndex(model.graph)
    declared_inputs = {i.name for i in model.graph.input}
    constant = {name for name in index.initializers if name not in declared_inputs}
    known_shapes: dict[int, np.ndarray] = {}
    for node_index in index.order:
        node = index.nodes[node_index]
        source = node.input[0] if node.input else ""
        shape = (shapes or {}).get(source)
        if node.op_type == "Shape" and shape is not None and all(isinstance(d, int) for d in shape):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            start, end = attributes.get("start", 0), attributes.get("end", len(shape))
            known_shapes[node_index] = np.array(shape[start:end], np.int64)
    foldable: list[int] = []
    for node_index in index.order:
        node = index.nodes[node_index]
        if node_index in known_shapes:
            constant.update(node.output)
            foldable.append(node_index)
            continue
        has_body = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        )
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDABLE or has_body:
            continue
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or (inputs and all(n in constant for n in inputs)):
            constant.update(o for o in node.output if o)
            if node.op_type != "Constant":
                foldable.append(node_index)
    folded_nodes = set(foldable)
    graph_outputs = set(index.graph_outputs)
    targets = [
        output
        for node_index in foldable
        for output in index.nodes[node_index].output
        if output
        and (
            output in graph_outputs
            or any(c not in folded_nodes for c in index.consumers.get(output, []))
        )
    ]
    if not targets:
        return model

    evaluation = onnx.ModelProto()
    evaluation.CopyFrom(model)
    keep = index.ancestor_nodes(targets, stop_at=set(known_shapes))
    del evaluation.graph.node[:]
    for node_index in index.order:
        if node_index not in keep:
            continue
        node = index.nodes[node_index]
        if node_index in known_shapes:  # its value is known: no need for the data behind it
            node = onnx.helper.make_node(
                "Constant",
                [],
                [node.output[0]],
                value=numpy_helper.from_array(known_shapes[node_index], node.output[0]),
            )
        evaluation.graph.node.append(node)
    del evaluation.graph.input[:]
    del evaluation.graph.output[:]
    del evaluation.graph.value_info[:]
    # ORT wants an element type on every output: read them off onnx's type inference.
    typed = onnx.shape_inference.infer_shapes(evaluation, strict_mode=False)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*typed.graph.value_info, *typed.graph.output]
    }
    if any(not types.get(name) for name in targets):
        return model
    for name in targets:
        evaluation.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if external_data_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_dir)
        )
    try:
        session = ort.InferenceSession(
            evaluation.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        values = dict(zip(targets, session.run(targets, {}), strict=True))
    except Exception as exc:  # ORT's own types: leave the graph as written
        _log.info("constant folding skipped: %s", exc)
        return model
    values = {n: v for n, v in values.items() if np.asarray(v).size <= MAX_FOLDED_ELEMENTS}
    if not values:
        return model

    # Keep every node a kept node still needs; drop the folded chains.
    needed = {n for i, node in enumerate(index.nodes) if i not in folded_nodes for n in node.input}
    needed |= graph_outputs
    kept_folded: set[int] = set()
    for node_index in reversed(index.order):
        if node_index not in folded_nodes:
            continue
        node = index.nodes[node_index]
        if any(o in needed and o not in values for o in node.output):
            kept_folded.add(node_index)
            needed.update(node.input)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(
        index.nodes[i] for i in index.order if i not in folded_nodes or i in kept_folded
    )
    for name, value in values.items():
        result.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return result

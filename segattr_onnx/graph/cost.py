"""Multiply-adds of a graph's linear kernels: the work a forward pass cannot avoid.

A KWC explanation is hundreds of forward passes through the part of the model after each
layer; how close it runs to the hardware's limit is a ratio of times to multiply-add counts.
This module counts them from the graph alone (weights' shapes and the tensor shapes of the
analysis), per batch item, for the operators that carry almost all of a segmentation model's
arithmetic: convolutions, transposed convolutions and matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx

from segattr_onnx.graph.index import GraphIndex
from segattr_onnx.graph.shapes import TensorInfo

CONVOLUTIONS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"}
WEIGHT_INPUT = {"QLinearConv": 3}  # the others take their weight as input 1


def _shape(name: str, index: GraphIndex, infos: Mapping[str, TensorInfo]) -> tuple | None:
    info = infos.get(name)
    if info is not None and info.shape is not None:
        return tuple(info.shape)
    tensor = index.initializers.get(name)
    return tuple(tensor.dims) if tensor is not None else None


def _known(shape: tuple | None, skip_batch: bool = True) -> bool:
    if shape is None:
        return False
    return all(isinstance(d, int) for d in (shape[1:] if skip_batch else shape))


def node_macs(node: onnx.NodeProto, index: GraphIndex, infos: Mapping[str, TensorInfo]) -> int:
    """Multiply-adds of one node for one batch item; 0 for nodes that do none (or whose
    shapes are unknown, which the caller's totals then leave out)."""
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return 0
    op = node.op_type
    if op in CONVOLUTIONS or op == "ConvTranspose":
        weight = _shape(node.input[WEIGHT_INPUT.get(op, 1)], index, infos)
        if weight is None or not _known(weight, skip_batch=False) or len(weight) < 3:
            return 0
        kernel = math.prod(weight[2:])
        if op == "ConvTranspose":
            # every input position scatters into C_out/group channels through the kernel
            source = _shape(node.input[0], index, infos)
            if not _known(source):
                return 0
            return math.prod(source[1:]) * weight[1] * kernel
        output = _shape(node.output[0], index, infos)
        if not _known(output):
            return 0
        return math.prod(output[1:]) * weight[1] * kernel  # weight: (C_out, C_in/group, *k)
    if op in ("MatMul", "Gemm"):
        left = _shape(node.input[0], index, infos)
        output = _shape(node.output[0], index, infos)
        if left is None or not _known(output) or len(output) < 2:
            return 0
        transposed = op == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
        inner = left[-2] if transposed else left[-1]
        if not isinstance(inner, int):
            return 0
        # axis 0 is the batch: each of one item's output elements is a dot product of ``inner``
        return math.prod(output[1:]) * inner
    return 0


def graph_macs(
    model: onnx.ModelProto,
    infos: Mapping[str, TensorInfo],
    batched_from: Sequence[str] | None = None,
) -> int:
    """Multiply-adds of one batch item through ``model``'s main graph.

    ``batched_from`` names the inputs that carry the batch (a suffix's mask): only nodes
    depending on them run per item; the rest (a split Conv's half over the shared skip) runs
    once per session run and is left out.

    Tensors a rewrite added after the analysis (the halves of a Conv split over a shared
    Concat, and their gathered weights) take their shapes from onnx's inference; without
    them a suffix's split convolutions counted 0 and the benchmark U-Net's ablation work
    came out at 67 GMAC instead of 108."""
    index = GraphIndex(model.graph)
    initializers = {t.name for t in model.graph.initializer}
    missing = [
        name
        for node in model.graph.node
        if node.op_type in CONVOLUTIONS | {"ConvTranspose", "MatMul", "Gemm"}
        for name in (*node.input[:2], node.output[0])
        if name not in infos and name not in initializers
    ]
    if missing:
        infos = {**_inferred(model, infos, set(missing)), **infos}
    nodes = (
        range(len(model.graph.node))
        if batched_from is None
        else index.descendant_nodes(list(batched_from))
    )
    return sum(node_macs(index.nodes[i], index, infos) for i in nodes)


def _inferred(
    model: onnx.ModelProto, infos: Mapping[str, TensorInfo], names: set[str]
) -> dict[str, TensorInfo]:
    """Shapes of ``names`` by onnx's inference, the graph's inputs declared as ``infos`` has
    them (a cut graph's inputs often carry no shape)."""
    from segattr_onnx.graph.shapes import declared_dims, inferred_value_infos

    declared = onnx.ModelProto()
    declared.CopyFrom(model)
    for graph_input in declared.graph.input:
        info = infos.get(graph_input.name)
        if info is None or info.shape is None or declared_dims(graph_input):
            continue
        dims = ["batch", *info.shape[1:]]
        graph_input.type.CopyFrom(
            onnx.helper.make_tensor_type_proto(info.elem_type, dims)  # type: ignore[arg-type]
        )
    return inferred_value_infos(declared, names)

"""Narrow 1×1 convolutions after a normalisation, as a MatMul, for ONNX Runtime's CPU.

ONNX Runtime runs a float convolution with constant weights in its blocked NCHWc layout: its
input is reordered into blocks of 8 or 16 channels (AVX2, AVX-512), the output is computed for
a whole block of output channels and reordered back. That pays where convolutions follow one
another. A segmentation model's head is different: a 1×1 convolution from the last decoder
features to a few classes, reading an InstanceNormalization (MONAI, nnU-Net) that ONNX Runtime
only runs in plain NCHW. There the head costs two reorders and a block of 16 output channels for
2 classes: 3.1 ms a pass at 16 channels, 256², on one core of a Sapphire Rapids VM, against
1.4 ms for the same product as a plain MatMul (with bit-identical outputs for 2 to 8 classes).
KWC runs the head once per ablation row, 289 times on the benchmark U-Net.

Where the convolution's input comes straight from another convolution (through an activation,
as with batch normalisation folded in), its NCHWc input needs no reorder and the blocked
convolution is faster: those heads are left alone. So are convolutions with padding, strides,
groups, non-float weights or more than ``MAX_CLASSES`` outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.graph.index import GraphIndex, opset_of, outer_scope_reads

# The most output channels rewritten: below one AVX2 block the blocked convolution computes at
# least twice the outputs it keeps (measured up to 8: 1.95 against 2.5 ms).
MAX_CLASSES = 8
# What ONNX Runtime runs only in plain NCHW and hands on as such.
_PLAIN_PRODUCERS = {"InstanceNormalization", "GroupNormalization", "LayerNormalization"}
# Element-wise activations between that producer and the convolution.
_ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Clip", "Softplus"}
_MIN_OPSET = 13  # Reshape with 0 (copy a dim), Slice with its bounds as inputs


def pointwise_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each such convolution as Reshape → MatMul (→ Add) → Reshape; the same
    model object when there is none (the caller's model is never changed)."""
    if opset_of(model) < _MIN_OPSET:
        return model
    weights = {t.name: t for t in model.graph.initializer}
    candidates = [
        position
        for position, node in enumerate(model.graph.node)
        if _narrow_pointwise(node, weights)
    ]
    if not candidates:
        return model
    index = GraphIndex(model.graph)
    chosen = {p for p in candidates if _reads_plain_layout(model.graph.node[p].input[0], index)}
    if not chosen:
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    for position, node in enumerate(graph.node):
        if position in chosen:
            nodes += _as_matmul(node, weights, graph)
            replaced.update(name for name in node.input[1:] if name)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    still_read = {name for node in nodes for name in node.input}
    still_read |= {name for node in nodes for name in outer_scope_reads(node)}
    still_read |= {value.name for value in [*graph.input, *graph.output]}
    for tensor in [t for t in graph.initializer if t.name in replaced - still_read]:
        graph.initializer.remove(tensor)  # the convolutions' own weights, now unread
    return rewritten


def _narrow_pointwise(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto]) -> bool:
    """A plain float 1×1 convolution to at most ``MAX_CLASSES`` channels, constant weights."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    weight = weights.get(node.input[1])
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
        return False
    if weight.data_location == onnx.TensorProto.EXTERNAL:
        return False  # its values are on disk, and a head this narrow is never worth reading
    dims = list(weight.dims)
    if len(dims) < 3 or any(d != 1 for d in dims[2:]) or not 0 < dims[0] <= MAX_CLASSES:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in weights:
        return False
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if attribute.name == "group" and value != 1:
            return False
        if attribute.name in ("strides", "dilations") and any(v != 1 for v in value):
            return False
        if attribute.name == "pads" and any(v != 0 for v in value):
            return False
        if attribute.name == "auto_pad" and value not in (b"NOTSET", b"VALID"):
            return False
    return True


def _reads_plain_layout(tensor: str, index: GraphIndex) -> bool:
    """Whether ``tensor`` comes, through element-wise activations, from an operator ONNX
    Runtime runs only in plain NCHW."""
    for _ in range(8):
        position = index.producer.get(tensor)
        if position is None:
            return False
        producer = index.nodes[position]
        if producer.op_type in _PLAIN_PRODUCERS:
            return True
        if producer.op_type not in _ACTIVATIONS:
            return False
        tensor = producer.input[0]
    return False


def _as_matmul(
    node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """Conv(x, W, b) for a 1×1 kernel: Reshape(W·Reshape(x, [N, C, -1]) + b, [N, O, *S])."""
    stem = f"{node.output[0]}.segattr_pointwise"
    values = numpy_helper.to_array(weights[node.input[1]])
    classes, channels = values.shape[:2]
    constants = [
        numpy_helper.from_array(values.reshape(classes, channels), f"{stem}.weight"),
        numpy_helper.from_array(np.array([0, channels, -1], np.int64), f"{stem}.flat_shape"),
        numpy_helper.from_array(np.array([0, classes], np.int64), f"{stem}.leading"),
        numpy_helper.from_array(np.array([2], np.int64), f"{stem}.spatial_from"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{stem}.to_end"),
    ]
    x, product = node.input[0], f"{stem}.product"
    nodes = [
        helper.make_node("Reshape", [x, f"{stem}.flat_shape"], [f"{stem}.flat"]),
        helper.make_node("MatMul", [f"{stem}.weight", f"{stem}.flat"], [product]),
    ]
    if len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(weights[node.input[2]]).reshape(classes, 1)
        constants.append(numpy_helper.from_array(bias, f"{stem}.bias"))
        nodes.append(helper.make_node("Add", [product, f"{stem}.bias"], [f"{stem}.biased"]))
        product = f"{stem}.biased"
    nodes += [
        helper.make_node("Shape", [x], [f"{stem}.input_shape"]),
        helper.make_node(
            "Slice",
            [f"{stem}.input_shape", f"{stem}.spatial_from", f"{stem}.to_end"],
            [f"{stem}.spatial"],
        ),
        helper.make_node(
            "Concat", [f"{stem}.leading", f"{stem}.spatial"], [f"{stem}.shape"], axis=0
        ),
        helper.make_node("Reshape", [product, f"{stem}.shape"], [node.output[0]], name=node.name),
    ]
    graph.initializer.extend(constants)
    return nodes

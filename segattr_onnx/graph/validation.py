"""Refuse graphs that would crash ONNX Runtime itself, before any session is built.

ONNX Runtime trusts a node's attributes: a convolution with a stride of 0 divides by zero in
its shape computation and kills the process (SIGFPE), with no exception to catch. A model
from a vendor is untrusted input, so the attributes that size windows are checked here and a
bad one is a clear error naming the node.
"""

from __future__ import annotations

import onnx

from segattr_onnx.errors import ModelFileError

_WINDOWED = {
    "Conv",
    "ConvTranspose",
    "QLinearConv",
    "ConvInteger",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "MaxUnpool",
}
_AT_LEAST_ONE = ("strides", "dilations", "kernel_shape")


def check_graph(model: onnx.ModelProto, name: str) -> None:
    """Raise ``ModelFileError`` for a graph with no output or a window attribute ONNX Runtime
    cannot survive (stride, dilation or kernel size below 1, negative pads, group below 1)."""
    if not model.graph.output:
        raise ModelFileError(f"{name} declares no graph output; there is nothing to explain")
    for node in _all_nodes(model.graph):
        if node.op_type not in _WINDOWED or node.domain not in ("", "ai.onnx"):
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for key in _AT_LEAST_ONE:
            values = attributes.get(key)
            if values is not None and any(int(v) < 1 for v in values):
                raise _bad(node, f"{key} {list(values)} (each must be at least 1)", name)
        pads = attributes.get("pads")
        if pads is not None and any(int(v) < 0 for v in pads):
            raise _bad(node, f"pads {list(pads)} (negative)", name)
        group = attributes.get("group")
        if group is not None and int(group) < 1:
            raise _bad(node, f"group {group} (must be at least 1)", name)


def _bad(node: onnx.NodeProto, what: str, name: str) -> ModelFileError:
    return ModelFileError(
        f"{node.op_type} node {node.name!r} of {name} has {what}; ONNX Runtime cannot run it "
        "— re-export the model"
    )


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
                yield from _all_nodes(sub)

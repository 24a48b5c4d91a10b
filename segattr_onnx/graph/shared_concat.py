"""Splitting a Conv over a Concat so the part that reads shared tensors runs once, not K times.

In a U-Net suffix the first convolution of each decoder level reads Concat(upsampled, skip).
The skip is the same for all K ablations of a run (a boundary tensor computed by the prefix at
batch 1), yet the Concat needs it broadcast to batch K (an Expand), copies it K times, and the
Conv spends half its multiply-adds on it K times over. A convolution is linear in its input
channels, so with W = [W_v | W_s] split the same way as the Concat:

    Conv(Concat(v, s), W, b) = Conv(v, W_v, b) + Conv(s, W_s)

and Conv(s, W_s) runs at batch 1 and is added by broadcasting (reading only shared tensors,
it is then hoisted out of the per-chunk graph by ``graph/invariants.py``: once per layer). The
result equals the original up to float rounding (the two partial sums are added in another
order). On the benchmark 2D
U-Net this removed the Concat and Expand time (about a fifth of KWC's ORT time) and a third of
the decoder's first-conv work.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.graph.index import GraphIndex


def split_convs_over_shared_concats(
    model: onnx.ModelProto, shared: dict[str, str], channels: dict[str, int]
) -> set[str]:
    """Rewrite ``model`` in place; returns the shared tensors still read at batch K.

    ``shared`` maps each broadcast tensor (an Expand's output) to its batch-1 source;
    ``channels`` gives the channel count of every Concat input that may be split. A Concat is
    split only when it joins along axis 1, every reader is a plain Conv (group 1, constant
    weights) and every channel count is known; anything else is left as it was.
    """
    graph = model.graph
    index = GraphIndex(graph)
    initializers = {t.name: t for t in graph.initializer}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for concat_index, node in enumerate(index.nodes):
        if node.op_type != "Concat" or not any(name in shared for name in node.input):
            continue
        readers = index.consumers.get(node.output[0], [])
        plan = _split_plan(node, index, readers, initializers, shared, channels)
        if plan is None:
            continue
        dropped.add(concat_index)
        for reader in readers:
            replaced[reader] = _split_conv(
                index.nodes[reader], node, plan, initializers, shared, graph
            )
    if not dropped:
        return set(shared)
    nodes = []
    for position, node in enumerate(index.nodes):
        if position in dropped:
            continue
        nodes.extend(replaced.get(position, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(model, set(shared))
    still_read = {n for node in graph.node for n in node.input}
    return {name for name in shared if name in still_read}


def _split_plan(
    concat: onnx.NodeProto,
    index: GraphIndex,
    readers: list[int],
    initializers: dict[str, onnx.TensorProto],
    shared: dict[str, str],
    channels: dict[str, int],
) -> list[tuple[str, int, int]] | None:
    """(input, first channel, last channel + 1) per Concat input, or None if it cannot split."""
    axis = next((a.i for a in concat.attribute if a.name == "axis"), None)
    if axis not in (1,) or not readers or concat.output[0] in index.graph_outputs:
        return None
    if all(name in shared for name in concat.input):
        return None  # nothing varies: the Concat already runs once per item of nothing
    for reader in readers:
        conv = index.nodes[reader]
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if (
            conv.op_type != "Conv"
            or conv.domain not in ("", "ai.onnx")
            or group != 1
            or conv.input[0] != concat.output[0]
            or conv.input[1] not in initializers
        ):
            return None
    plan, start = [], 0
    for name in concat.input:
        count = channels.get(name)
        if count is None:
            return None
        plan.append((name, start, start + count))
        start += count
    for reader in readers:
        weight = initializers[index.nodes[reader].input[1]]
        if len(weight.dims) < 2 or weight.dims[1] != start:
            return None
    return plan


def _split_conv(
    conv: onnx.NodeProto,
    concat: onnx.NodeProto,
    plan: list[tuple[str, int, int]],
    initializers: dict[str, onnx.TensorProto],
    shared: dict[str, str],
    graph: onnx.GraphProto,
) -> list[onnx.NodeProto]:
    """Conv(varying part, W_v, b) + Conv(shared part at batch 1, W_s)."""
    base = f"{conv.output[0]}.segattr_split"
    nodes: list[onnx.NodeProto] = []
    partials = []
    for part, is_shared in (("varying", False), ("shared", True)):
        pieces = [(name, a, b) for name, a, b in plan if (name in shared) is is_shared]
        columns = np.concatenate([np.arange(a, b) for _, a, b in pieces]).astype(np.int64)
        # The weight's columns are picked in-graph (ORT folds the Gather of an initializer
        # when the session is created), so weights kept in an external file are never read.
        columns_name = f"{base}.{part}_columns"
        graph.initializer.append(numpy_helper.from_array(columns, columns_name))
        weight_name = f"{base}.{part}_weight"
        nodes.append(
            helper.make_node(
                "Gather", [conv.input[1], columns_name], [weight_name], name=weight_name, axis=1
            )
        )
        inputs = [shared[name] if is_shared else name for name, _, _ in pieces]
        source = inputs[0]
        if len(inputs) > 1:
            source = f"{base}.{part}_concat"
            nodes.append(helper.make_node("Concat", inputs, [source], name=source, axis=1))
        conv_inputs = [source, weight_name]
        if not is_shared and len(conv.input) > 2 and conv.input[2]:
            conv_inputs.append(conv.input[2])
        partial = f"{base}.{part}"
        split = helper.make_node("Conv", conv_inputs, [partial], name=partial)
        split.attribute.extend(conv.attribute)
        nodes.append(split)
        partials.append(partial)
    nodes.append(helper.make_node("Add", partials, [conv.output[0]], name=f"{base}.add"))
    return nodes


def _drop_unread(model: onnx.ModelProto, candidates: Collection[str]) -> None:
    """Remove Expand nodes (and their now unread helpers) whose outputs nothing reads."""
    graph = model.graph
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        dead = [
            i
            for i, node in enumerate(graph.node)
            if node.output
            and all(o not in read for o in node.output)
            and _removable(node, candidates)
        ]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {n for node in graph.node for n in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _removable(node: onnx.NodeProto, candidates: Collection[str]) -> bool:
    """An Expand of a shared tensor, or one of the nodes computing its target shape."""
    if node.op_type == "Expand" and node.output[0] in candidates:
        return True
    return node.output[0].startswith("segattr_suffix.")

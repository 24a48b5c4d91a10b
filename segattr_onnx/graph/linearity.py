"""Where a layer's ablations stay linear: the convolutions that read its blended output.

KWC's ablations only scale the channels of a layer's block output, Z' = m ⊙ Z. When every
reader of Z' is a convolution (or a channel Concat that only convolutions read, a U-Net's skip
join), each reader's output is linear in the mask:

    Y(m) = Σ_c m_c · K_c + B,   K_c = conv of channel c of Z alone (no bias),

with B the bias plus whatever the Concat's other inputs contribute. The per-channel
contributions K_c come from one grouped convolution of Z (the cost of one ordinary pass of
the reader), after which a "drop k" row is Y(1) − K_k and a "keep only k" row is K_k + B: the
re-run can start after the readers instead of at Z. This module finds such readers, builds the
grouped convolution that also forms those rows, and declares the rows as the inputs of the
graph after the readers (``runtime/linear_ablation.py`` and ``runtime/ablation.py`` run them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.graph.index import GraphIndex, opset_of
from segattr_onnx.graph.rewrite import AblationSite

LINEAR_READERS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class LinearRead:
    """One convolution reading the blended tensor: Z's channels start at input channel
    ``offset`` of it (0 unless a Concat put other channels first)."""

    node: str
    output: str
    weight: str
    offset: int


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _channel_count(index: GraphIndex, name: str, channel_axis: int, site: AblationSite) -> int:
    if name == site.blended:
        return site.channels
    info = site.new_infos.get(name)
    value = index.constant_value(name)
    if value is not None:
        return int(np.shape(value)[channel_axis])
    if info is not None and info.shape is not None:
        return int(info.shape[channel_axis])
    raise KeyError(name)


def _conv_reads(index: GraphIndex, tensor: str, offset: int) -> list[LinearRead] | None:
    """Every reader of ``tensor`` as a float convolution taking it as its data input, or None
    when some reader is anything else (a normalisation, an activation, a second input)."""
    reads = []
    for position in index.consumers.get(tensor, []):
        node = index.nodes[position]
        if (
            node.op_type not in LINEAR_READERS
            or node.domain not in ("", "ai.onnx")
            or node.input[0] != tensor
            or tensor in node.input[1:]
            or int(_attribute(node, "group", 1)) != 1
            or node.input[1] not in index.initializers
        ):
            return None
        reads.append(LinearRead(node.name, node.output[0], node.input[1], offset))
    return reads


def linear_reads(
    model: onnx.ModelProto, site: AblationSite, infos: dict | None = None
) -> tuple[LinearRead, ...] | None:
    """The convolutions Y(m) is linear in, for a block-form ablation site; None when a reader
    of Z' (or of the Concat holding it) is not such a convolution, or Z' is a graph output."""
    if site.form != "block" or site.channel_axis != 1:
        return None
    index = GraphIndex(model.graph)
    if site.blended in {o.name for o in model.graph.output}:
        return None
    reads: list[LinearRead] = []
    for position in index.consumers.get(site.blended, []):
        node = index.nodes[position]
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            axis = int(_attribute(node, "axis", 0)) % site.rank
            if axis != site.channel_axis or list(node.input).count(site.blended) != 1:
                return None
            before = node.input[: list(node.input).index(site.blended)]
            try:
                offset = sum(_channel_count(index, name, axis, site) for name in before)
            except KeyError:
                return None
            found = _conv_reads(index, node.output[0], offset)
        else:
            found = _conv_reads(index, site.blended, 0)
        if found is None:
            return None
        reads.extend(found)
    return tuple(reads) if reads else None


CONTRIBUTION_SOURCE = "contribution_source"  # (1, g, *S): g channels of Z
CONTRIBUTION_WEIGHTS = "contribution_weights"  # those channels' weights (grouped_weights), ±
ROWS_BASE = "rows_base"  # (1, O·V) float32: Y(1) for "drop" rows, B = Y(0) for "keep only"
ROWS_FORMED = "rows_formed"  # (g, O·V): the base plus each channel's (signed) contribution


def _reader(model: onnx.ModelProto, read: LinearRead) -> onnx.NodeProto:
    """The reading convolution, found by its output: exporters leave node names empty."""
    return next(n for n in model.graph.node if n.output and n.output[0] == read.output)


def grouped_weights(
    model: onnx.ModelProto, site: AblationSite, read: LinearRead, base_dir: str | None = None
) -> np.ndarray:
    """The reader's weights on Z's channels as a grouped convolution wants them, one group per
    channel: (C·O, 1, *k) for a Conv (rows c·O + o hold W[o, offset + c]), (C, O, *k) for a
    ConvTranspose (group c is W[offset + c]); channels c0..c1 are rows c0·O..c1·O, resp.
    c0..c1."""
    index = GraphIndex(model.graph)
    node = _reader(model, read)
    # The weights as stored (inline or in external data, ``base_dir`` holding it).
    weights = numpy_helper.to_array(index.initializers[read.weight], base_dir=base_dir or "")
    channels = site.channels
    if node.op_type == "Conv":
        taken = weights[:, read.offset : read.offset + channels]
        return np.ascontiguousarray(np.swapaxes(taken, 0, 1)).reshape(
            channels * taken.shape[0], 1, *taken.shape[2:]
        )
    return np.ascontiguousarray(weights[read.offset : read.offset + channels])


def contributions_model(
    model: onnx.ModelProto,
    site: AblationSite,
    read: LinearRead,
    group: int,
    values: int,
) -> onnx.ModelProto:
    """A model from ``group`` channels of Z (input ``CONTRIBUTION_SOURCE``, batch 1), their
    grouped weights (``CONTRIBUTION_WEIGHTS``) and a base (``ROWS_BASE``) to the reader's output
    for one row per channel (``ROWS_FORMED``, base + K_c). With the weights negated and Y(1) as
    the base these are the rows that drop channel c (Y(1) − K_c, exactly: negating weights
    negates every product and sum); with the weights as they are and B as the base, the rows
    that keep it alone (B + K_c).

    K comes from one grouped convolution with the reader's attributes, without its bias; the
    weights are an input so that one model serves every slice of channels and both signs. Each
    row is formed here, once, in a single pass over K: forming it in every chunk of the tail (a
    Gather of K_k, a Mul by its sign, a Gather of its base, an Add) read and wrote each row
    four times, 1-4 ms a row on the benchmark U-Net. The arithmetic is float32 whatever the
    model's type (a float16 K is cast up and the rows cast back), as it was on the host.
    ``values`` is O·V, the reader's output size per item."""
    node = _reader(model, read)
    attributes = {
        a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"
    }
    elem_type = site.elem_type
    is_float = elem_type == onnx.TensorProto.FLOAT
    flat = numpy_helper.from_array(np.array([group, values], np.int64), "contributions_flat")
    nodes = [
        helper.make_node(
            node.op_type,
            [CONTRIBUTION_SOURCE, CONTRIBUTION_WEIGHTS],
            ["contributions"],
            group=group,
            **attributes,
        ),
        helper.make_node("Reshape", ["contributions", flat.name], ["contributions_rows"]),
    ]
    if is_float:
        nodes.append(helper.make_node("Add", [ROWS_BASE, "contributions_rows"], [ROWS_FORMED]))
    else:
        nodes += [
            helper.make_node(
                "Cast", ["contributions_rows"], ["contributions_float"], to=onnx.TensorProto.FLOAT
            ),
            helper.make_node("Add", [ROWS_BASE, "contributions_float"], ["rows_float"]),
            helper.make_node("Cast", ["rows_float"], [ROWS_FORMED], to=elem_type),
        ]
    graph = helper.make_graph(
        nodes,
        "contributions",
        [
            helper.make_tensor_value_info(CONTRIBUTION_SOURCE, elem_type, None),
            helper.make_tensor_value_info(CONTRIBUTION_WEIGHTS, elem_type, None),
            helper.make_tensor_value_info(ROWS_BASE, onnx.TensorProto.FLOAT, [1, values]),
        ],
        [helper.make_tensor_value_info(ROWS_FORMED, elem_type, [group, values])],
        [flat],
    )
    opset = max(opset_of(model), 13)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version
    )


def rows_as_inputs(
    tail: onnx.ModelProto, reads: tuple[LinearRead, ...], shapes: dict[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """``tail`` with each reader's output declared as a batch of rows of its known shape,
    (rows, *shape): the rows are fed from the table ``contributions_model`` fills, and ONNX
    Runtime plans (and blocks) the convolutions after them only on inputs of known rank.
    ``shapes`` gives each reader output's shape without the batch, (O, *S')."""
    typed = onnx.ModelProto()
    typed.CopyFrom(tail)
    outputs = {read.output for read in reads}
    for declared in typed.graph.input:
        if declared.name in outputs:
            elem_type = declared.type.tensor_type.elem_type
            declared.CopyFrom(
                helper.make_tensor_value_info(
                    declared.name, elem_type, ["rows", *shapes[declared.name]]
                )
            )
    return typed

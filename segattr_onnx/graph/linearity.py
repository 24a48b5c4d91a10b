"""Where a layer's ablations stay linear: the convolutions that read its blended output.

KWC's ablations only scale the channels of a layer's block output, Z' = m ⊙ Z. When every
reader of Z' is a convolution (or a channel Concat that only convolutions read, a U-Net's skip
join), each reader's output is linear in the mask:

    Y(m) = Σ_c m_c · K_c + B,   K_c = conv of channel c of Z alone (no bias),

with B the bias plus whatever the Concat's other inputs contribute. The per-channel
contributions K_c come from one grouped convolution of Z (the cost of one ordinary pass of
the reader), after which a "drop k" row is Y(1) − K_k and a "keep only k" row is K_k + B: the
re-run can start after the readers instead of at Z. This module finds such readers, builds the
grouped convolution, and puts the row arithmetic in front of the graph after the readers
(``runtime/linear_ablation.py`` and ``runtime/ablation.py`` run them).
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
CONTRIBUTION_WEIGHTS = "contribution_weights"  # those channels' weights, from grouped_weights
CONTRIBUTIONS = "contributions"  # (1, g·O, *S'): K as (g, O·V) in memory


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
    model: onnx.ModelProto, site: AblationSite, read: LinearRead, group: int
) -> onnx.ModelProto:
    """A model from ``group`` channels of Z (input ``CONTRIBUTION_SOURCE``, batch 1) and their
    grouped weights (input ``CONTRIBUTION_WEIGHTS``) to their contributions K (output
    ``CONTRIBUTIONS``): one grouped convolution with the reader's attributes, without its bias.
    The weights are an input so that one model serves every slice of channels, when the
    contributions of all C at once would not fit in memory. The output is the convolution's
    own, (1, group·O, *S'), whose memory is K as (group, O·V): a Reshape as the graph's output
    was a copy (ORT does not alias a graph output), 39 ms a layer on the benchmark U-Net."""
    node = _reader(model, read)
    attributes = {
        a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"
    }
    elem_type = site.elem_type
    conv = helper.make_node(
        node.op_type,
        [CONTRIBUTION_SOURCE, CONTRIBUTION_WEIGHTS],
        [CONTRIBUTIONS],
        group=group,
        **attributes,
    )
    graph = helper.make_graph(
        [conv],
        "contributions",
        [
            helper.make_tensor_value_info(CONTRIBUTION_SOURCE, elem_type, None),
            helper.make_tensor_value_info(CONTRIBUTION_WEIGHTS, elem_type, None),
        ],
        [helper.make_tensor_value_info(CONTRIBUTIONS, elem_type, None)],
    )
    opset = max(opset_of(model), 13)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version
    )


# The per-row inputs of a tail whose readers' outputs are formed in-graph (``forming_rows``).
ROW_KERNEL = "segattr_row_kernel"  # (B,) int64: the row's kernel k
ROW_BASE = "segattr_row_base"  # (B,) int64: 0 starts from Y(1), 1 from B
ROW_SIGN = "segattr_row_sign"  # (B, 1) float32: +1 adds K_k, −1 takes it away, 0 neither


def contributions_input(read: LinearRead) -> str:
    """The tail's input holding a reader's contributions K, (C, O·V) float32."""
    return f"{read.output}.segattr_contributions"


def bases_input(read: LinearRead) -> str:
    """The tail's input holding a reader's two bases [Y(1); B], (2, O·V) float32."""
    return f"{read.output}.segattr_bases"


def forming_rows(
    tail: onnx.ModelProto, reads: tuple[LinearRead, ...], shapes: dict[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """``tail`` with each reader's output made inside the graph: base_b + sign_b · K[k_b].

    Forming the rows on the host cost a single-threaded pass over every row and fresh memory
    for each chunk (0.5 s of 2.3 s on the benchmark U-Net); as two Gathers, a Mul and an Add
    in the session they run on ORT's threads in its arena, and the per-row feeds are three
    numbers. ``shapes`` gives each reader output's shape without the batch, (O, *S'). Rows of
    the four forms map onto it exactly: Y(1) and B take sign 0 (bit-identical to the reader's
    own output), "keep k" is B + K_k and "drop k" is Y(1) − K_k.
    """
    graph = tail.graph
    declared = {i.name: i for i in graph.input}
    nodes: list[onnx.NodeProto] = []
    added_inputs = [
        helper.make_tensor_value_info(ROW_KERNEL, onnx.TensorProto.INT64, ["rows"]),
        helper.make_tensor_value_info(ROW_BASE, onnx.TensorProto.INT64, ["rows"]),
        helper.make_tensor_value_info(ROW_SIGN, onnx.TensorProto.FLOAT, ["rows", 1]),
    ]
    initializers = []
    for read in reads:
        shape = shapes[read.output]
        values = int(np.prod(shape))
        contributions, bases = contributions_input(read), bases_input(read)
        added_inputs += [
            helper.make_tensor_value_info(contributions, onnx.TensorProto.FLOAT, [None, values]),
            helper.make_tensor_value_info(bases, onnx.TensorProto.FLOAT, [2, values]),
        ]
        stem = f"{read.output}.segattr_row"
        row_shape = numpy_helper.from_array(np.array([-1, *shape], np.int64), f"{stem}_shape")
        initializers.append(row_shape)
        elem_type = declared[read.output].type.tensor_type.elem_type
        formed = read.output if elem_type == onnx.TensorProto.FLOAT else f"{stem}_float"
        nodes += [
            helper.make_node("Gather", [contributions, ROW_KERNEL], [f"{stem}_k"], axis=0),
            helper.make_node("Mul", [f"{stem}_k", ROW_SIGN], [f"{stem}_signed"]),
            helper.make_node("Gather", [bases, ROW_BASE], [f"{stem}_base"], axis=0),
            helper.make_node("Add", [f"{stem}_base", f"{stem}_signed"], [f"{stem}_flat"]),
            helper.make_node("Reshape", [f"{stem}_flat", row_shape.name], [formed]),
        ]
        if formed != read.output:
            nodes.append(helper.make_node("Cast", [formed], [read.output], to=elem_type))
    outputs = {read.output for read in reads}
    formed_model = onnx.ModelProto()
    formed_model.CopyFrom(tail)
    new_graph = formed_model.graph
    kept_inputs = [i for i in graph.input if i.name not in outputs]
    del new_graph.input[:]
    new_graph.input.extend([*kept_inputs, *added_inputs])
    # First in the graph: the broadcast of the skip tensors reads the batch off a reader output.
    old_nodes = list(new_graph.node)
    del new_graph.node[:]
    new_graph.node.extend([*nodes, *old_nodes])
    new_graph.initializer.extend(initializers)
    return formed_model

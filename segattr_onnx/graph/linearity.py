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

A U-Net's upsampling ConvTranspose (kernel = stride, no padding: nnU-Net's, the benchmark's) is
read by a stride-1 convolution alone, through the skip Concat. Both are linear, and one
ConvTranspose does both: kernel k + k₂ − 1, the same stride, padding k₂ − 1 − p₂ where the
convolution had k₂ and p₂ (``composed_transpose_weights``). The rows are then formed after that
convolution, and no row re-runs it (on the benchmark U-Net, a 3×3 convolution at full size for
each of 64 rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.graph.index import GraphIndex, opset_of
from segattr_onnx.graph.rewrite import AblationSite
from segattr_onnx.graph.shapes import TensorInfo

LINEAR_READERS = ("Conv", "ConvTranspose")
# The composed ConvTranspose's weights may hold at most this many times the elements of the two
# it replaces: large kernels compose into far larger ones (two 64×64 kernels of 512 channels,
# 16 MB in the model, would compose into 33 GB), which cost more to make and run than they save.
COMPOSED_GROWTH = 4


@dataclass(frozen=True)
class FollowingConv:
    """The stride-1 convolution that alone reads a ConvTranspose reader's output (directly or
    through a channel Concat, where the ConvTranspose's channels start at ``offset``)."""

    transpose_output: str  # the ConvTranspose's output, which the convolution reads
    weight: str
    offset: int


@dataclass(frozen=True)
class LinearRead:
    """One convolution reading the blended tensor: Z's channels start at input channel
    ``offset`` of it (0 unless a Concat put other channels first). ``output`` is the tensor
    the rows are: the reader's output, or with ``after`` the following convolution's."""

    node: str  # the reader of Z (for a composed read, the ConvTranspose)
    output: str
    weight: str  # the reader's weights (for a composed read, the ConvTranspose's)
    offset: int
    after: FollowingConv | None = None


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _channel_count(
    index: GraphIndex,
    name: str,
    channel_axis: int,
    site: AblationSite,
    infos: Mapping[str, TensorInfo] | None = None,
) -> int:
    """Channels of a Concat input: Z's, a constant's, or from the shapes the analysis inferred
    (``infos``: a skip placed before Z, as MONAI's ``UpCat`` joins them); KeyError when
    unknown."""
    if name == site.blended:
        return site.channels
    value = index.constant_value(name)
    if value is not None:
        return int(np.shape(value)[channel_axis])
    for known in (site.new_infos, infos or {}):
        info = known.get(name)
        if info is not None and info.shape is not None:
            count = info.shape[channel_axis]
            if isinstance(count, int):
                return count
    raise KeyError(name)


def _is_linear_reader(node: onnx.NodeProto, tensor: str, index: GraphIndex) -> bool:
    """``node`` is an ungrouped convolution with constant weights reading ``tensor`` as its
    data input only."""
    return (
        node.op_type in LINEAR_READERS
        and node.domain in ("", "ai.onnx")
        and node.input[0] == tensor
        and tensor not in node.input[1:]
        and int(_attribute(node, "group", 1)) == 1
        and node.input[1] in index.initializers
    )


def _ones(values, count: int) -> bool:
    return values is None or list(values) == [1] * count


def _following_conv(
    index: GraphIndex,
    node: onnx.NodeProto,
    site: AblationSite,
    outputs: set[str],
    infos: Mapping[str, TensorInfo] | None,
) -> tuple[onnx.NodeProto, FollowingConv] | None:
    """The stride-1 convolution that alone reads a float ConvTranspose reader's whole output
    (directly or through one channel Concat), when the two compose into one ConvTranspose:
    the ConvTranspose neither crops nor pads its output (no pads, output padding or output
    shape), and the convolution's padding is at most its kernel less one on every side."""
    if node.op_type != "ConvTranspose" or site.elem_type != onnx.TensorProto.FLOAT:
        return None
    spatial = site.rank - 2
    if (
        any(int(p) != 0 for p in _attribute(node, "pads", [0] * 2 * spatial))
        or any(int(p) != 0 for p in _attribute(node, "output_padding", [0] * spatial))
        or _attribute(node, "output_shape") is not None
        or _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or not _ones(_attribute(node, "dilations"), spatial)
    ):
        return None
    produced = node.output[0]
    read, offset = produced, 0
    consumers = index.consumers.get(produced, [])
    if produced in outputs or len(consumers) != 1:
        return None
    first = index.nodes[consumers[0]]
    if first.op_type == "Concat" and first.domain in ("", "ai.onnx"):
        axis = int(_attribute(first, "axis", 0)) % site.rank
        if axis != site.channel_axis or list(first.input).count(produced) != 1:
            return None
        before = first.input[: list(first.input).index(produced)]
        try:
            offset = sum(_channel_count(index, name, axis, site, infos) for name in before)
        except KeyError:
            return None
        read = first.output[0]
        consumers = index.consumers.get(read, [])
        if read in outputs or len(consumers) != 1:
            return None
    conv = index.nodes[consumers[0]]
    if conv.op_type != "Conv" or not _is_linear_reader(conv, read, index):
        return None
    weight = index.initializers[conv.input[1]]
    if weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != site.rank:
        return None
    kernel = [int(d) for d in weight.dims[2:]]
    pads = [int(p) for p in _attribute(conv, "pads", [0] * 2 * spatial)]
    if (
        _attribute(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
        or not _ones(_attribute(conv, "strides"), spatial)
        or not _ones(_attribute(conv, "dilations"), spatial)
        or len(pads) != 2 * spatial
        or any(not 0 <= pads[i] < kernel[i % spatial] for i in range(2 * spatial))
        or conv.output[0] in outputs
    ):
        return None
    transpose = [int(d) for d in index.initializers[node.input[1]].dims]
    size = math.prod(k + f - 1 for k, f in zip(transpose[2:], kernel, strict=False))
    replaced = math.prod(transpose) + math.prod(int(d) for d in weight.dims)
    if len(transpose) != site.rank or site.channels * weight.dims[0] * size > (
        COMPOSED_GROWTH * replaced
    ):
        return None  # checked before any weight is read, let alone composed
    return conv, FollowingConv(produced, conv.input[1], offset)


def linear_reads(
    model: onnx.ModelProto,
    site: AblationSite,
    compose: bool = True,
    infos: Mapping[str, TensorInfo] | None = None,
) -> tuple[LinearRead, ...] | None:
    """The convolutions Y(m) is linear in, for a block-form ablation site; None when a reader
    of Z' (or of the Concat holding it) is not such a convolution, or Z' is a graph output.
    ``compose``: an upsampling ConvTranspose reader is composed with the convolution after it
    where that is exact (the module's docstring); two reads that would end at one tensor (two
    ConvTransposes of Z joined before one convolution) make the site not linear. ``infos``:
    the analysis's tensor shapes, for the channels a Concat puts before Z."""
    if site.form != "block" or site.channel_axis != 1:
        return None
    index = GraphIndex(model.graph)
    outputs = {o.name for o in model.graph.output}
    if site.blended in outputs:
        return None

    def conv_read(node: onnx.NodeProto, tensor: str, offset: int) -> LinearRead | None:
        # ``node`` as a float convolution reading ``tensor`` as its data input (composed with
        # the convolution after it where that is exact and asked for), or None when it is
        # anything else (a normalisation, an activation, a second input).
        if not _is_linear_reader(node, tensor, index):
            return None
        after = _following_conv(index, node, site, outputs, infos) if compose else None
        if after is None:
            return LinearRead(node.name, node.output[0], node.input[1], offset)
        conv, following = after
        return LinearRead(node.name, conv.output[0], node.input[1], offset, following)

    reads: list[LinearRead] = []
    for position in index.consumers.get(site.blended, []):
        node = index.nodes[position]
        if node.op_type == "Concat" and node.domain in ("", "ai.onnx"):
            axis = int(_attribute(node, "axis", 0)) % site.rank
            if axis != site.channel_axis or list(node.input).count(site.blended) != 1:
                return None
            before = node.input[: list(node.input).index(site.blended)]
            try:
                offset = sum(_channel_count(index, name, axis, site, infos) for name in before)
            except KeyError:
                return None
            joined = node.output[0]
            found = [
                conv_read(index.nodes[i], joined, offset) for i in index.consumers.get(joined, [])
            ]
        else:  # this reader alone: the loop reaches each of Z's readers in turn
            found = [conv_read(node, site.blended, 0)]
        if None in found:
            return None
        reads.extend(found)
    if len({read.output for read in reads}) != len(reads):
        return None
    return tuple(reads) if reads else None


CONTRIBUTION_SOURCE = "contribution_source"  # (1, g, *S): g channels of Z
CONTRIBUTION_WEIGHTS = "contribution_weights"  # those channels' weights (grouped_weights), ±
ROWS_BASE = "rows_base"  # (1, O·V) float32: Y(1) for "drop" rows, B = Y(0) for "keep only"
ROWS_FORMED = "rows_formed"  # (g, O·V): the base plus each channel's (signed) contribution
# Both halves from one run of the grouped convolution (``contributions_model(both=True)``):
KEEP_BASE = "keep_base"  # (1, O·V) float32: B, with ROWS_BASE then Y(1)
ROWS_KEPT = "rows_kept"  # (g, O·V): B + K_c, with ROWS_FORMED then Y(1) − K_c


def _node_making(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    """The node found by its output: exporters leave node names empty."""
    return next(n for n in model.graph.node if n.output and n.output[0] == output)


def _reader(model: onnx.ModelProto, read: LinearRead) -> onnx.NodeProto:
    """The convolution reading the blended tensor itself."""
    return _node_making(model, read.after.transpose_output if read.after else read.output)


def formation(model: onnx.ModelProto, read: LinearRead) -> tuple[str, dict]:
    """The operator and attributes (group aside) of the convolution that makes a read's
    contributions: the reader's own, or for a read with ``after`` the ConvTranspose that does
    the reader and the following convolution at once (``composed_transpose_weights``)."""
    node = _reader(model, read)
    attributes = {
        a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"
    }
    if read.after is None:
        return node.op_type, attributes
    conv = _node_making(model, read.output)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    kernel = dims[read.weight][2:]
    following = dims[read.after.weight][2:]
    spatial = len(kernel)
    pads = [int(p) for p in _attribute(conv, "pads", [0] * 2 * spatial)]
    strides = [int(s) for s in _attribute(node, "strides", [1] * spatial)]
    return "ConvTranspose", {
        "kernel_shape": [k + f - 1 for k, f in zip(kernel, following, strict=True)],
        "strides": strides,
        "pads": [following[i % spatial] - 1 - pads[i] for i in range(2 * spatial)],
    }


def composed_transpose_weights(transpose: np.ndarray, conv: np.ndarray) -> np.ndarray:
    """The weights of the one ConvTranspose equal to ``transpose`` (C, M, *k) then a stride-1
    convolution ``conv`` (O, M, *k₂) on its output: (C, O, *(k + k₂ − 1)).

    The ConvTranspose writes Z[j]·w[q] to position s·j + q; the convolution reads position
    o + t − p₂ with weight v[t]. So Z[j] reaches o through w[q]·v[t] wherever q = o + t − p₂ − s·j,
    that is through tap r = q + (k₂ − 1 − t) of a ConvTranspose with padding k₂ − 1 − p₂. The
    sum runs in float64: the composed weights are the exact products, rounded once."""
    following = conv.shape[2:]
    size = [k + f - 1 for k, f in zip(transpose.shape[2:], following, strict=True)]
    composed = np.zeros((transpose.shape[0], conv.shape[0], *size), np.float64)
    wide, narrow = transpose.astype(np.float64), conv.astype(np.float64)
    for tap in np.ndindex(*following):
        placed = tuple(
            slice(f - 1 - t, f - 1 - t + k)
            for f, t, k in zip(following, tap, transpose.shape[2:], strict=True)
        )
        composed[(slice(None), slice(None), *placed)] += np.einsum(
            "cm...,om->co...", wide, narrow[(slice(None), slice(None), *tap)]
        )
    return composed.astype(transpose.dtype)


def grouped_weights(
    model: onnx.ModelProto, site: AblationSite, read: LinearRead, base_dir: str | None = None
) -> np.ndarray:
    """The reader's weights on Z's channels as a grouped convolution wants them, one group per
    channel: (C·O, 1, *k) for a Conv (rows c·O + o hold W[o, offset + c]), (C, O, *k) for a
    ConvTranspose (group c is W[offset + c], composed with the following convolution's
    weights when the read has one); channels c0..c1 are rows c0·O..c1·O, resp. c0..c1."""
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
    taken = weights[read.offset : read.offset + channels]
    if read.after is not None:
        following = numpy_helper.to_array(
            index.initializers[read.after.weight], base_dir=base_dir or ""
        )
        offset = read.after.offset
        taken = composed_transpose_weights(taken, following[:, offset : offset + taken.shape[1]])
    return np.ascontiguousarray(taken)


def contributions_model(
    model: onnx.ModelProto,
    site: AblationSite,
    read: LinearRead,
    group: int,
    values: int,
    both: bool = False,
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
    ``values`` is O·V, the reader's output size per item.

    ``both``: the two halves from one run of the grouped convolution, for rows that need both
    (a group holding every channel): ``ROWS_FORMED`` = Y(1) − K_c from ``ROWS_BASE`` = Y(1)
    (the same numbers as Y(1) + (−K_c)), and ``ROWS_KEPT`` = B + K_c from ``KEEP_BASE`` = B.
    Where K is dear to make (a composed 4×4 ConvTranspose: 0.15 s a run on the benchmark
    U-Net), making it once per group instead of once per half is most of the formation's
    time."""
    op_type, attributes = formation(model, read)
    elem_type = site.elem_type
    is_float = elem_type == onnx.TensorProto.FLOAT
    flat = numpy_helper.from_array(np.array([group, values], np.int64), "contributions_flat")
    nodes = [
        helper.make_node(
            op_type,
            [CONTRIBUTION_SOURCE, CONTRIBUTION_WEIGHTS],
            ["contributions"],
            group=group,
            **attributes,
        ),
        helper.make_node("Reshape", ["contributions", flat.name], ["contributions_rows"]),
    ]
    contributions = "contributions_rows"
    if not is_float:
        nodes.append(
            helper.make_node(
                "Cast", [contributions], ["contributions_float"], to=onnx.TensorProto.FLOAT
            )
        )
        contributions = "contributions_float"
    halves = [(ROWS_BASE, ROWS_FORMED, "Sub" if both else "Add")]
    if both:
        halves.append((KEEP_BASE, ROWS_KEPT, "Add"))
    for base, rows, op in halves:
        if is_float:
            nodes.append(helper.make_node(op, [base, contributions], [rows]))
        else:
            nodes += [
                helper.make_node(op, [base, contributions], [f"{rows}_float"]),
                helper.make_node("Cast", [f"{rows}_float"], [rows], to=elem_type),
            ]
    graph = helper.make_graph(
        nodes,
        "contributions",
        [
            helper.make_tensor_value_info(CONTRIBUTION_SOURCE, elem_type, None),
            helper.make_tensor_value_info(CONTRIBUTION_WEIGHTS, elem_type, None),
            *[
                helper.make_tensor_value_info(base, onnx.TensorProto.FLOAT, [1, values])
                for base, _, _ in halves
            ],
        ],
        [helper.make_tensor_value_info(rows, elem_type, [group, values]) for _, rows, _ in halves],
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

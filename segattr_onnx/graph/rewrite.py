"""Exact graph rewrites: expose tensors, blend kernels away, cut the graph after a tensor.

Each rewrite is a pure function from a ``ModelProto`` to a new ``ModelProto`` (plus a small record
of what it added); the caller's model is never touched. The tests hold each one to "the rewritten
model computes exactly what the original does" (all-ones masks, suffix vs full runs).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.errors import GraphRewriteError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.index import GraphIndex, outer_scope_reads
from segattr_onnx.graph.shapes import TensorInfo
from segattr_onnx.graph.shared_concat import split_convs_over_shared_concats
from segattr_onnx.text import setting

MASK_BATCH_SYMBOL = "segattr_mask_batch"
PREFIX_BATCH_SYMBOL = "segattr_prefix_batch"
# "block": Z = block output, R = 0 (P2). "raw": Z = conv output, R = a Glorot kernel's (P1).
# "shift": Z = conv output plus a per-channel offset m (finite-difference checks of gradients).
ABLATION_FORMS = ("block", "raw", "shift")
# Elementwise ops that broadcast a batch-1 operand against a batch-B one on their own; a boundary
# tensor read only by these (from nodes that depend on the mask) needs no Expand.
_BROADCASTING = {"Mul", "Add", "Sub", "Div", "Where", "Max", "Min", "Sum", "Pow"}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_") or "t"


def _value_info(name: str, info: TensorInfo | None, elem_type: int | None = None):
    elem = elem_type if elem_type is not None else (info.elem_type if info else 0)
    return helper.make_tensor_value_info(name, elem, None)


# --------------------------------------------------------------------------- expose
def expose(
    model: onnx.ModelProto, tensors: Iterable[str], infos: dict[str, TensorInfo]
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (values unchanged)."""
    exposed = _copy(model)
    present = {o.name for o in exposed.graph.output}
    known = {n for node in exposed.graph.node for n in node.output} | {
        i.name for i in exposed.graph.input
    }
    for name in tensors:
        if name in present:
            continue
        if name not in known:
            raise GraphRewriteError(
                f"tensor {name!r} does not exist in the model; cannot expose it"
            )
        exposed.graph.output.append(_value_info(name, infos.get(name)))
        present.add(name)
    return exposed


def keep_only(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A model computing just ``outputs``: the nodes they do not depend on, and the weights no
    kept node reads, are dropped (its inputs stay as they are).

    ONNX Runtime runs every node of a graph whatever outputs a run asks for, so a pass that
    needs a few early tensors must not carry the rest of the model along, nor hold the weights
    of the layers after them. onnx-graphsurgeon's cleanup does the pruning: it follows the
    reads of If/Loop bodies from the outer graph, and keeps each weight as the model's own
    tensor (an external one stays external), so no weight becomes a numpy array on the way.
    """
    import onnx_graphsurgeon as gs  # here, not at start-up: it takes 0.3 s to import

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [tensors[name] for name in outputs]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    pruned = gs.export_onnx(graph, do_type_check=False)
    pruned.ir_version = model.ir_version
    del pruned.opset_import[:]
    pruned.opset_import.extend(model.opset_import)
    return pruned


# --------------------------------------------------------------------------- ablation
@dataclass(frozen=True)
class AblationSite:
    """Where and how a layer's kernels are blended away: ``Z' = m·Z + (1 − m)·R``."""

    layer: str
    form: str  # "block": Z = block output, R = 0 (P2).  "raw": Z = conv output, R = Glorot (P1)
    source: str  # the tensor holding Z in the rewritten model (what the prefix run provides)
    blended: str  # Z' (what every former reader of Z now reads)
    mask_input: str
    replacement: str | None  # tensor holding R for the raw form
    channels: int
    channel_axis: int
    rank: int
    elem_type: int
    new_infos: dict[str, TensorInfo]

    @property
    def mask_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def mask_shape(self, batch: int) -> tuple[int, ...]:
        shape = [1] * self.rank
        shape[0] = batch
        shape[self.channel_axis] = self.channels
        return tuple(shape)

    def masks_to_feed(self, masks: np.ndarray) -> np.ndarray:
        """Turn a (K, C) array of kernel masks into the (K, C, 1, …) mask input, own layout."""
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.shape[1] != self.channels:
            raise GraphRewriteError(
                f"masks for layer {self.layer!r} must have shape (K, {self.channels}); "
                f"got {masks.shape}"
            )
        return np.ascontiguousarray(
            masks.astype(self.mask_dtype).reshape(self.mask_shape(masks.shape[0]))
        )


def glorot_uniform(shape: Sequence[int], seed: int, name: str) -> np.ndarray:
    """Glorot-uniform weights (docs/algorithms.md section 2), seeded per (seed, layer name).

    fan_in = dims[1]·prod(kernel), fan_out = dims[0]·prod(kernel) (PyTorch's convention).
    """
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = float(np.sqrt(6.0 / (fan_in + fan_out)))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.uniform(-bound, bound, size=tuple(shape))


def insert_ablation(
    analysis: ModelAnalysis,
    layer: str | KernelLayer,
    form: str = "block",
    seed: int = 0,
) -> tuple[onnx.ModelProto, AblationSite]:
    """A copy of the model with a per-kernel mask input blended into one layer's output."""
    if form not in ABLATION_FORMS:
        raise GraphRewriteError(
            f"ablation form {form!r} is unknown; use one of {', '.join(ABLATION_FORMS)}"
        )
    kernel_layer = analysis.layer(layer) if isinstance(layer, str) else layer
    model = _copy(analysis.model.proto)
    graph = model.graph
    index = GraphIndex(graph)
    if form == "block":
        tensor, axis = kernel_layer.block_output, kernel_layer.block_channel_axis
    elif form == "shift":
        tensor, axis = kernel_layer.output, kernel_layer.channel_axis
    else:
        if kernel_layer.op not in ("Conv", "ConvTranspose"):
            raise GraphRewriteError(
                f"layer {kernel_layer.name!r} is a {kernel_layer.op}; the P1 random-kernel "
                "ablation needs a float Conv/ConvTranspose — use the P2 (block) form"
            )
        tensor, axis = kernel_layer.output, kernel_layer.channel_axis
    info = analysis.tensors[tensor]
    assert info.shape is not None
    if not info.is_float:
        raise GraphRewriteError(
            f"layer {kernel_layer.name!r} ends in a quantised {info.numpy_dtype} tensor with no "
            "DequantizeLinear after it, so its kernels cannot be zeroed exactly; pick another "
            "layer or use the model's float export"
        )
    # GraphIndex counts If/Loop/Scan nodes whose bodies read a tensor among its consumers.
    if any(tensor in outer_scope_reads(index.nodes[c]) for c in index.consumers.get(tensor, [])):
        raise GraphRewriteError(
            f"layer {kernel_layer.name!r} is read inside an If/Loop/Scan body, which segattr-onnx "
            "cannot rewire; pick another layer"
        )
    rank, elem_type = len(info.shape), info.elem_type
    tag = _safe(kernel_layer.name)
    mask_name = f"segattr_mask.{tag}"
    batch_dim: str | int = MASK_BATCH_SYMBOL if analysis.input.dynamic_batch else 1
    mask_dims: list[str | int] = [batch_dim] + [1] * (rank - 1)
    mask_dims[axis] = kernel_layer.kernels
    graph.input.append(helper.make_tensor_value_info(mask_name, elem_type, mask_dims))

    # Z keeps its producer; if Z is a graph output it is renamed so Z' can keep the output name.
    source, blended = tensor, f"{tensor}.segattr_ablated"
    if tensor in index.graph_outputs:
        # Only the producer is renamed: every reader, the graph output included, gets Z'.
        source, blended = f"{tensor}.segattr_unablated", tensor
        producer_node = graph.node[index.producer[tensor]]
        producer_node.output[list(producer_node.output).index(tensor)] = source
    else:
        for node in graph.node:
            for position, name in enumerate(node.input):
                if name == tensor:
                    node.input[position] = blended

    new_nodes: list[onnx.NodeProto] = []
    new_infos = {
        source: info,
        blended: TensorInfo((MASK_BATCH_SYMBOL, *info.shape[1:]), elem_type),
        mask_name: TensorInfo(tuple(mask_dims), elem_type),
    }
    replacement = None
    if form == "block":
        new_nodes.append(
            helper.make_node("Mul", [source, mask_name], [blended], name=f"segattr/ablate/{tag}")
        )
    elif form == "shift":
        new_nodes.append(
            helper.make_node("Add", [source, mask_name], [blended], name=f"segattr/shift/{tag}")
        )
    else:
        replacement = f"segattr_glorot.{tag}.out"
        conv = index.nodes[kernel_layer.node_index]
        weight_source = index.constant_source(conv.input[1])
        assert weight_source is not None
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        weights = glorot_uniform(tuple(weight_source.dims), seed, kernel_layer.name).astype(dtype)
        weight_name = f"segattr_glorot.{tag}.weight"
        graph.initializer.append(numpy_helper.from_array(weights, weight_name))
        random_conv = onnx.NodeProto()
        random_conv.CopyFrom(conv)
        random_conv.name = f"segattr/glorot/{tag}"
        random_conv.input[1] = weight_name
        del random_conv.output[:]
        random_conv.output.append(replacement)
        one = f"segattr_one.{tag}"
        graph.initializer.append(numpy_helper.from_array(np.ones((), dtype=dtype), one))
        # m·Z + (1 − m)·R, in this order, so an all-ones mask gives Z bit-exactly.
        kept, inverse, replaced = (f"segattr_blend.{tag}.{s}" for s in ("kept", "inv", "rep"))
        new_nodes += [
            random_conv,
            helper.make_node("Mul", [source, mask_name], [kept]),
            helper.make_node("Sub", [one, mask_name], [inverse]),
            helper.make_node("Mul", [replacement, inverse], [replaced]),
            helper.make_node("Add", [kept, replaced], [blended], name=f"segattr/ablate/{tag}"),
        ]
        new_infos[replacement] = info

    producer = index.producer[tensor]
    nodes = list(graph.node)
    del graph.node[:]
    for position, node in enumerate(nodes):
        graph.node.append(node)
        if position == producer:
            graph.node.extend(new_nodes)
    _drop_stale_value_info(model, [blended])
    site = AblationSite(
        layer=kernel_layer.name,
        form=form,
        source=source,
        blended=blended,
        mask_input=mask_name,
        replacement=replacement,
        channels=kernel_layer.kernels,
        channel_axis=axis,
        rank=rank,
        elem_type=elem_type,
        new_infos=new_infos,
    )
    return model, site


def _drop_stale_value_info(model: onnx.ModelProto, changed: Iterable[str]) -> None:
    """Forget recorded shapes downstream of a rewrite: their batch dim is now the mask's."""
    index = GraphIndex(model.graph)
    stale = set(changed)
    for node_index in index.descendant_nodes(changed):
        stale.update(index.nodes[node_index].output)
    kept = [vi for vi in model.graph.value_info if vi.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


# --------------------------------------------------------------------------- suffix
@dataclass(frozen=True)
class SuffixGraph:
    """The part of a graph that depends on some inputs, with everything else fed in."""

    model: onnx.ModelProto
    boundary_inputs: tuple[str, ...]  # computed once by a prefix run, fed at batch 1
    expanded_inputs: tuple[str, ...]  # boundary inputs broadcast to the mask batch in-graph
    outputs: tuple[str, ...]
    node_names: tuple[str, ...]

    @property
    def node_count(self) -> int:
        return len(self.node_names)


def cut_suffix(
    model: onnx.ModelProto,
    start_inputs: Sequence[str],
    infos: dict[str, TensorInfo],
    batch_from: str | None = None,
    outputs: Sequence[str] | None = None,
) -> SuffixGraph:
    """The sub-graph of ``model`` that depends on ``start_inputs``; all else becomes inputs.

    Float tensors the suffix reads from outside (skip connections, the unablated tensor) become
    graph inputs, computed once by a prefix run at batch 1. With ``batch_from`` set (a start
    input whose dim 0 is the batch of the re-runs), those with a batch dim are broadcast to that
    batch inside the graph, so they are uploaded once and never tiled on the host. Non-float
    tensors (shapes, MaxPool indices) are recomputed inside the suffix instead of being reused,
    since they may encode the batch size.
    """
    index = GraphIndex(model.graph)
    inputs_of_graph = set(index.graph_inputs)
    suffix = index.descendant_nodes(start_inputs)
    dependent = set(suffix)
    if not suffix:
        raise GraphRewriteError(f"nothing in the graph depends on {list(start_inputs)}")
    boundary: list[str] = []
    pending = list(suffix)
    while pending:
        node_index = pending.pop()
        node = index.nodes[node_index]
        for name in [*node.input, *outer_scope_reads(node)]:
            if not name or name in index.initializers or name in start_inputs:
                continue
            producer = index.producer.get(name)
            if producer is not None and producer in suffix:
                continue
            info = infos.get(name)
            is_float = info is not None and info.is_float
            if producer is not None and (
                not is_float
                or index.nodes[producer].op_type == "Constant"
                or index.is_constant(name)
            ):
                suffix.add(producer)
                pending.append(producer)
                continue
            if not is_float and name in inputs_of_graph:
                raise GraphRewriteError(
                    f"the graph after {list(start_inputs)} reads the non-float graph input "
                    f"{name!r}, which cannot be reused across batched re-runs; run without "
                    "suffix execution"
                )
            if info is None:
                raise GraphRewriteError(
                    f"the type of tensor {name!r} is unknown, so it cannot become an input of "
                    f"the suffix graph; give the input size "
                    f"({setting('--input-shape', 'input_shape=')}) or run without suffix "
                    "execution"
                )
            if name not in boundary:
                boundary.append(name)
    # A node pulled in for an int output (MaxPool indices) also recomputes its float outputs.
    produced_in_suffix = {o for i in suffix for o in index.nodes[i].output}
    boundary = [name for name in boundary if name not in produced_in_suffix]
    wanted_outputs = (
        list(outputs)
        if outputs is not None
        else [o for o in index.graph_outputs if index.producer.get(o) in suffix]
    )
    produced = {o for i in suffix for o in index.nodes[i].output}
    for name in wanted_outputs:
        if name not in produced:
            raise GraphRewriteError(f"output {name!r} does not depend on {list(start_inputs)}")

    cut = _copy(model)
    graph = cut.graph
    del graph.node[:]
    del graph.input[:]
    del graph.output[:]
    del graph.value_info[:]
    needs_expand = [
        name
        for name in boundary
        if not all(
            index.nodes[c].op_type in _BROADCASTING and c in dependent
            for c in index.consumers.get(name, [])
            if c in suffix
        )
    ]
    expand_nodes, expanded, renamed = _broadcast_nodes(
        needs_expand, infos, batch_from, model.opset_import
    )
    graph.node.extend(expand_nodes)
    ordered = [i for i in index.order if i in suffix]
    for node_index in ordered:
        node = onnx.NodeProto()
        node.CopyFrom(index.nodes[node_index])
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
        graph.node.append(node)
    declared = {vi.name: vi for vi in model.graph.input}
    for name in start_inputs:
        graph.input.append(
            declared[name] if name in declared else _value_info(name, infos.get(name))
        )
    for name in boundary:
        info = infos[name]
        dims = None
        if info.shape is not None:
            dims = [
                PREFIX_BATCH_SYMBOL
                if (p == 0 and name in expanded)
                else (d if isinstance(d, int) else None)
                for p, d in enumerate(info.shape)
            ]
        graph.input.append(helper.make_tensor_value_info(name, info.elem_type, dims))
    for name in wanted_outputs:
        graph.output.append(_value_info(name, infos.get(name)))
    if expanded:
        expanded = _split_shared_concats(cut, expanded, renamed, infos)
    used = {n for node in graph.node for n in node.input} | {
        n for node in graph.node for n in outer_scope_reads(node)
    }
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return SuffixGraph(
        model=cut,
        boundary_inputs=tuple(boundary),
        expanded_inputs=tuple(expanded),
        outputs=tuple(wanted_outputs),
        node_names=tuple(index.nodes[i].name or f"#{i}" for i in ordered),
    )


def _split_shared_concats(
    cut: onnx.ModelProto, expanded: list[str], renamed: dict[str, str], infos: dict[str, TensorInfo]
) -> list[str]:
    """Let Convs over Concat(varying, skip) read the batch-1 skip directly; see shared_concat."""
    shared = {renamed[name]: name for name in expanded}
    channels: dict[str, int] = {}
    for node in cut.graph.node:
        if node.op_type != "Concat":
            continue
        for name in node.input:
            info = infos.get(shared.get(name, name))
            shape = info.shape if info is not None else None
            if shape is not None and len(shape) > 1 and isinstance(shape[1], int):
                channels[name] = shape[1]
    still_read = split_convs_over_shared_concats(cut, shared, channels)
    return [name for name in expanded if renamed[name] in still_read]


def _broadcast_nodes(
    boundary: list[str],
    infos: dict[str, TensorInfo],
    batch_from: str | None,
    opset_imports: Sequence[onnx.OperatorSetIdProto] = (),
) -> tuple[list[onnx.NodeProto], list[str], dict[str, str]]:
    """Expand nodes that broadcast batch-1 boundary tensors to the batch of ``batch_from``."""
    if batch_from is None:
        return [], [], {}
    carrying = [n for n in boundary if _has_batch_dim(infos[n])]
    if not carrying:
        return [], [], {}
    opset = next((o.version for o in opset_imports if o.domain in ("", "ai.onnx")), 0)
    if opset < 8:
        raise GraphRewriteError(
            f"the model uses opset {opset}, which has no Expand to broadcast skip tensors to the "
            "ablation batch; run without suffix execution or re-export at opset 8 or later"
        )
    batch = "segattr_suffix.batch"
    nodes = [
        helper.make_node("Shape", [batch_from], ["segattr_suffix.batch_from_shape"]),
        helper.make_node(
            "Constant",
            [],
            ["segattr_suffix.zero"],
            value=numpy_helper.from_array(np.array([0], np.int64)),
        ),
        # Shape → Gather([0]) works at every opset (Slice changed form at opset 10).
        helper.make_node(
            "Gather", ["segattr_suffix.batch_from_shape", "segattr_suffix.zero"], [batch], axis=0
        ),
    ]
    renamed: dict[str, str] = {}
    targets: dict[int, str] = {}
    for name in carrying:
        rank = len(infos[name].shape or ())
        if rank not in targets:
            ones = f"segattr_suffix.ones{rank}"
            target = f"segattr_suffix.target{rank}"
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [ones],
                    value=numpy_helper.from_array(np.ones(rank - 1, np.int64)),
                )
            )
            nodes.append(helper.make_node("Concat", [batch, ones], [target], axis=0))
            targets[rank] = target
        renamed[name] = f"{name}.segattr_expanded"
        nodes.append(helper.make_node("Expand", [name, targets[rank]], [renamed[name]]))
    return nodes, carrying, renamed


def _has_batch_dim(info: TensorInfo) -> bool:
    """In a dynamic-batch analysis, a symbolic or unknown dim 0 is the batch.

    onnx's inference sometimes loses the batch symbol (``unk__3`` after a Resize with computed
    sizes), so any non-integer dim 0 counts; a tensor whose dim 0 is a number does not vary
    with the batch.
    """
    if info.shape is None or len(info.shape) < 2:
        return False
    return not isinstance(info.shape[0], int)

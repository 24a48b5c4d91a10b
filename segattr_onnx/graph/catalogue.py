"""What an exported segmentation model is made of: its kernel layers and where its decoder starts.

The catalogue is the map every method works from. It names each convolution, counts its kernels
from the weight tensor (inferred shapes can be wrong after exporters' rewrites; weights cannot),
finds the end of the per-channel block that follows it (where P2 ablates), follows the channel
axis through the Transposes that channels-last exporters wrap around every convolution, and
splits the layers into encoder / bottleneck / decoder / head per output (docs/layer-groups.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import onnx

from segattr_onnx.errors import InputShapeError, NoKernelLayersError, TargetError
from segattr_onnx.graph.grouping import (
    OFF_PATH,
    LayerFacts,
    LayerGrouping,
    group_layers,
    kernel_depths,
    primary_output,
)
from segattr_onnx.graph.index import GraphIndex
from segattr_onnx.graph.loading import LoadedModel, as_loaded_model
from segattr_onnx.graph.shapes import (
    FLOAT_TYPES,
    TensorInfo,
    declared_dims,
    infer_tensor_infos,
    resolve_input_shape,
)
from segattr_onnx.text import setting

KERNEL_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "NhwcConv", "FusedConv"}
_WEIGHT_INPUT = {"QLinearConv": 3}
# Ops that act on each channel on its own, so the end of their chain is still "the kernel's"
# output (the P2 ablation site). Binary ops qualify only with a per-channel constant operand.
_PER_CHANNEL_UNARY = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "HardSwish",
    "HardSigmoid",
    "Clip",
    "Sigmoid",
    "Identity",
    "BatchNormalization",
    "InstanceNormalization",
}
_PER_CHANNEL_BINARY = {"Add", "Sub", "Mul", "Div"}
# Ops that keep positions and channels in place (used when tracing layouts, not for blocks).
_LAYOUT_PRESERVING = (
    _PER_CHANNEL_UNARY
    | _PER_CHANNEL_BINARY
    | {
        "Cast",
        "Pad",
        "Softmax",
        "LogSoftmax",
        "Tanh",
        "QuantizeLinear",
        "DequantizeLinear",
        "Erf",
        "Resize",
        "Upsample",
        "Dropout",
    }
)
GROUPS = ("encoder", "bottleneck", "decoder", "head")
_LAYOUT_NAMES = {
    (4, "first"): "NCHW",
    (4, "last"): "NHWC",
    (5, "first"): "NCDHW",
    (5, "last"): "NDHWC",
    (3, "first"): "NCW",
    (3, "last"): "NWC",
}


@dataclass(frozen=True)
class KernelLayer:
    """One convolution node and everything a method needs to know about it."""

    name: str
    node_name: str
    node_index: int
    op: str
    kernels: int
    spatial_rank: int
    spatial_shape: tuple[int, ...]
    depth: int
    output: str
    channel_axis: int
    block_output: str
    block_channel_axis: int
    block_ops: tuple[str, ...]
    dtype: str
    group: str
    weight: str | None
    is_gate: bool = False

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spatial_shape"] = list(self.spatial_shape)
        data["block_ops"] = list(self.block_ops)
        return data


@dataclass(frozen=True)
class InputDescription:
    name: str
    declared_shape: tuple
    shape: tuple[int, ...]
    layout: str
    channel_axis: int | None  # None: (N, *S), the model adds the channel axis itself
    dynamic_batch: bool
    dtype: str

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(d for axis, d in enumerate(self.shape) if axis not in (0, self.channel_axis))


@dataclass(frozen=True)
class OutputDescription:
    name: str
    shape: tuple | None
    channel_axis: int | None
    activation: str | None  # "sigmoid", "softmax" or None when the graph ends in raw logits


@dataclass(frozen=True)
class ModelAnalysis:
    """Everything segattr-onnx knows statically about a model for one input size."""

    model: LoadedModel
    input: InputDescription
    outputs: tuple[OutputDescription, ...]
    layers: tuple[KernelLayer, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)
    # Groups per output fed by a kernel layer; ``primary_output`` is the one explained by default.
    groupings: dict[str, LayerGrouping] = field(default_factory=dict, repr=False)
    primary_output: str | None = None
    primary_ties: tuple[str, ...] = ()

    @cached_property
    def index(self) -> GraphIndex:
        return GraphIndex(self.model.proto.graph)

    @property
    def bottleneck(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.group == "bottleneck"]

    @property
    def post_bottleneck(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.group == "decoder"]

    def grouping(self, output: str | None = None) -> LayerGrouping:
        """The layer groups for ``output`` (default: the primary output)."""
        name = output if output is not None else self.primary_output
        if name not in self.groupings:
            known = ", ".join(repr(o.name) for o in self.outputs)
            if any(o.name == name for o in self.outputs):
                raise NoKernelLayersError(
                    f"no kernel layer feeds output {name!r}: nothing to attribute through; "
                    f"explain another output ({known}) with "
                    f"{setting('--output-name', 'Target(output=...)')}"
                )
            raise TargetError(f"the model has no output {name!r}; its outputs: {known}")
        return self.groupings[name]

    def layer(self, name: str) -> KernelLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        """The JSON shape of ``segattr inspect --json``."""
        return {
            "model": self.model.display_name,
            "input": {
                "name": self.input.name,
                "shape": list(self.input.shape),
                "declared_shape": list(self.input.declared_shape),
                "layout": self.input.layout,
                "dtype": self.input.dtype,
                "dynamic_batch": self.input.dynamic_batch,
            },
            "outputs": [
                {
                    "name": o.name,
                    "shape": None if o.shape is None else list(o.shape),
                    "channel_axis": o.channel_axis,
                    "activation": o.activation,
                }
                for o in self.outputs
            ],
            "layers": [layer.to_dict() for layer in self.layers],
            "bottleneck": self.bottleneck,
            "post_bottleneck": self.post_bottleneck,
            "primary_output": self.primary_output,
            "grouping": self.grouping().to_dict() if self.groupings else None,
            "groupings": [g.to_dict() for g in self.groupings.values()],
        }


# --------------------------------------------------------------------------- helpers
def _dtype_name(elem_type: int) -> str:
    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def _data_inputs(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    return [name for name in node.input if name and not index.is_constant(name)]


def _is_per_channel_constant(
    index: GraphIndex, tensors: dict[str, TensorInfo], name: str, rank: int, axis: int
) -> bool:
    """True when a constant operand broadcasts per channel (all dims 1 except the channel one)."""
    if not index.is_constant(name):
        return False
    info = tensors.get(name)
    shape = info.shape if info is not None else None
    if shape is None:
        source = index.constant_source(name)
        shape = tuple(source.dims) if source is not None else None
    if shape is None or len(shape) > rank:
        return False
    offset = rank - len(shape)
    return all(d == 1 for position, d in enumerate(shape) if position + offset != axis)


def _rank(tensors: dict[str, TensorInfo], name: str) -> int | None:
    info = tensors.get(name)
    return None if info is None or info.shape is None else len(info.shape)


def follow_block(
    index: GraphIndex, tensors: dict[str, TensorInfo], tensor: str, axis: int
) -> tuple[str, int, tuple[str, ...]]:
    """Follow the chain of per-channel ops after a kernel: (block output, its channel axis, ops).

    The chain stops where the tensor branches (a skip connection reads it), feeds a graph output,
    or reaches an op that mixes channels or positions.
    """
    ops: list[str] = []
    outputs = set(index.graph_outputs)
    # Where the chain stood after its last non-Transpose op: trailing Transposes belong to the
    # next layer's input preparation (tf2onnx's NHWC→NCHW), not to this kernel's block.
    settled = (tensor, axis, 0)
    while tensor not in outputs:
        consumers = index.consumers.get(tensor, [])
        if len(consumers) != 1:
            break
        node = index.nodes[consumers[0]]
        rank = _rank(tensors, tensor)
        if rank is None:
            break
        op = node.op_type
        if op == "Transpose":
            perm = index.node_attribute(consumers[0], "perm")
            if perm is None:
                perm = list(range(rank))[::-1]
            axis = list(perm).index(axis)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            if axis != 1 or node.input[0] != tensor:
                break
        elif op == "QuantizeLinear":
            # A Q must be followed by its DQ for the blend to stay in float.
            q_out = node.output[0]
            dq = index.consumers.get(q_out, [])
            if len(dq) != 1 or index.nodes[dq[0]].op_type != "DequantizeLinear":
                break
            if _quant_axis_breaks(index, consumers[0], axis) or _quant_axis_breaks(
                index, dq[0], axis
            ):
                break
            ops.extend(["QuantizeLinear", "DequantizeLinear"])
            tensor = index.nodes[dq[0]].output[0]
            settled = (tensor, axis, len(ops))
            continue
        elif op in _PER_CHANNEL_BINARY:
            others = [name for name in node.input if name != tensor]
            if len(others) != 1 or not _is_per_channel_constant(
                index, tensors, others[0], rank, axis
            ):
                break
            if op in ("Sub", "Div") and node.input[0] != tensor:
                break
        elif op == "PRelu":
            if node.input[0] != tensor or not _is_per_channel_constant(
                index, tensors, node.input[1], rank, axis
            ):
                break
        elif op == "Clip":
            if node.input[0] != tensor or not all(
                index.is_constant(n) for n in node.input[1:] if n
            ):
                break
        elif op not in _PER_CHANNEL_UNARY:
            break
        ops.append(op)
        tensor = node.output[0]
        if op != "Transpose":
            settled = (tensor, axis, len(ops))
    tensor, axis, kept = settled
    return tensor, axis, tuple(ops[:kept])


def _quant_axis_breaks(index: GraphIndex, node_index: int, axis: int) -> bool:
    """A per-axis (de)quantisation along another axis would mix our channel with others."""
    node = index.nodes[node_index]
    scale = node.input[1] if len(node.input) > 1 else ""
    source = index.constant_source(scale) if scale else None
    if source is None or len(source.dims) == 0 or int(np.prod(source.dims)) == 1:
        return False
    return index.node_attribute(node_index, "axis", 1) != axis


def _trace_axis_to_input(
    index: GraphIndex, tensors: dict[str, TensorInfo], tensor: str, axis: int
) -> tuple[str, int] | None:
    """Walk back from a tensor through layout-preserving ops to a graph input, mapping the axis."""
    for _ in range(64):
        if tensor in index.graph_inputs:
            return tensor, axis
        if tensor not in index.producer:
            return None
        node = index.nodes[index.producer[tensor]]
        data = _data_inputs(index, node)
        if len(data) != 1:
            return None
        if node.op_type == "Transpose":
            rank = _rank(tensors, tensor) or 0
            perm = index.node_attribute(index.producer[tensor], "perm") or list(range(rank))[::-1]
            axis = list(perm)[axis]
        elif node.op_type not in _LAYOUT_PRESERVING:
            return None
        tensor = data[0]
    return None


def _output_channel_axis(
    index: GraphIndex, tensors: dict[str, TensorInfo], tensor: str, axis: int
) -> dict[str, int]:
    """Channel axis of each graph output reachable from ``tensor`` via layout-preserving ops."""
    found: dict[str, int] = {}
    stack = [(tensor, axis)]
    seen = set()
    while stack:
        name, current = stack.pop()
        if (name, current) in seen:
            continue
        seen.add((name, current))
        if name in index.graph_outputs:
            found[name] = current
        for consumer in index.consumers.get(name, []):
            node = index.nodes[consumer]
            if node.op_type == "Transpose":
                rank = _rank(tensors, name) or 0
                perm = index.node_attribute(consumer, "perm") or list(range(rank))[::-1]
                stack.append((node.output[0], list(perm).index(current)))
            elif node.op_type in _LAYOUT_PRESERVING:
                stack.append((node.output[0], current))
    return found


def _output_activation(index: GraphIndex, output: str) -> str | None:
    tensor = output
    for _ in range(16):
        if tensor not in index.producer:
            return None
        node = index.nodes[index.producer[tensor]]
        if node.op_type == "Sigmoid":
            return "sigmoid"
        if node.op_type == "Softmax":
            return "softmax"
        if node.op_type not in (
            "Identity",
            "Transpose",
            "Cast",
            "Reshape",
            "Squeeze",
            "Unsqueeze",
            "Flatten",
            "DequantizeLinear",
            "QuantizeLinear",
            # Resampling, padding and cropping keep probabilities probabilities.
            "Resize",
            "Upsample",
            "Pad",
            "Slice",
            "Dropout",
        ):
            return None
        tensor = node.input[0]
    return None


def _display_names(index: GraphIndex, kernel_nodes: list[int]) -> dict[int, str]:
    names: dict[int, str] = {}
    used: dict[str, int] = {}
    for node_index in kernel_nodes:
        node = index.nodes[node_index]
        weight_source = None
        weight_input = _WEIGHT_INPUT.get(node.op_type, 1)
        if len(node.input) > weight_input:
            source = index.constant_source(node.input[weight_input])
            weight_source = source.name if source is not None else None
        name = node.name or weight_source or f"{node.op_type}_{node_index}"
        if name in used:
            name = f"{name}#{node_index}"
        used[name] = node_index
        names[node_index] = name
    return names


def _has_constant_weight(index: GraphIndex, node_index: int) -> bool:
    node = index.nodes[node_index]
    weight_input = _WEIGHT_INPUT.get(node.op_type, 1)
    if len(node.input) <= weight_input:
        return False
    source = index.constant_source(node.input[weight_input])
    return source is not None and len(source.dims) >= 2


def _kernel_count(index: GraphIndex, node_index: int) -> tuple[int, str | None]:
    node = index.nodes[node_index]
    weight_input = _WEIGHT_INPUT.get(node.op_type, 1)
    weight = (
        index.constant_source(node.input[weight_input]) if len(node.input) > weight_input else None
    )
    if weight is None or len(weight.dims) < 2:
        raise NoKernelLayersError(
            f"{node.op_type} node {node.name or node_index!r} has no constant weight tensor; "
            "segattr-onnx needs models whose convolution weights are stored in the file"
        )
    if node.op_type == "ConvTranspose":
        return int(weight.dims[1]) * int(index.node_attribute(node_index, "group", 1)), weight.name
    return int(weight.dims[0]), weight.name


# --------------------------------------------------------------------------- main entry
def analyse_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
) -> ModelAnalysis:
    """Catalogue a model's kernel layers and groups for an input of ``input_shape``."""
    loaded = as_loaded_model(model)
    graph = loaded.proto.graph
    index = GraphIndex(graph)
    image_inputs = [
        vi
        for vi in graph.input
        if vi.name not in index.initializers
        and vi.type.tensor_type.elem_type
        in FLOAT_TYPES | {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}
    ]
    if len(image_inputs) != 1:
        names = [vi.name for vi in graph.input if vi.name not in index.initializers]
        raise InputShapeError(
            f"the model has {len(image_inputs)} image inputs ({names}); segattr-onnx explains "
            "models with exactly one image input"
        )
    image = image_inputs[0]
    declared = declared_dims(image) or ()
    dynamic_batch = not (len(declared) > 0 and isinstance(declared[0], int) and declared[0] > 0)
    shape = resolve_input_shape(image, input_shape)
    kernel_nodes = [i for i in index.order if index.nodes[i].op_type in KERNEL_OPS]
    # A convolution whose weights are computed at run time (a dynamic filter) has no kernels to
    # ablate; skip it rather than refuse the whole model.
    dynamic = [i for i in kernel_nodes if not _has_constant_weight(index, i)]
    for node_index in dynamic:
        warnings.warn(
            f"skipping {index.nodes[node_index].op_type} node "
            f"{index.nodes[node_index].name or node_index!r}: its weights are not stored in the "
            "model",
            stacklevel=2,
        )
    kernel_nodes = [i for i in kernel_nodes if i not in dynamic]
    if not kernel_nodes:
        raise NoKernelLayersError(
            f"{loaded.display_name} has no convolution (Conv, ConvTranspose, QLinearConv, "
            "ConvInteger); segattr-onnx attributes through convolution kernels only"
        )
    outputs_of = {i: index.nodes[i].output[0] for i in kernel_nodes}
    tensors = infer_tensor_infos(
        loaded.proto,
        {image.name: shape},
        dynamic_batch,
        required=outputs_of.values(),
        external_data_dir=loaded.external_data_dir,
    )

    names = _display_names(index, kernel_nodes)
    kernel_set = set(kernel_nodes)
    depths = kernel_depths(index, kernel_set)
    records = []
    for node_index in kernel_nodes:
        node = index.nodes[node_index]
        output = node.output[0]
        info = tensors[output]
        assert info.shape is not None
        rank = len(info.shape)
        channel_axis = rank - 1 if node.op_type == "NhwcConv" else 1
        spatial = tuple(int(d) for a, d in enumerate(info.shape) if a not in (0, channel_axis))
        data_input = tensors.get(node.input[0])
        input_spatial = None
        if data_input is not None and data_input.shape is not None:
            input_spatial = [
                d for a, d in enumerate(data_input.shape) if a not in (0, channel_axis)
            ]
        block_output, block_axis, block_ops = follow_block(index, tensors, output, channel_axis)
        is_gate = (
            bool(input_spatial)
            and all(d == 1 for d in input_spatial)
            and any(d != 1 for d in shape[1:] if d is not None)
        ) or _is_pyramid_bin(index, node.input[0], block_output)
        is_gate = is_gate or _feeds_only_attention(index, kernel_set, node_index)
        kernels, weight = _kernel_count(index, node_index)
        records.append(
            dict(
                name=names[node_index],
                node_name=node.name,
                node_index=node_index,
                op=node.op_type,
                kernels=kernels,
                spatial_rank=rank - 2,
                spatial_shape=spatial,
                depth=depths[node_index],
                output=output,
                channel_axis=channel_axis,
                block_output=block_output,
                block_channel_axis=block_axis,
                block_ops=block_ops,
                dtype=_dtype_name(info.elem_type),
                weight=weight,
                is_gate=is_gate,
            )
        )
    facts = [
        LayerFacts(
            name=r["name"],
            node_index=r["node_index"],
            spatial_size=int(np.prod(r["spatial_shape"])),
            depth=r["depth"],
            block_output=r["block_output"],
            block_channel_axis=r["block_channel_axis"],
            is_gate=r["is_gate"],
        )
        for r in records
    ]
    output_names = [o.name for o in graph.output]
    primary, ties = primary_output(
        index,
        facts,
        [(o, (tensors.get(o) or TensorInfo(None, 0)).shape) for o in output_names],
        len(shape) - 2 if len(shape) > 2 else 1,
    )
    groupings = {}
    for name in output_names:
        upstream = index.ancestor_nodes([name])
        if any(f.node_index in upstream for f in facts):
            groupings[name] = group_layers(index, tensors, facts, name)
    groups = _layer_groups(groupings, primary, [r["name"] for r in records])
    layers = tuple(KernelLayer(group=groups[r["name"]], **r) for r in records)

    layout, channel_axis = _input_layout(index, tensors, image.name, layers, shape)
    outputs = _describe_outputs(index, tensors, layers, groupings)
    input_description = InputDescription(
        name=image.name,
        declared_shape=declared,
        shape=shape,
        layout=layout,
        channel_axis=channel_axis,
        dynamic_batch=dynamic_batch,
        dtype=_dtype_name(image.type.tensor_type.elem_type),
    )
    return ModelAnalysis(
        model=loaded,
        input=input_description,
        outputs=outputs,
        layers=layers,
        tensors=tensors,
        groupings=groupings,
        primary_output=primary,
        primary_ties=tuple(ties),
    )


def _layer_groups(
    groupings: dict[str, LayerGrouping], primary: str | None, names: list[str]
) -> dict[str, str]:
    """Each layer's group for the primary output; a layer off its path takes its group for
    the first other output it feeds (a deep-supervision side head stays a head)."""
    ordered = [groupings[primary]] if primary in groupings else []
    ordered += [g for name, g in groupings.items() if name != primary]
    groups = {}
    for name in names:
        found = [g.groups[name] for g in ordered if g.groups[name] != OFF_PATH]
        groups[name] = found[0] if found else OFF_PATH
    return groups


_POOLS = {"AveragePool", "MaxPool", "LpPool", "ReduceMean", "ReduceMax"}
_CARRIERS = _PER_CHANNEL_UNARY | {"Cast", "Dropout", "Resize", "Upsample"}


def _is_pyramid_bin(index: GraphIndex, data_input: str, block_output: str) -> bool:
    """True for a kernel on a pooled summary of a map F whose result is resized back and
    merged with F itself, beside at least one other such branch: a bin of a pyramid-pooling
    module (PSPNet), context rather than a stage of the encoder. One branch alone is not
    enough: a one-level U-Net (pool, convolution, upsample, concatenate with F) has that shape."""
    pooled_from = _pooled_source(index, data_input)
    if pooled_from is None:
        return False
    tensor = block_output
    for _ in range(8):
        consumers = [  # a Shape read only sizes the resize back
            c for c in index.consumers.get(tensor, []) if index.nodes[c].op_type != "Shape"
        ]
        if len(consumers) != 1:
            return False
        node = index.nodes[consumers[0]]
        if node.op_type in ("Concat", "Add", "Sum", "Mul"):
            if pooled_from not in node.input:
                return False
            branches = [_branch_source(index, name) for name in node.input if name != pooled_from]
            return branches.count(pooled_from) >= 2
        if node.op_type not in _CARRIERS:
            return False
        tensor = node.output[0]
    return False


def _producer_behind(
    index: GraphIndex, tensor: str, through: set[str], steps: int
) -> onnx.NodeProto | None:
    """The first node behind ``tensor`` whose op is not one of ``through``, walking back along
    first inputs at most ``steps`` nodes; None past a graph input or too far."""
    for _ in range(steps):
        producer = index.producer.get(tensor)
        if producer is None:
            return None
        node = index.nodes[producer]
        if node.op_type not in through:
            return node
        tensor = node.input[0]
    return None


def _pooled_source(index: GraphIndex, tensor: str) -> str | None:
    """The map a pooling summarised, when ``tensor`` is that pooling behind per-channel ops."""
    node = _producer_behind(index, tensor, _PER_CHANNEL_UNARY | {"Cast", "Dropout"}, 6)
    return node.input[0] if node is not None and node.op_type in _POOLS else None


def _branch_source(index: GraphIndex, tensor: str) -> str | None:
    """For a merge input made by pool → kernel → resize back, the map that was pooled."""
    node = _producer_behind(index, tensor, _CARRIERS | _PER_CHANNEL_BINARY, 8)
    if node is None or node.op_type not in KERNEL_OPS:
        return None
    return _pooled_source(index, node.input[0])


_PRODUCTS = {"MatMul", "Einsum"}


def _feeds_only_attention(index: GraphIndex, kernel_nodes: set[int], node_index: int) -> bool:
    """True for a kernel whose every path ends in an attention product (a MatMul or Einsum
    of two computed tensors) before any other kernel or graph output: the spatial-reduction
    convolution of efficient attention (SegFormer, PVT) makes keys and values, a summary the
    queries read, not a stage of the feature map, however small its output."""
    outputs = set(index.graph_outputs)
    stack = [t for t in index.nodes[node_index].output if t]
    seen: set[str] = set()
    reached_attention = False
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in outputs:
            return False
        for consumer in index.consumers.get(tensor, []):
            node = index.nodes[consumer]
            if consumer in kernel_nodes:
                return False
            computed = [name for name in node.input if name and not index.is_constant(name)]
            if node.op_type in _PRODUCTS and len(computed) >= 2:
                reached_attention = True
                continue
            stack.extend(o for o in node.output if o)
    return reached_attention


def _input_layout(
    index: GraphIndex,
    tensors: dict[str, TensorInfo],
    input_name: str,
    layers: tuple[KernelLayer, ...],
    shape: tuple[int, ...],
) -> tuple[str, int | None]:
    rank = len(shape)
    first = min(layers, key=lambda item: item.depth)
    if first.spatial_rank == rank - 1:
        # (N, H, W) or (N, D, H, W): the graph makes the channel axis (Unsqueeze) itself.
        return "N" + ("DHW" if first.spatial_rank == 3 else "HW"[-first.spatial_rank :]), None
    for layer in sorted(layers, key=lambda item: item.depth):
        node = index.nodes[layer.node_index]
        traced = _trace_axis_to_input(index, tensors, node.input[0], layer.channel_axis)
        if traced is not None and traced[0] == input_name and traced[1] in (1, rank - 1):
            side = "first" if traced[1] == 1 else "last"
            return _LAYOUT_NAMES.get((rank, side), f"rank{rank}-{side}"), traced[1]
    # No clean path (e.g. a reshape-heavy stem): fall back to the usual shape convention.
    last_is_channels = rank >= 4 and shape[-1] <= 4 < shape[1]
    side = "last" if last_is_channels else "first"
    return _LAYOUT_NAMES.get(
        (rank, side), f"rank{rank}-{side}"
    ), rank - 1 if last_is_channels else 1


def _describe_outputs(
    index: GraphIndex,
    tensors: dict[str, TensorInfo],
    layers: tuple[KernelLayer, ...],
    groupings: dict[str, LayerGrouping],
) -> tuple[OutputDescription, ...]:
    axes: dict[str, int] = {}
    heads = {name for g in groupings.values() for name in g.names("head")}
    for layer in layers:
        if layer.name in heads:
            axes.update(_output_channel_axis(index, tensors, layer.output, layer.channel_axis))
    described = []
    for output in index.graph.output:
        info = tensors.get(output.name)
        described.append(
            OutputDescription(
                name=output.name,
                shape=None if info is None or info.shape is None else info.shape,
                channel_axis=axes.get(output.name),
                activation=_output_activation(index, output.name),
            )
        )
    return tuple(described)

"""Which kernel layers come before, at and after a model's information bottleneck.

The papers' adapted methods combine the maps of every *post-bottleneck* layer: the layers that
rebuild the mask from the most compressed representation the network makes of the input. Where
that representation lies depends on the architecture, and on which output is explained, so the
groups are computed per output (``group_layers``) by one of two rules (docs/layer-groups.md):

* ``upsampling-decoder`` (U-Net, V-Net, nnU-Net, SegResNet, UNETR, FPN/DeepLabV3+-style decoders):
  the bottleneck is every feature layer at the smallest spatial size on the paths to the output;
  the post-bottleneck group is every feature layer after it (they work at growing resolutions).
* ``encoder-head`` (DeepLabV3/ASPP, LR-ASPP, FCN, PSPNet): the head works at the backbone's
  deepest resolution, so nothing lies after the smallest size. The bottleneck is then the
  backbone's output: the last map at that size that every path to the head passes through and
  that is wider than everything after it; the post-bottleneck group is every kernel layer
  after it on the way to the output.

In both, the convolutions that produce the output's class channels are the ``head`` (P1 leaves
them out), and *gates* (kernels on a pooled summary of a feature map: squeeze-excitation, the
image-pooling branch of ASPP, PSP's pyramid bins, attention's spatial reductions) never define
the bottleneck.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from segattr_onnx.graph.index import GraphIndex, outer_scope_reads
from segattr_onnx.graph.shapes import TensorInfo

UPSAMPLING_DECODER = "upsampling-decoder"
ENCODER_HEAD = "encoder-head"
HEAD_ONLY = "head-only"
OFF_PATH = "off-path"

RULE_DESCRIPTIONS = {
    UPSAMPLING_DECODER: "post-bottleneck = the feature layers after the smallest spatial size",
    ENCODER_HEAD: "post-bottleneck = the head's layers after the backbone's output",
    HEAD_ONLY: "only classifier convolutions feed this output",
}


@dataclass(frozen=True)
class LayerFacts:
    """What the grouping rules read of one kernel layer (a view of the catalogue's record)."""

    name: str
    node_index: int
    spatial_size: int
    depth: int
    block_output: str
    block_channel_axis: int
    is_gate: bool


@dataclass(frozen=True)
class LayerGrouping:
    """The groups of every kernel layer for one output, and the rule that made them."""

    output: str
    rule: str
    groups: dict[str, str]  # layer name -> encoder / bottleneck / decoder / head / off-path
    order: tuple[str, ...]  # layer names in graph order
    backbone_end: str | None = None  # the tensor the encoder-head rule split the graph at

    def names(self, group: str) -> list[str]:
        return [name for name in self.order if self.groups[name] == group]

    @property
    def on_path(self) -> list[str]:
        return [name for name in self.order if self.groups[name] != OFF_PATH]

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "rule": self.rule,
            "rule_description": RULE_DESCRIPTIONS[self.rule],
            "backbone_end": self.backbone_end,
            "bottleneck": self.names("bottleneck"),
            "post_bottleneck": self.names("decoder"),
            "head": self.names("head"),
        }


def kernel_depths(index: GraphIndex, kernel_nodes: set[int]) -> dict[int, int]:
    """Kernel layers on the longest input→node path, counting the node itself."""
    depth: dict[int, int] = {}
    for node_index in index.order:
        node = index.nodes[node_index]
        parents = [index.producer[n] for n in node.input if n in index.producer]
        best = max((depth.get(p, 0) for p in parents), default=0)
        depth[node_index] = best + (1 if node_index in kernel_nodes else 0)
    return {i: depth[i] for i in kernel_nodes}


def head_nodes(index: GraphIndex, kernel_nodes: Iterable[int], output: str) -> set[int]:
    """Kernel layers whose output reaches ``output`` without crossing another kernel layer."""
    kernel_set = set(kernel_nodes)
    heads = set()
    for node_index in kernel_set:
        stack = list(index.nodes[node_index].output)
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor == output:
                heads.add(node_index)
                break
            for consumer in index.consumers.get(tensor, []):
                if consumer not in kernel_set:
                    stack.extend(index.nodes[consumer].output)
    return heads


def group_layers(
    index: GraphIndex,
    tensors: dict[str, TensorInfo],
    layers: Sequence[LayerFacts],
    output: str,
) -> LayerGrouping:
    """Groups of ``layers`` (in graph order) for the target ``output``."""
    order = tuple(layer.name for layer in layers)
    upstream = index.ancestor_nodes([output])
    on_path = [layer for layer in layers if layer.node_index in upstream]
    groups = {layer.name: OFF_PATH for layer in layers}
    heads = head_nodes(index, (layer.node_index for layer in on_path), output)
    for layer in on_path:
        if layer.node_index in heads:
            groups[layer.name] = "head"
    feature = [layer for layer in on_path if layer.node_index not in heads and not layer.is_gate]
    if not feature:
        for layer in on_path:
            if groups[layer.name] == OFF_PATH:
                groups[layer.name] = "encoder"
        return LayerGrouping(output, HEAD_ONLY, groups, order)
    smallest = min(layer.spatial_size for layer in feature)
    plateau = [layer for layer in feature if layer.spatial_size == smallest]
    plateau_nodes = {layer.node_index for layer in plateau}
    after = index.descendant_nodes(
        t for layer in plateau for t in index.nodes[layer.node_index].output
    )
    if any(layer.node_index in after - plateau_nodes for layer in feature):
        rule, backbone_end = UPSAMPLING_DECODER, None
        _upsampling_decoder(feature, plateau_nodes, after, groups)
    else:
        rule = ENCODER_HEAD
        backbone_end = _encoder_head(index, tensors, feature, plateau, groups)
    _place_gates(index, on_path, heads, groups, backbone_end)
    return LayerGrouping(output, rule, groups, order, backbone_end)


def _upsampling_decoder(
    feature: list[LayerFacts],
    plateau_nodes: set[int],
    after: set[int],
    groups: dict[str, str],
) -> None:
    """Before, at and after the smallest size. A layer on a branch beside the bottleneck that
    does not depend on it (UNETR's full-resolution convolutions on the image) cannot rebuild the
    mask from the bottleneck's representation, so it is an encoder layer, however deep."""
    for layer in feature:
        if layer.node_index in plateau_nodes:
            groups[layer.name] = "bottleneck"
        elif layer.node_index in after:
            groups[layer.name] = "decoder"
        else:
            groups[layer.name] = "encoder"


_PASS_THROUGH = {"Relu", "LeakyRelu", "Clip", "HardSwish", "Elu", "Selu", "Identity", "Sigmoid"}


def _encoder_head(
    index: GraphIndex,
    tensors: dict[str, TensorInfo],
    feature: list[LayerFacts],
    plateau: list[LayerFacts],
    groups: dict[str, str],
) -> str:
    """Split the deepest-resolution layers at the backbone's output; returns that tensor.

    Candidates are the block outputs of the deepest layers and the residual sums they join
    (in a ResNet stage only the sums carry everything) that every path to the last deepest
    layer passes through. Backbones end on a wide map and heads narrow it (ResNet-50: 2048
    channels into ASPP's 256), so the backbone's output is the latest candidate wider than
    every candidate after it. Widest overall would not do: the expansions inside MobileNet's
    inverted-residual blocks can be wider than the backbone's last map."""
    position = {node: rank for rank, node in enumerate(index.order)}
    sink = max(plateau, key=lambda layer: position[layer.node_index])
    dominating = _dominating_tensors(index, sink.block_output)
    candidates: dict[str, int] = {}
    for layer in plateau:
        candidates.setdefault(layer.block_output, layer.block_channel_axis)
        for consumer in index.consumers.get(layer.block_output, []):
            if index.nodes[consumer].op_type in ("Add", "Sum"):
                merged = _through_activations(index, index.nodes[consumer].output[0])
                candidates.setdefault(merged, layer.block_channel_axis)
    scored = []
    for tensor, axis in candidates.items():
        if tensor not in dominating:
            continue  # a parallel branch: the head does not depend on it alone
        info = tensors.get(tensor)
        width = info.shape[axis] if info is not None and info.shape is not None else None
        producer = position.get(index.producer.get(tensor, -1), -1)
        scored.append((producer, width if isinstance(width, int) else 0, tensor))
    scored.sort()
    end, widest_after = scored[-1][2], scored[-1][1]
    for _, width, tensor in reversed(scored[:-1]):
        if width > widest_after:
            end = tensor
            break
        widest_after = max(widest_after, width)
    earlier = {tensor for _, _, tensor in scored if tensor != end}
    after = index.descendant_nodes([end])
    for layer in feature:
        if layer.node_index in after:
            groups[layer.name] = "decoder"
        elif layer.spatial_size == sink.spatial_size and _reaches_directly(
            index, layer.block_output, end, feature, earlier
        ):
            groups[layer.name] = "bottleneck"
        else:
            groups[layer.name] = "encoder"
    return end


def _through_activations(index: GraphIndex, tensor: str) -> str:
    """Follow a residual sum through the activation that ends its block (Add → Relu)."""
    while True:
        consumers = index.consumers.get(tensor, [])
        if len(consumers) != 1 or index.nodes[consumers[0]].op_type not in _PASS_THROUGH:
            return tensor
        tensor = index.nodes[consumers[0]].output[0]


def _reaches_directly(
    index: GraphIndex, tensor: str, end: str, feature: list[LayerFacts], earlier: set[str]
) -> bool:
    """True when ``tensor`` reaches ``end`` without crossing another kernel layer or an
    earlier block's output: the layers whose output *is* the backbone's output (the last
    block's convolution and its shortcut), not every residual writer of the stage."""
    kernels = {layer.node_index for layer in feature}
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if current == end:
            return True
        if current in seen or (current in earlier and current != tensor):
            continue
        seen.add(current)
        for consumer in index.consumers.get(current, []):
            if consumer not in kernels:
                stack.extend(index.nodes[consumer].output)
    return False


def _dominating_tensors(index: GraphIndex, target: str) -> set[str]:
    """The tensors every path from the graph inputs to ``target`` passes through (``target``
    included): the outputs of the nodes that dominate its producer.

    Immediate dominators over the DAG in topological order (Cooper, Harvey and Kennedy's
    intersection), so the cost stays linear in the graph however many candidates are asked
    about. Only data flows count: a node is reached when any input is (constants are always
    there), a body's reads from the enclosing graph included."""
    producer = index.producer.get(target)
    if producer is None:
        return {target}
    relevant = index.ancestor_nodes([target])
    root = -1
    position = {root: 0}
    idom = {root: root}
    graph_inputs = set(index.graph_inputs)
    for node_index in index.order:
        if node_index not in relevant:
            continue
        node = index.nodes[node_index]
        predecessors = []
        for name in (*node.input, *outer_scope_reads(node)):
            if name in graph_inputs:
                predecessors.append(root)
            elif name in index.producer and index.producer[name] in idom:
                predecessors.append(index.producer[name])
        if not predecessors:
            continue  # computed from constants only: never blocks anything
        dominator = predecessors[0]
        for other in predecessors[1:]:
            dominator = _intersect(dominator, other, idom, position)
        idom[node_index] = dominator
        position[node_index] = len(position)
    found = {target}
    node = producer if producer in idom else root
    while node != root:
        found.update(name for name in index.nodes[node].output if name)
        node = idom[node]
    return found


def _intersect(a: int, b: int, idom: dict[int, int], position: dict[int, int]) -> int:
    while a != b:
        while position[a] > position[b]:
            a = idom[a]
        while position[b] > position[a]:
            b = idom[b]
    return a


def _place_gates(
    index: GraphIndex,
    on_path: list[LayerFacts],
    heads: set[int],
    groups: dict[str, str],
    backbone_end: str | None,
) -> None:
    """Gates belong to the feature map they gate: the group of the nearest feature layer
    upstream of them; in an encoder-head network every gate after the backbone is the head's."""
    after_end = index.descendant_nodes([backbone_end]) if backbone_end else set()
    by_index = {layer.node_index: layer for layer in on_path}
    for layer in on_path:
        if not layer.is_gate or layer.node_index in heads:
            continue
        if layer.node_index in after_end:
            groups[layer.name] = "decoder"
            continue
        upstream = index.ancestor_nodes([index.nodes[layer.node_index].input[0]])
        candidates = [by_index[i] for i in upstream if i in by_index and not by_index[i].is_gate]
        candidates = [c for c in candidates if c.node_index not in heads]
        groups[layer.name] = (
            groups[max(candidates, key=lambda c: c.depth).name] if candidates else "encoder"
        )


def primary_output(
    index: GraphIndex,
    layers: Sequence[LayerFacts],
    outputs: Sequence[tuple[str, tuple | None]],
    spatial_rank: int,
) -> tuple[str | None, list[str]]:
    """The output explained by default, and the others that tie with it.

    Segmentation-shaped outputs (a map of the input's spatial rank) come first, then the one
    the most kernel layers feed (deep-supervision side outputs are fed by fewer), then the
    largest."""

    def size(shape: tuple | None) -> int:
        dims = [d for d in (shape or ()) if isinstance(d, int)]
        return int(np.prod(dims)) if dims else 0

    def segmentation_shaped(shape: tuple | None) -> bool:
        if shape is None:
            return True
        spatial = [d for d in shape[1:] if not isinstance(d, int) or d > 1]
        return len(shape) >= spatial_rank + 1 and len(spatial) >= spatial_rank

    scored = []
    for name, shape in outputs:
        upstream = index.ancestor_nodes([name])
        fed = sum(layer.node_index in upstream for layer in layers)
        if fed:
            scored.append(((segmentation_shaped(shape), fed), size(shape), name))
    if not scored:
        return None, []
    best = max(key for key, _, _ in scored)
    tied = [(s, name) for key, s, name in scored if key == best]
    chosen = max(tied)[1]
    return chosen, [name for _, name in tied if name != chosen]

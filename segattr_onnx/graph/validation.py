"""Refuse graphs that would crash ONNX Runtime itself, before any session is built.

ONNX Runtime trusts a node's attributes: a convolution with a stride of 0 divides by zero in
its shape computation and kills the process (SIGFPE), with no exception to catch. A model
from a vendor is untrusted input, so the attributes that size windows are checked here and a
bad one is a clear error naming the node.

Model-local functions are checked before onnx inlines them: one that calls itself, directly or
through others, would make the inliner and ONNX Runtime recurse until they crash, and calls
nested in calls multiply the nodes inlining makes. A graph output whose declared shape
contradicts the one the graph computes is refused too: the analysis would size targets and
masks from the lie.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import onnx

from segattr_onnx.errors import InputShapeError, ModelFileError
from segattr_onnx.graph.index import outer_scope_reads
from segattr_onnx.text import setting

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
_AT_LEAST_ONE = ("strides", "dilations", "kernel_shape", "output_shape")
# Where each convolution takes its weight, and the ops a stored weight may pass through first.
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "ConvInteger": 1, "QLinearConv": 3}
_WEIGHT_CARRIERS = {"DequantizeLinear", "QuantizeLinear", "Identity", "Cast"}
# Inlining copies a function's body at every call, so nested calls multiply: 20 functions each
# calling the next twice make a million nodes out of a file of 40. Real models stay far below.
INLINED_NODE_LIMIT = 500_000


def check_graph(model: onnx.ModelProto, name: str) -> None:
    """Raise ``ModelFileError`` for a graph with no output or a window attribute ONNX Runtime
    cannot survive (stride, dilation or kernel size below 1, negative pads, group below 1), or
    a convolution whose stored weight has a size of 0 (ONNX Runtime loops for ever on it)."""
    if not model.graph.output:
        raise ModelFileError(f"{name} declares no graph output; there is nothing to explain")
    weights = _stored_dims(model.graph)
    for node in _all_nodes(model.graph):
        if node.op_type not in _WINDOWED or node.domain not in ("", "ai.onnx"):
            continue
        position = _WEIGHT_INPUT.get(node.op_type, len(node.input))
        weight = weights(node.input[position]) if position < len(node.input) else None
        if weight is not None and any(d < 1 for d in weight):
            raise _bad(
                node, f"a weight of shape {list(weight)} (every size must be at least 1)", name
            )
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


def in_topological_order(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` itself when its main graph lists every node after the nodes it reads from,
    else a copy in that order (the original order kept wherever it can be).

    ONNX requires the order, and every walk of the graph here relies on it, but ONNX Runtime
    does not: its own float16 converter (``onnxruntime.transformers.float16``) appends the
    input's and output's Casts after the nodes that read them, and such files run. A graph
    that no order can satisfy (a cycle, a tensor nothing produces) is refused.
    """
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    reads = [
        [n for n in (*node.input, *sorted(outer_scope_reads(node))) if n] for node in graph.node
    ]
    known = set(available)
    ordered = True
    for node, needed in zip(graph.node, reads, strict=True):
        if not all(n in known for n in needed):
            ordered = False
            break
        known.update(node.output)
    if ordered:
        return model
    producers = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    waiting = [
        {producers[n] for n in needed if n not in available and n in producers} for needed in reads
    ]
    for position, needed in enumerate(reads):
        missing = [n for n in needed if n not in available and n not in producers]
        if missing:
            node = graph.node[position]
            raise ModelFileError(
                f"{node.op_type} node {node.name!r} of {name} reads {missing[0]!r}, which no "
                "node, input or initializer of the graph gives; re-export the model"
            )
    readers: dict[int, list[int]] = {}
    for position, sources in enumerate(waiting):
        for source in sources:
            readers.setdefault(source, []).append(position)
    ready = sorted(i for i, sources in enumerate(waiting) if not sources)
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for reader in readers.get(position, ()):
            waiting[reader].discard(position)
            if not waiting[reader]:
                heapq.heappush(ready, reader)
    if len(order) < len(graph.node):
        raise ModelFileError(f"the graph of {name} has a cycle; re-export the model")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(graph.node[i] for i in order)
    return result


def _bad(node: onnx.NodeProto, what: str, name: str) -> ModelFileError:
    return ModelFileError(
        f"{node.op_type} node {node.name!r} of {name} has {what}; ONNX Runtime cannot run it "
        "— re-export the model"
    )


def _all_nodes(graph: onnx.GraphProto):
    return _nodes_within(graph.node)


def _stored_dims(graph: onnx.GraphProto):
    """A lookup: the dims of the initializer or Constant a tensor is (or is a Cast,
    Identity or (De)QuantizeLinear of), None for a computed tensor."""
    dims: dict[str, tuple[int, ...]] = {}
    carried: dict[str, str] = {}
    pending = [graph]
    while pending:
        current = pending.pop()
        dims.update({t.name: tuple(t.dims) for t in current.initializer})
        for node in current.node:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and node.output and value is not None:
                dims[node.output[0]] = tuple(value.dims)
            elif node.op_type in _WEIGHT_CARRIERS and node.input and node.output:
                carried[node.output[0]] = node.input[0]
            for attribute in node.attribute:
                pending += [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]

    def lookup(tensor: str) -> tuple[int, ...] | None:
        for _ in range(4):
            if tensor in dims:
                return dims[tensor]
            if tensor not in carried:
                return None
            tensor = carried[tensor]
        return None

    return lookup


# --------------------------------------------------------------------------- local functions
FunctionKey = tuple[str, str, str]


def _function_key(domain: str, name: str, overload: str) -> FunctionKey:
    return ("" if domain == "ai.onnx" else domain, name, overload)


def _describe(key: FunctionKey) -> str:
    domain, name, overload = key
    return f"{domain}::{name}" + (f":{overload}" if overload else "")


def _nodes_within(nodes: Iterable[onnx.NodeProto]):
    """The nodes, and those of every subgraph (If, Loop, Scan bodies) inside them."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            for sub in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
                yield from _nodes_within(sub.node)


def check_functions(model: onnx.ModelProto, name: str) -> None:
    """Raise ``ModelFileError`` for model-local functions onnx's inliner and ONNX Runtime cannot
    survive: one defined twice, one that calls itself (directly or through other functions),
    or calls nested so deep that inlining would make more than ``INLINED_NODE_LIMIT`` nodes.
    Run it before inlining: ONNX Runtime crashes on recursion, older onnx inliners recurse."""
    if not model.functions:
        return
    keys: list[FunctionKey] = [
        _function_key(f.domain, f.name, getattr(f, "overload", "")) for f in model.functions
    ]
    twice = [key for key, count in Counter(keys).items() if count > 1]
    if twice:
        raise ModelFileError(
            f"{name} defines the local function {_describe(twice[0])} more than once; "
            "re-export the model"
        )

    def calls(nodes: Iterable[onnx.NodeProto]) -> tuple[int, Counter[FunctionKey]]:
        """Nodes that are not calls of a local function, and the calls of each."""
        plain, called = 0, Counter[FunctionKey]()
        for node in _nodes_within(nodes):
            key = _function_key(node.domain, node.op_type, getattr(node, "overload", ""))
            if key in local:
                called[key] += 1
            else:
                plain += 1
        return plain, called

    local = set(keys)
    bodies = {key: calls(f.node) for key, f in zip(keys, model.functions, strict=True)}
    sizes: dict[FunctionKey, int] = {}
    for key in _callees_first(bodies, name):
        plain, called = bodies[key]
        sizes[key] = _capped(plain + sum(count * sizes[c] for c, count in called.items()))
    plain, called = calls(model.graph.node)
    total = _capped(plain + sum(count * sizes[c] for c, count in called.items()))
    if total > INLINED_NODE_LIMIT:
        raise ModelFileError(
            f"{name} nests its local functions so that inlining them would make more than "
            f"{INLINED_NODE_LIMIT:,} nodes; re-export the model without functions"
        )


def _capped(count: int) -> int:
    return min(count, INLINED_NODE_LIMIT + 1)


def _callees_first(
    bodies: Mapping[FunctionKey, tuple[int, Counter[FunctionKey]]], name: str
) -> list[FunctionKey]:
    """The functions, each after every function it calls; ``ModelFileError`` naming the cycle
    when one calls itself. Iterative, so a long chain of calls cannot exhaust the stack."""
    done: set[FunctionKey] = set()
    order: list[FunctionKey] = []
    for root in bodies:
        if root in done:
            continue
        path = [root]
        stack = [iter(bodies[root][1])]
        while stack:
            for callee in stack[-1]:
                if callee in path:
                    cycle = [*path[path.index(callee) :], callee]
                    raise ModelFileError(
                        f"{name} has a local function that calls itself "
                        f"({' -> '.join(_describe(k) for k in cycle)}); recursive functions "
                        "cannot be inlined or run — re-export the model"
                    )
                if callee not in done:
                    path.append(callee)
                    stack.append(iter(bodies[callee][1]))
                    break
            else:
                stack.pop()
                finished = path.pop()
                done.add(finished)
                order.append(finished)
    return order


# --------------------------------------------------------------------------- declared outputs
def _declared(value_info: onnx.ValueInfoProto) -> tuple | None:
    """Declared dims: a positive int, or None for a symbol, an unknown or a non-positive size."""
    if not value_info.type.HasField("tensor_type"):
        return None
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None
        for dim in tensor_type.shape.dim
    )


def _format(dims: Sequence) -> str:
    """1x2x16x16; a symbol or unknown size as ?."""
    return "x".join(str(d) if isinstance(d, int) else "?" for d in dims) if dims else "a scalar"


def check_declared_outputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]],
    computed: Mapping[str, Sequence | None],
) -> None:
    """Raise ``ModelFileError`` when a graph output's declared shape contradicts ``computed``
    (what inference found for ``input_shapes``): another rank, or another size where both are
    numbers. Only at the size the inputs declare: at any other, an output's fixed sizes are
    the exporter's leftovers, and the computed shape simply wins."""
    sizes = []
    for graph_input in model.graph.input:
        if graph_input.name in input_shapes:
            declared = _declared(graph_input)
            wanted = tuple(input_shapes[graph_input.name])
            if declared is None or len(declared) != len(wanted):
                return
            if any(d != w for d, w in zip(declared[1:], wanted[1:], strict=True)):
                return
            sizes.append(_format(wanted))
    for graph_output in model.graph.output:
        declared = _declared(graph_output)
        found = computed.get(graph_output.name)
        if declared is None or found is None:
            continue
        found = tuple(d if isinstance(d, int) and d > 0 else None for d in found)
        if len(declared) != len(found) or any(
            d is not None and f is not None and d != f for d, f in zip(declared, found, strict=True)
        ):
            raise ModelFileError(
                f"output {graph_output.name!r} is declared {_format(declared)} but the graph "
                f"computes {_format(found)} from its {' and '.join(sizes) or 'declared'} "
                "input; its declared output shape is wrong — re-export the model"
            )


def check_computed_sizes(
    computed: Mapping[str, Sequence | None], names: Iterable[str], input_size: str
) -> None:
    """Raise ``InputShapeError`` when inference gives one of ``names`` (the convolutions'
    outputs, the graph's) a size below 1: a kernel larger than its padded input, or strides,
    dilations or pads no run survives. ONNX Runtime would refuse the run later, or the memory
    estimate would read the nonsense size."""
    for tensor in names:
        dims = computed.get(tensor)
        if dims and any(isinstance(d, int) and d < 1 for d in dims[1:]):
            raise InputShapeError(
                f"tensor {tensor!r} would be {_format(dims)} for a {input_size} input: a size "
                "below 1, so the model cannot run at this size; give a larger input "
                f"({setting('--input-shape', 'input_shape=')}), or re-export the model if its "
                "kernels, strides, dilations or pads are wrong"
            )


def check_kernel_ranks(model: onnx.ModelProto, computed: Mapping[str, Sequence | None]) -> None:
    """Raise ``ModelFileError`` for a convolution whose input has another number of dims than
    its weight, or whose output has fewer (``computed``: the shapes inference found). ONNX
    Runtime's shape inference (onnx's) indexes past the dims of such an input and aborts the
    process; it also leaves a ConvTranspose whose ``output_shape`` is smaller than its input
    with only (N, C), which the next convolution then reads. Run this before any session."""
    weights = _stored_dims(model.graph)
    for node in model.graph.node:
        position = _WEIGHT_INPUT.get(node.op_type)
        if position is None or node.domain not in ("", "ai.onnx") or len(node.input) <= position:
            continue
        weight = computed.get(node.input[position]) or weights(node.input[position])
        if weight is None:
            continue
        data = computed.get(node.input[0])
        if data is not None and len(data) != len(weight):
            raise ModelFileError(
                f"{node.op_type} node {node.name!r} takes a {len(data)}-D input "
                f"({_format(data)}) but has a {len(weight)}-D weight; ONNX Runtime cannot run "
                "it — re-export the model"
            )
        result = computed.get(node.output[0]) if node.output else None
        if result is not None and len(result) < len(weight):
            sizes = next((a.ints for a in node.attribute if a.name == "output_shape"), None)
            why = f" (its output_shape {list(sizes)} is smaller than its input)" if sizes else ""
            raise ModelFileError(
                f"{node.op_type} node {node.name!r} has a {len(weight)}-D weight but its output "
                f"has {len(result)} dims{why}; ONNX Runtime cannot run it — re-export the model"
            )

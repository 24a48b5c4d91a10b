"""Randomising kernel layers' parameters in a copy of a model: the sanity cascade's rewrite.

A sanity check (``sanity.py``) destroys what a model learnt, layer by layer, and asks whether
an explanation notices. The rewrite replaces each chosen layer's stored weight and bias with
seeded normal draws of the tensor's own mean and spread (docs/sanity.md says why), in a copy:
the user's file and ``LoadedModel`` are never touched, and weights in external data stay on
disk except those replaced, which the copy holds inline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from segattr_onnx.errors import GraphRewriteError
from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.graph.index import GraphIndex
from segattr_onnx.graph.loading import LoadedModel

# Where each kernel op takes its parameters: (weight input, bias input or None).
_PARAMETER_INPUTS: dict[str, tuple[int, int | None]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "NhwcConv": (1, 2),
    "FusedConv": (1, 2),
    "QLinearConv": (3, 8),
    "ConvInteger": (1, None),
}
# Ops a stored weight may pass through on its way to the kernel: the new values are drawn for
# the stored tensor, which these ops then dequantise, cast or reshape as they did the old ones.
_WEIGHT_CHAIN = {"DequantizeLinear", "Cast", "Identity", "Reshape", "Transpose", "Squeeze",
                 "Unsqueeze"}  # fmt: skip
_FLOAT_TYPES = (np.float16, np.float32, np.float64)
_INTEGER_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


@dataclass(frozen=True)
class _Stored:
    """One stored parameter tensor: an initializer, or a Constant node's ``value``."""

    name: str
    tensor: onnx.TensorProto
    initializer: int | None  # its position in graph.initializer, or None for a Constant
    constant_node: int | None  # the Constant node holding it, or None for an initializer


def layer_parameters(model: LoadedModel, layer: KernelLayer) -> tuple[str, ...]:
    """The names of the stored tensors a randomisation of ``layer`` replaces: its weight and,
    when it has one, its bias (behind any DequantizeLinear, Cast or reshape)."""
    index = GraphIndex(model.proto.graph)
    return tuple(stored.name for stored in _layer_tensors(index, layer))


def _layer_tensors(index: GraphIndex, layer: KernelLayer) -> list[_Stored]:
    node = index.nodes[layer.node_index]
    if node.op_type not in _PARAMETER_INPUTS:
        raise GraphRewriteError(
            f"layer {layer.name!r} is a {node.op_type}, whose parameters segattr-onnx cannot "
            f"randomise (it randomises {', '.join(_PARAMETER_INPUTS)}); give fewer steps, so "
            "that the cascade stops before it"
        )
    weight_input, bias_input = _PARAMETER_INPUTS[node.op_type]
    found = [_stored_tensor(index, layer, node.input[weight_input], "weight")]
    if bias_input is not None and len(node.input) > bias_input and node.input[bias_input]:
        found.append(_stored_tensor(index, layer, node.input[bias_input], "bias"))
    return [stored for stored in found if stored is not None]


def _stored_tensor(index: GraphIndex, layer: KernelLayer, name: str, role: str) -> _Stored | None:
    """The stored tensor behind a kernel's parameter input, checked to feed that kernel alone:
    replacing a tensor another node also reads would randomise that node too. None for a
    shared tensor without spread (simplifiers merge the zero biases of many layers into one):
    its draw is its own value, so there is nothing to replace."""
    reader = layer.node_index
    tensor = name
    for _ in range(16):
        readers = index.consumers.get(tensor, [])
        if readers != [reader]:
            values = index.constant_value(tensor) if tensor in index.initializers else None
            if values is not None and values.size and np.all(values == values.flat[0]):
                return None
            raise GraphRewriteError(
                f"the {role} of layer {layer.name!r} ({tensor!r}) is shared with other nodes; "
                "randomising it would change them too, which the sanity cascade cannot do; "
                "give fewer steps, so that the cascade stops before this layer"
            )
        if tensor in index.initializers:
            position = next(i for i, t in enumerate(index.graph.initializer) if t.name == tensor)
            return _checked(_Stored(tensor, index.initializers[tensor], position, None))
        producer = index.producer.get(tensor)
        if producer is None:
            break
        node = index.nodes[producer]
        if node.op_type == "Constant":
            values = [a for a in node.attribute if a.name == "value"]
            if not values:
                break
            return _checked(_Stored(tensor, values[0].t, None, producer))
        if node.op_type not in _WEIGHT_CHAIN or not all(
            index.is_constant(n) for n in node.input[1:] if n
        ):
            break
        reader, tensor = producer, node.input[0]
    raise GraphRewriteError(
        f"the {role} of layer {layer.name!r} ({name!r}) is not a tensor stored in the model "
        "(it is computed at run time), so it cannot be randomised; give fewer steps, so "
        "that the cascade stops before this layer"
    )


def _checked(stored: _Stored) -> _Stored:
    """A stored tensor of a type the cascade can draw, refused clearly otherwise (before any
    explanation runs, since ``sanity_check`` checks every layer first)."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(stored.tensor.data_type))
    if dtype.type not in _FLOAT_TYPES + _INTEGER_TYPES:
        raise GraphRewriteError(
            f"tensor {stored.name!r} holds {dtype} values, which the sanity cascade cannot "
            "randomise (it draws float16/32/64 and 8- to 32-bit integer tensors); give fewer "
            "steps, so that the cascade stops before its layer"
        )
    return stored


def _draw(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New values for one tensor: a normal draw with the tensor's own mean and standard
    deviation, in its own type (integers rounded and clipped to their type's range, so
    quantised weights stay on their DequantizeLinear's grid)."""
    dtype = values.dtype
    original = values.astype(np.float64)
    drawn = rng.normal(float(original.mean()), float(original.std()), size=values.shape)
    if dtype.kind == "f":
        largest = float(np.finfo(dtype).max)
        return np.clip(drawn, -largest, largest).astype(dtype)
    limits = np.iinfo(dtype)
    return np.clip(np.rint(drawn), limits.min, limits.max).astype(dtype)


def randomise_layers(
    model: LoadedModel, layers: Sequence[KernelLayer], seed: int = 0
) -> LoadedModel:
    """A copy of ``model`` whose ``layers`` have new weights and biases, drawn in the order the
    layers are given from ``numpy.random.default_rng(seed)``.

    Drawing in a fixed order from one generator makes the cascade cumulative: the copy for the
    last k layers holds, for the k − 1 layers of the step before, the very values that step
    drew, so each step adds the randomisation of one layer to the previous one. ``model`` is
    never changed; the copy has no path, and reads any external data it still names from the
    model's folder.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model.proto)
    index = GraphIndex(copy.graph)
    rng = np.random.default_rng(seed)
    folder = str(model.external_data_dir) if model.external_data_dir is not None else ""
    done: set[str] = set()
    for layer in layers:
        for stored in _layer_tensors(index, layer):
            if stored.name in done:
                continue
            done.add(stored.name)
            values = numpy_helper.to_array(stored.tensor, base_dir=folder)
            new = numpy_helper.from_array(_draw(values, rng), stored.name)
            if stored.initializer is not None:
                copy.graph.initializer[stored.initializer].CopyFrom(new)
            else:
                assert stored.constant_node is not None
                node = copy.graph.node[stored.constant_node]
                next(a for a in node.attribute if a.name == "value").t.CopyFrom(new)
    return LoadedModel(proto=copy, path=None, external_data_dir=model.external_data_dir)

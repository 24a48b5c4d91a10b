"""Brute-force references for the attribution methods, built from onnx and onnxruntime alone.

Everything docs/algorithms.md sections 1–4 defines is computed here the slow, obvious way, so the
method tests can hold the library to it:

* a kernel is ablated by EDITING THE MODEL'S WEIGHTS (never by the library's graph rewrites) and
  the whole model is run again: P2 zeroes the kernel's conv weights and bias and every
  per-channel parameter of its block (norm scale and shift, per-channel Mul/Add constants), so
  the block output channel is exactly 0; P1 swaps the kernel's weights for the seeded Glorot
  ones and keeps its bias, so the raw conv output channel is what a Glorot kernel outputs;
* the target P, up(), minmax and the combination rules are written out here from the spec.

The only library function used is ``glorot_uniform``, which *defines* P1's random weights (the
layer's name and the explainer's seed pick them). Nothing in the reference path touches
segattr_onnx's engine, arrays, methods or combine modules.

To keep the runtime low, one ONNX Runtime session per fixture serves every ablation: the
parameters the ablations edit are turned into graph inputs, fed with the original values unless
an ablation edits them, and the raw conv outputs and block outputs of the explained layers are
extra graph outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from segattr_onnx.graph.rewrite import glorot_uniform
from tests.conftest import Fixture, fixture

CAM_P2_EPSILON = 1e-7
# Ops that act on each channel on their own without parameters: a zero channel stays zero.
ZERO_PRESERVING = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Clip", "Identity"}
NORMALISATIONS = {"InstanceNormalization", "BatchNormalization"}  # inputs 1, 2 = scale, shift
PER_CHANNEL_CONSTANT_OPS = {"Mul", "Add", "Sub"}
CHANNELS_LAST = {"NHWC", "NDHWC", "NWC"}


# --------------------------------------------------------------------------- spec arithmetic
def minmax(values: np.ndarray) -> np.ndarray:
    """(M − min M)/(max M − min M); 0 everywhere when M is constant."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


def _axis_taps(size_in: int, size_out: int) -> list[tuple[tuple[int, float], tuple[int, float]]]:
    """For each output index: the two input indices and weights, half-pixel centres, clamped."""
    taps = []
    for i in range(size_out):
        source = (i + 0.5) * size_in / size_out - 0.5
        source = min(max(source, 0.0), size_in - 1.0)
        low = int(np.floor(source))
        high = min(low + 1, size_in - 1)
        frac = source - low
        taps.append(((low, 1.0 - frac), (high, frac)))
    return taps


def upsample(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """up(M): bilinear/trilinear resize of the trailing axes to ``shape``, one voxel at a time.

    Each output voxel is the weighted sum of the 2^d input voxels around its half-pixel centre
    (clamped at the borders). Leading axes (kernels) are carried along.
    """
    values = np.asarray(values, dtype=np.float64)
    rank = len(shape)
    lead, size_in = values.shape[: values.ndim - rank], values.shape[values.ndim - rank :]
    taps = [_axis_taps(n_in, n_out) for n_in, n_out in zip(size_in, shape, strict=True)]
    out = np.zeros((*lead, *shape))
    for position in itertools.product(*(range(n) for n in shape)):
        total = np.zeros(lead)
        for corner in itertools.product(*(taps[a][i] for a, i in enumerate(position))):
            weight = float(np.prod([w for _, w in corner]))
            if weight:
                total = total + weight * values[(Ellipsis, *(j for j, _ in corner))]
        out[(Ellipsis, *position)] = total
    return out


def combine_kwc(maps: Sequence[np.ndarray], shape: Sequence[int], variant: str) -> np.ndarray:
    """KWC: P2 Σ_ℓ up(M_ℓ) / max; P1 minmax(mean_ℓ minmax(up(M_ℓ)))."""
    if variant == "p1":
        return minmax(np.mean([minmax(upsample(m, shape)) for m in maps], axis=0))
    total = np.sum([upsample(m, shape) for m in maps], axis=0)
    return total / total.max()


def combine_cam(maps: Sequence[np.ndarray], shape: Sequence[int], variant: str) -> np.ndarray:
    """CAMs: P2 Σ_ℓ up(M_ℓ/(max M_ℓ + 1e-7)) / max; P1 minmax(mean_ℓ minmax(up(M_ℓ)))."""
    if variant == "p1":
        return minmax(np.mean([minmax(upsample(m, shape)) for m in maps], axis=0))
    total = np.sum([upsample(m / (m.max() + CAM_P2_EPSILON), shape) for m in maps], axis=0)
    return total / total.max()


def cam_layer_map(weights: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """M_ℓ = ReLU(Σ_k w_k A_k)."""
    total = sum(w * a for w, a in zip(weights, activation.astype(np.float64), strict=True))
    return np.maximum(total, 0.0)


def kwc_layer_map(weights: np.ndarray, activation: np.ndarray, variant: str) -> np.ndarray:
    """P2: Σ_k w_k |A_k| / max|A|; P1: ReLU(Σ_k w_k ReLU(A_k))."""
    activation = activation.astype(np.float64)
    if variant == "p1":
        total = sum(w * np.maximum(a, 0.0) for w, a in zip(weights, activation, strict=True))
        return np.maximum(total, 0.0)
    peak = np.abs(activation).max()
    return sum(w * np.abs(a) for w, a in zip(weights, activation, strict=True)) / peak


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ReferenceLayer:
    """One kernel layer as read from the graph, with what an ablation must edit."""

    name: str
    op: str
    kernels: int
    weight: str
    bias: str | None
    raw_output: str  # the conv node's output, channel axis 1
    block_output: str  # end of the per-channel chain after the conv
    block_axis: int  # channel axis of block_output (Transposes move it)
    block_params: tuple[str, ...]  # per-channel initializers zeroed with the kernel (P2)

    def weight_index(self, k: int) -> tuple:
        """Where output channel k lives in the weight: Conv W[k]; ConvTranspose W[:, k]."""
        return (k,) if self.op == "Conv" else (slice(None), k)


def _trace_layer(graph: onnx.GraphProto, name: str) -> ReferenceLayer:
    """Follow the conv's output through its chain of per-channel ops (the P2 block)."""
    node = next(n for n in graph.node if n.name == name)
    assert node.op_type in ("Conv", "ConvTranspose"), node.op_type
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    assert group == 1, "the reference handles ungrouped convolutions only"
    inits = {t.name: t for t in graph.initializer}
    weight = inits[node.input[1]]
    kernels = int(weight.dims[0] if node.op_type == "Conv" else weight.dims[1])
    rank = len(weight.dims)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for tensor in n.input:
            consumers.setdefault(tensor, []).append(n)
    outputs = {o.name for o in graph.output}

    tensor, axis = node.output[0], 1
    block_output, block_axis = tensor, axis
    params: list[str] = []
    while tensor not in outputs and len(consumers.get(tensor, [])) == 1:
        reader = consumers[tensor][0]
        if reader.op_type == "Transpose":
            perm = list(next(a.ints for a in reader.attribute if a.name == "perm"))
            axis = perm.index(axis)
        elif reader.op_type in NORMALISATIONS:
            params += list(reader.input[1:3])
        elif reader.op_type in PER_CHANNEL_CONSTANT_OPS:
            other = [t for t in reader.input if t != tensor]
            if len(other) != 1 or other[0] not in inits:
                break
            shape = list(inits[other[0]].dims)
            varying = [i for i, d in enumerate(shape) if d != 1]
            if varying != [len(shape) - 1 - (rank - 1 - axis)] or shape[varying[0]] != kernels:
                break  # not a per-channel constant along this tensor's channel axis
            params.append(other[0])
        elif reader.op_type not in ZERO_PRESERVING:
            break
        tensor = reader.output[0]
        if reader.op_type != "Transpose":  # a trailing Transpose only moves the channel
            block_output, block_axis = tensor, axis
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return ReferenceLayer(
        name=name,
        op=node.op_type,
        kernels=kernels,
        weight=node.input[1],
        bias=bias,
        raw_output=node.output[0],
        block_output=block_output,
        block_axis=block_axis,
        block_params=tuple(params),
    )


@dataclass
class ReferenceModel:
    """A fixture's model with the ablation parameters as inputs; P as docs/algorithms.md §1 says."""

    fx: Fixture
    layers: tuple[ReferenceLayer, ...]
    seed: int  # the explainer's seed: picks the P1 Glorot weights with the layer's name
    session: ort.InferenceSession = field(repr=False)
    params: dict[str, np.ndarray] = field(repr=False)  # original values of the edited inputs

    @classmethod
    def build(cls, fx: Fixture, layer_names: Sequence[str], seed: int = 0) -> ReferenceModel:
        model = fx.load_with_weights()
        graph = model.graph
        layers = tuple(_trace_layer(graph, name) for name in layer_names)
        wanted = set()
        for layer in layers:
            wanted |= {layer.weight, *layer.block_params} | ({layer.bias} - {None})
        readers = [t for n in graph.node for t in n.input]
        for name in wanted:
            assert readers.count(name) == 1, f"initializer {name} is shared; editing it leaks"
        params = {}
        kept = []
        for tensor in graph.initializer:
            if tensor.name in wanted:
                params[tensor.name] = numpy_helper.to_array(tensor).copy()
                graph.input.append(
                    helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
            else:
                kept.append(tensor)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        present = {o.name for o in graph.output}
        for layer in layers:
            for name in (layer.raw_output, layer.block_output):
                if name not in present:
                    graph.output.append(
                        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                    )
                    present.add(name)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return cls(fx, layers, seed, session, params)

    # ---------------------------------------------------------------- running
    @property
    def input_name(self) -> str:
        return self.fx.spec["input_name"]

    @property
    def channels_last(self) -> bool:
        return self.fx.spec["layout"] in CHANNELS_LAST

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        shape = self.fx.test_shape
        return tuple(shape[1:-1] if self.channels_last else shape[2:])

    def run(self, x: np.ndarray, edits: dict[str, np.ndarray] | None = None) -> dict:
        feeds = {self.input_name: x, **self.params, **(edits or {})}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def probability(self, outputs: dict, class_index: int | None = None) -> np.ndarray:
        """P: the target class's probability map (batch dropped), float64.

        Default target: class 0 of a one-channel output, else class 1; the output as is when the
        graph ends in Sigmoid/Softmax, else sigmoid (one channel) or softmax over the classes.
        """
        spec = self.fx.spec
        raw = outputs[spec["output_name"]][0].astype(np.float64)
        classes = np.moveaxis(raw, -1, 0) if self.channels_last else raw
        n_classes = classes.shape[0]
        assert n_classes == spec["n_classes"]
        target = (0 if n_classes == 1 else 1) if class_index is None else class_index
        if spec["final_activation"] in ("sigmoid", "softmax"):
            return classes[target]
        if n_classes == 1:
            return 1.0 / (1.0 + np.exp(-classes[target]))
        exp = np.exp(classes - classes.max(axis=0))
        return exp[target] / exp.sum(axis=0)

    def masked_input(self, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """x ⊙ h with h broadcast over the input channels, in the model's own layout."""
        mask = h[None, ..., None] if self.channels_last else h[None, None]
        return (x.astype(np.float32) * mask.astype(np.float32)).astype(x.dtype)

    # ---------------------------------------------------------------- ablation by weight edits
    def block_zero_edits(self, layer: ReferenceLayer, removed: Iterable[int]) -> dict:
        """P2: weights, bias and block parameters of the removed kernels set to 0."""
        weight = self.params[layer.weight].copy()
        others = {name: self.params[name].copy() for name in layer.block_params}
        bias = None if layer.bias is None else self.params[layer.bias].copy()
        for k in removed:
            weight[layer.weight_index(k)] = 0
            if bias is not None:
                bias[k] = 0
            for value in others.values():
                value.reshape(-1)[k] = 0  # one non-unit dim: flat index k is channel k
        edits = {layer.weight: weight, **others}
        if bias is not None:
            edits[layer.bias] = bias
        return edits

    def glorot_edits(self, layer: ReferenceLayer, removed: Iterable[int]) -> dict:
        """P1: the removed kernels' weights replaced by the seeded Glorot ones; bias kept."""
        original = self.params[layer.weight]
        random = glorot_uniform(original.shape, self.seed, layer.name).astype(original.dtype)
        weight = original.copy()
        for k in removed:
            weight[layer.weight_index(k)] = random[layer.weight_index(k)]
        return {layer.weight: weight}

    def edits(self, form: str, layer: ReferenceLayer, removed: Iterable[int]) -> dict:
        if form == "block":
            return self.block_zero_edits(layer, removed)
        return self.glorot_edits(layer, removed)


# --------------------------------------------------------------------------- cached references
@dataclass(frozen=True)
class LayerAblation:
    """What removing each kernel of one layer does to P, and checks that the edits were exact."""

    layer: ReferenceLayer
    activation: np.ndarray  # A: raw conv output of the unmodified model, (C, *S_ℓ)
    dependent: np.ndarray  # D_k = Σ max(P − P^{−k}, 0)
    independent: np.ndarray  # I_k = Σ min(P^{k}, P)
    drop_scores: np.ndarray  # T(P^{−k})
    ablated_peak: float  # max |ablated channel| of the block output (P2 form: must be 0)
    kept_error: float  # max |kept channel − A| of the raw conv output (must be 0)
    replaced_error: float  # max |ablated raw channel − that channel with all kernels ablated|


@dataclass(frozen=True)
class CaseReference:
    model: ReferenceModel
    x: np.ndarray
    prediction: np.ndarray  # P
    base_score: float  # S0
    activations: dict[str, np.ndarray]  # layer → A_ℓ (C, *S_ℓ)
    class_index: int | None = None
    region: np.ndarray | None = None  # R as 0/1 weights; None = all voxels

    def probability(self, outputs: dict) -> np.ndarray:
        return self.model.probability(outputs, self.class_index)

    def total(self, values: np.ndarray) -> float:
        """Σ over R."""
        return float(values.sum() if self.region is None else (values * self.region).sum())


def region_mask(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A seeded random region of interest (about half the voxels)."""
    return np.random.default_rng(seed).random(shape) > 0.5


@cache
def reference_model(name: str, layer_names: tuple[str, ...], seed: int = 0) -> ReferenceModel:
    return ReferenceModel.build(fixture(name), layer_names, seed)


@cache
def case_reference(
    name: str,
    layer_names: tuple[str, ...],
    input_seed: int,
    class_index: int | None = None,
    region_seed: int | None = None,
) -> CaseReference:
    model = reference_model(name, layer_names)
    x = model.fx.input(input_seed)
    outputs = model.run(x)
    prediction = model.probability(outputs, class_index)
    region = None if region_seed is None else region_mask(prediction.shape, region_seed)
    activations = {layer.name: outputs[layer.raw_output][0] for layer in model.layers}
    base = float(prediction.sum() if region is None else (prediction * region).sum())
    return CaseReference(model, x, prediction, base, activations, class_index, region)


@cache
def ablation_reference(
    name: str,
    layer_names: tuple[str, ...],
    input_seed: int,
    form: str,
    class_index: int | None = None,
    region_seed: int | None = None,
) -> tuple[LayerAblation, ...]:
    """Every kernel of every layer removed alone (P^{−k}) and kept alone (P^{k}), full runs."""
    case = case_reference(name, layer_names, input_seed, class_index, region_seed)
    model, p = case.model, case.prediction
    results = []
    for layer in model.layers:
        kernels = range(layer.kernels)
        activation = case.activations[layer.name]
        dependent, independent, drop_scores = [], [], []
        ablated_peak, kept_error, replaced_error = 0.0, 0.0, 0.0
        # What every ablated raw channel must be: 0 (P2) or the Glorot kernel's output (P1).
        replacement = model.run(case.x, model.edits(form, layer, kernels))[layer.raw_output][0]
        for k in kernels:
            others = [j for j in kernels if j != k]
            for removed, kept in (([k], others), (others, [k])):
                outputs = model.run(case.x, model.edits(form, layer, removed))
                raw = outputs[layer.raw_output][0]
                if kept:
                    error = np.abs(raw[kept] - activation[kept]).max()
                    kept_error = max(kept_error, float(error))
                if removed:
                    error = np.abs(raw[removed] - replacement[removed]).max()
                    replaced_error = max(replaced_error, float(error))
                if form == "block" and removed:
                    block = np.moveaxis(outputs[layer.block_output][0], layer.block_axis - 1, 0)
                    ablated_peak = max(ablated_peak, float(np.abs(block[removed]).max()))
                ablated = case.probability(outputs)
                if kept is others:  # P^{−k}
                    dependent.append(case.total(np.maximum(p - ablated, 0.0)))
                    drop_scores.append(case.total(ablated))
                else:  # P^{k}
                    independent.append(case.total(np.minimum(ablated, p)))
        results.append(
            LayerAblation(
                layer,
                activation,
                np.array(dependent),
                np.array(independent),
                np.array(drop_scores),
                ablated_peak,
                kept_error,
                replaced_error,
            )
        )
    return tuple(results)


@cache
def scorecam_scores(name: str, layer_names: tuple[str, ...], input_seed: int) -> tuple:
    """s_k = Σ P(x ⊙ minmax(up(A_k))), one full model run per masked input."""
    case = case_reference(name, layer_names, input_seed)
    model = case.model
    scores = []
    for layer in model.layers:
        upsampled = upsample(case.activations[layer.name], model.spatial_shape)
        layer_scores = []
        for h in upsampled:
            outputs = model.run(model.masked_input(case.x, minmax(h)))
            layer_scores.append(model.probability(outputs).sum())
        scores.append(np.array(layer_scores))
    return tuple(scores)

"""The saliency head: a gradient CAM computed by ONNX nodes, after the model's backward graph.

``graph/gradient_model.py`` gives a model whose outputs include each explained layer's raw
activation A_ℓ and its gradient ∂T/∂A_ℓ. This module appends what ``explain`` does with them
on the host (docs/algorithms.md §4): each layer's map M_ℓ, brought to the input's size with
the same half-pixel linear resize, and the chosen combination rule, so that the one model
outputs the explanation next to its prediction. Every step is the formula written with
standard ONNX operators (opset 11 and later, for Resize's half-pixel mode), in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from segattr_onnx.errors import MethodError
from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.methods.combine import CAM_P2_EPSILON
from segattr_onnx.methods.gradcam import CANCELLATION, GRADCAM_PP_EPSILON

EXPORTABLE_METHODS = ("gradcam", "gradcampp", "layercam", "hirescam")
MIN_OPSET = 11  # Resize with coordinate_transformation_mode="half_pixel"


@dataclass(frozen=True)
class SaliencyLayer:
    """Where one explained layer's activation and gradient are in the gradient model."""

    activation: str  # A_ℓ as the model computes it (its own layout and dtype)
    gradient: str  # ∂T/∂A_ℓ, same shape
    channel_axis: int
    shape: tuple[int, ...]  # both tensors' (static) shape, batch of 1 included
    elem_type: int  # both tensors' ONNX element type


class _Writer(GradientBuilder):
    """The backward builder's opset-aware verbs, naming what it adds under ``segattr_saliency``."""

    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"segattr_saliency/{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def f32(self, value: float) -> str:
        return self.const(np.array(value, np.float32), hint="c")

    def reduce_all(self, op_type: str, source: str) -> str:
        """A reduction over every axis, kept as size-1 axes (no axes given: all of them)."""
        return self.op(op_type, [source], keepdims=1)

    def channel_first_float(self, layer: SaliencyLayer, tensor: str) -> str:
        """(1, C, *S) float32 from the layer's own layout and dtype."""
        if layer.elem_type == TensorProto.FLOAT16:
            # Read the float16 value a graph output holds. ONNX Runtime's CPU kernels compute
            # a float16 model in float32 behind inserted Casts and drops a float16→float32
            # Cast pair when nothing needs the float16 value in between, so a Cast read here
            # would see the float32 value, which explain never does. A Reshape to the same
            # shape (a float16 kernel of its own) keeps the rounding.
            same = self.const(np.array(layer.shape, np.int64), hint="same_shape")
            tensor = self.op("Reshape", [tensor, same], "float16_value")
        value = self.op("Cast", [tensor], "float", to=TensorProto.FLOAT)
        if layer.channel_axis == 1:
            return value
        rank = len(layer.shape)
        perm = [0, layer.channel_axis, *(a for a in range(1, rank) if a != layer.channel_axis)]
        return self.op("Transpose", [value], "channels_first", perm=perm)


def _layer_map(writer: _Writer, method: str, layer: SaliencyLayer) -> str:
    """M_ℓ as (1, 1, *S_ℓ) float32, by the method's formula."""
    activation = writer.channel_first_float(layer, layer.activation)
    gradient = writer.channel_first_float(layer, layer.gradient)
    spatial = list(range(2, len(layer.shape)))
    if method in ("layercam", "hirescam"):
        used = writer.op("Relu", [gradient]) if method == "layercam" else gradient
        weighted = writer.op("Mul", [used, activation], "weighted")
    else:
        if method == "gradcam":
            weights = _gradcam_weights(writer, gradient, spatial)
        else:
            weights = _gradcampp_weights(writer, gradient, activation, spatial)
        return writer.op("Relu", [_weighted_sum(writer, weights, activation, layer)], "layer_map")
    summed = writer.reduce("ReduceSum", weighted, [1], keepdims=1)
    return writer.op("Relu", [summed], "layer_map")


def _weighted_sum(writer: _Writer, weights: str, activation: str, layer: SaliencyLayer) -> str:
    """Σ_k w_k A_k as one (1, C) × (C, V) MatMul, as explain's float32 tensordot computes it
    (an element-wise product and a channel sum would be two passes over the layer)."""
    kernels = layer.shape[layer.channel_axis]
    spatial = [d for axis, d in enumerate(layer.shape) if axis not in (0, layer.channel_axis)]
    rows = writer.op("Reshape", [weights, writer.const(np.array([1, kernels], np.int64))])
    stack = writer.op("Reshape", [activation, writer.const(np.array([kernels, -1], np.int64))])
    product = writer.op("MatMul", [rows, stack], "weighted_sum")
    return writer.op("Reshape", [product, writer.const(np.array([1, 1, *spatial], np.int64))])


def _gradcam_weights(writer: _Writer, gradient: str, spatial: list) -> str:
    """The mean of each kernel's gradient, and 0 for the whole layer when every kernel's
    gradient sums to 0 up to rounding (``methods.gradcam.gradient_cancels``: |Σ g| ≤ 1e-4 ·
    Σ |g|, here |mean g| ≤ 1e-4 · mean |g|). In float32: the layers that cancel sit at 1e-8 to
    2e-6 and the others at 4e-3 or more, far from where float32 sums could tip the test."""
    means = writer.reduce("ReduceMean", gradient, spatial, keepdims=1)
    spread = writer.reduce("ReduceMean", writer.op("Abs", [gradient]), spatial, keepdims=1)
    bound = writer.op("Mul", [spread, writer.f32(CANCELLATION)])
    within = writer.op("LessOrEqual", [writer.op("Abs", [means]), bound])
    cancels = writer.op(
        "Greater",
        [writer.reduce_all("ReduceMin", writer.op("Cast", [within], to=TensorProto.FLOAT)),
         writer.f32(0.5)],
    )  # fmt: skip
    moves = writer.op("Greater", [writer.reduce_all("ReduceMax", spread), writer.f32(0.0)])
    zero = writer.op("And", [cancels, moves], "cancels")
    return writer.op("Where", [zero, writer.f32(0.0), means], "gradcam_weights")


def _gradcampp_weights(writer: _Writer, gradient: str, activation: str, spatial: list) -> str:
    """w_k = Σ_v ReLU(g) α with α = g² / (2g² + Σ_u A_u · g³ + ε), in float64 as explain
    computes it: α's denominator can come close to 0, where float32 rounding of its terms
    moves the weights by 1e-4. ReLU(g) α is written ReLU(g)³ / denominator, which is the same
    value (0 where g ≤ 0, g = 0 included) in fewer passes over the layer."""
    g = writer.op("Cast", [gradient], "g64", to=TensorProto.DOUBLE)
    a = writer.op("Cast", [activation], "a64", to=TensorProto.DOUBLE)
    total = writer.reduce("ReduceSum", a, spatial, keepdims=1)
    squared = writer.op("Mul", [g, g], "g2")
    linear = writer.op("Add", [writer.const(np.array(2.0)), writer.op("Mul", [total, g])])
    denominator = writer.op("Mul", [squared, linear])  # 2g² + Σ A · g³
    denominator = writer.op(
        "Add", [denominator, writer.const(np.array(GRADCAM_PP_EPSILON))], "denominator"
    )
    positive = writer.op("Relu", [g])
    numerator = writer.op("Mul", [writer.op("Mul", [positive, positive]), positive])
    weights = writer.reduce("ReduceSum", writer.op("Div", [numerator, denominator]), spatial, 1)
    return writer.op("Cast", [weights], "weights", to=TensorProto.FLOAT)


def _upsample(writer: _Writer, layer_map: str, shape: Sequence[int]) -> str:
    """up(M): half-pixel linear resize to the input's spatial size (clamped at the borders,
    as ``arrays.upsample``)."""
    sizes = writer.const(np.array([1, 1, *shape], np.int64), hint="sizes")
    empty = writer.const(np.zeros(0, np.float32), hint="empty")
    return writer.op(
        "Resize",
        [layer_map, empty, empty, sizes],
        "up",
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )


def _minmax(writer: _Writer, values: str) -> str:
    """(M − min)/(max − min), and 0 where M is constant."""
    low = writer.reduce_all("ReduceMin", values)
    span = writer.op("Sub", [writer.reduce_all("ReduceMax", values), low], "span")
    positive = writer.op("Greater", [span, writer.f32(0.0)])
    safe = writer.op("Where", [positive, span, writer.f32(1.0)])
    scaled = writer.op("Div", [writer.op("Sub", [values, low]), safe])
    return writer.op("Where", [positive, scaled, writer.f32(0.0)], "minmax")


def _scale_by_max(writer: _Writer, values: str) -> str:
    """M / max M, and 0 when max M ≤ 0."""
    peak = writer.reduce_all("ReduceMax", values)
    positive = writer.op("Greater", [peak, writer.f32(0.0)])
    safe = writer.op("Where", [positive, peak, writer.f32(1.0)])
    scaled = writer.op("Div", [values, safe])
    return writer.op("Where", [positive, scaled, writer.f32(0.0)], "scaled")


def append_saliency(
    model: onnx.ModelProto,
    layers: Sequence[SaliencyLayer],
    method: str,
    variant: str,
    input_spatial_shape: Sequence[int],
    output_name: str,
) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``output_name``: the explanation map as
    ``explain`` gives it, (1, *S_in) float32 in [0, 1]."""
    if method not in EXPORTABLE_METHODS:
        raise MethodError(
            f"method {method!r} cannot be exported as ONNX nodes; use one of "
            f"{', '.join(EXPORTABLE_METHODS)}"
        )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    writer = _Writer(result, {})
    if writer.opset < MIN_OPSET:
        raise MethodError(
            f"the model uses opset {writer.opset}; exporting an explanation needs opset "
            f"{MIN_OPSET} or later (Resize's half-pixel mode): convert the model with "
            "onnx.version_converter first"
        )
    shape = [int(d) for d in input_spatial_shape]
    upsampled = []
    for layer in layers:
        layer_map = _layer_map(writer, method, layer)
        if variant == "p1":
            upsampled.append(_minmax(writer, _upsample(writer, layer_map, shape)))
        else:  # p2: up(M / (max M + 1e-7))
            peak = writer.reduce_all("ReduceMax", layer_map)
            divisor = writer.op("Add", [peak, writer.f32(CAM_P2_EPSILON)])
            normalised = writer.op("Div", [layer_map, divisor])
            upsampled.append(_upsample(writer, normalised, shape))
    total = writer.accumulate(upsampled)
    if variant == "p1":
        mean = writer.op("Div", [total, writer.f32(float(len(upsampled)))], "mean")
        combined = _minmax(writer, mean)
    else:
        combined = _scale_by_max(writer, total)
    clipped = writer.op("Clip", [combined, writer.f32(0.0), writer.f32(1.0)], "clipped")
    final_shape = writer.const(np.array([1, *shape], np.int64), hint="map_shape")
    writer.nodes.append(
        onnx.helper.make_node("Reshape", [clipped, final_shape], [output_name], name=output_name)
    )
    result.graph.node.extend(writer.nodes)
    result.graph.output.append(
        onnx.helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, *shape])
    )
    return result

"""A score head: reduce each re-prediction to a few sums inside the graph itself.

Ablation and masked-input runs need only Σ_R max(P − P', 0), Σ_R min(P', P) and Σ_R P' per
row, not the K full-size predictions. Computing them in ONNX Runtime, right after the output,
means a run returns K×3 numbers instead of K volumes: no device-to-host copy of predictions on
CUDA and no per-chunk numpy pass on the host. The sums are accumulated in float64 (Cast before
ReduceSum) so they match a float64 host reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.graph.index import GraphIndex, opset_of

HEAD_COLUMNS = ("lost", "kept", "score")
DEFAULT_PREFIX = "segattr_head"
MIN_OPSET = 7  # multidirectional broadcasting of Sub/Mul/Add starts here


@dataclass(frozen=True)
class ScoreHeadSpec:
    """How the target turns one output into P: which tensor, axis and activation.

    The class index is an input of the head, not part of it, so one session serves every class.
    ``prefix`` names everything the head adds; pick one no tensor of the model starts with.
    """

    output: str
    elem_type: int
    rank: int
    channel_axis: int | None  # None: the output is already one map (N, *S)
    activation: str  # "softmax", "sigmoid" or "none"
    prefix: str = DEFAULT_PREFIX
    classes: int | None = None  # the class axis's size, when the graph fixes it

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}.{column}" for column in HEAD_COLUMNS)

    @property
    def base_input(self) -> str:
        return f"{self.prefix}.base_probability"

    @property
    def region_input(self) -> str:
        return f"{self.prefix}.region"

    @property
    def class_input(self) -> str | None:
        return None if self.channel_axis is None else f"{self.prefix}.class_index"

    def feed_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the base-P and region inputs: (1, *S) with a 1 at the class axis."""
        shape = [1, *spatial]
        if self.channel_axis is not None:
            shape.insert(self.channel_axis, 1)
        return tuple(shape)

    def feeds(
        self, prediction: np.ndarray, region: np.ndarray | None, class_index: int
    ) -> dict[str, np.ndarray]:
        """The head's inputs for one case: P, R (all ones when None) and the class."""
        shape = self.feed_shape(prediction.shape)
        weights = np.ones(shape, np.float32) if region is None else region.reshape(shape)
        # No copies: ONNX Runtime only reads its inputs, and in 3D each would be a volume.
        feeds = {
            self.base_input: prediction.astype(np.float32, copy=False).reshape(shape),
            self.region_input: weights.astype(np.float32, copy=False),
        }
        if self.class_input is not None:
            feeds[self.class_input] = np.array([class_index], np.int64)
        return feeds


def unused_prefix(names: set[str] | frozenset[str]) -> str:
    """``DEFAULT_PREFIX``, or a numbered variant when the model already uses that name."""
    prefix, number = DEFAULT_PREFIX, 1
    while any(name.startswith(prefix) for name in names):
        number += 1
        prefix = f"{DEFAULT_PREFIX}{number}"
    return prefix


class _HeadWriter:
    """Appends nodes named under the head's prefix, with the opset's form of ReduceSum."""

    def __init__(self, graph: onnx.GraphProto, spec: ScoreHeadSpec, opset: int) -> None:
        self.graph, self.spec, self.opset = graph, spec, opset
        self.nodes: list[onnx.NodeProto] = []

    def name(self, part: str) -> str:
        return f"{self.spec.prefix}.{part}"

    def add(self, op: str, inputs: list[str], part: str, **attributes) -> str:
        output = self.name(part)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def reduce(self, op: str, source: str, axes: list[int], keepdims: int, part: str) -> str:
        """A reduction other than ReduceSum, whose axes became an input at opset 18."""
        if self.opset >= 18:
            axes_name = self.name(f"axes_{'_'.join(map(str, axes))}")
            if axes_name not in {t.name for t in self.graph.initializer}:
                self.graph.initializer.append(
                    numpy_helper.from_array(np.array(axes, np.int64), axes_name)
                )
            return self.add(op, [source, axes_name], part, keepdims=keepdims)
        return self.add(op, [source], part, axes=axes, keepdims=keepdims)

    def reduce_sum(self, source: str, axes: list[int], keepdims: int, part: str) -> str:
        if self.opset >= 13:
            axes_name = self.name(f"axes_{'_'.join(map(str, axes))}")
            if axes_name not in {t.name for t in self.graph.initializer}:
                self.graph.initializer.append(
                    numpy_helper.from_array(np.array(axes, np.int64), axes_name)
                )
            return self.add("ReduceSum", [source, axes_name], part, keepdims=keepdims)
        return self.add("ReduceSum", [source], part, axes=axes, keepdims=keepdims)

    def probability(self, differentiable: bool = False) -> str:
        """P of the target class from the output, float32, class axis kept at size 1.

        ``differentiable`` uses exp(l_c − log Σ_j exp l_j) (stable, with gradient rules) instead
        of 1/Σexp(l_j − l_c), whose overflow gives the right P (0) but a NaN gradient.
        """
        spec = self.spec
        logits = spec.output
        if spec.elem_type != TensorProto.FLOAT:
            logits = self.add("Cast", [logits], "logits", to=TensorProto.FLOAT)
        if differentiable and spec.activation == "softmax":
            # P_c = exp(l_c − log Σ_j exp l_j): stable (ONNX Runtime's ReduceLogSumExp shifts
            # by the max) and differentiable without NaN, and a reduction over the class axis
            # instead of a Softmax op, which ONNX Runtime runs off the last axis by transposing
            # the logits twice (a sixth of a small U-Net's backward run).
            assert spec.channel_axis is not None and spec.class_input is not None
            chosen = self.add(
                "Gather", [logits, spec.class_input], "class_logit", axis=spec.channel_axis
            )
            total = self.reduce("ReduceLogSumExp", logits, [spec.channel_axis], 1, "log_total")
            log_probability = self.add("Sub", [chosen, total], "log_probability")
            return self.add("Exp", [log_probability], "probability")
        if spec.channel_axis is None:
            chosen = logits
        else:
            assert spec.class_input is not None
            chosen = self.add(
                "Gather", [logits, spec.class_input], "class_logit", axis=spec.channel_axis
            )
        if spec.activation == "softmax" and spec.classes == 2:
            # softmax_c = sigmoid(l_c − l_other) for two classes: one full-size Exp on one
            # channel instead of Exp on both and a sum over the class axis, which ONNX Runtime
            # reduces slowly (a third of the head's time on the benchmark U-Net).
            assert spec.class_input is not None
            one = self.name("one")
            self.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), one))
            other_class = self.add("Sub", [one, spec.class_input], "other_class")
            other = self.add("Gather", [logits, other_class], "other_logit", axis=spec.channel_axis)
            margin = self.add("Sub", [chosen, other], "margin")
            return self.add("Sigmoid", [margin], "probability")
        if spec.activation == "softmax":
            assert spec.channel_axis is not None, "softmax needs a class axis"
            # softmax_c = 1 / Σ_j exp(l_j − l_c): no Softmax op, whose axes changed at 13.
            shifted = self.add("Sub", [logits, chosen], "shifted")
            exponent = self.add("Exp", [shifted], "exp")
            total = self.reduce_sum(exponent, [spec.channel_axis], 1, "exp_sum")
            return self.add("Reciprocal", [total], "probability")
        if spec.activation == "sigmoid":
            return self.add("Sigmoid", [chosen], "probability")
        return self.add("Identity", [chosen], "probability")

    def finish(self, with_base: bool) -> None:
        graph, spec = self.graph, self.spec
        graph.node.extend(self.nodes)
        extras = [spec.base_input, spec.region_input] if with_base else [spec.region_input]
        for extra in extras:
            graph.input.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, None))
        if spec.class_input is not None:
            graph.input.append(
                helper.make_tensor_value_info(spec.class_input, TensorProto.INT64, [1])
            )


def _copy_keeping(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    index = GraphIndex(model.graph)
    keep = index.ancestor_nodes(outputs)
    headed = onnx.ModelProto()
    headed.CopyFrom(model)
    del headed.graph.node[:]
    headed.graph.node.extend(index.nodes[i] for i in index.order if i in keep)
    del headed.graph.value_info[:]
    return headed


def _bypass_graph_softmax(model: onnx.ModelProto, spec: ScoreHeadSpec) -> ScoreHeadSpec:
    """Read the logits under a final class-axis Softmax and take only class c from them.

    ONNX Runtime's CPU Softmax over a non-last axis transposes the whole tensor twice: on a
    (64, 2, 128, 128) batch it took 47 ms against 2.7 ms for 1/Σexp(l_j − l_c), which the head
    computes anyway for models that end in logits. The head needs only P_c, so when the output
    is a Softmax over the class axis that nothing else reads, the head starts from the Softmax's
    input and the Softmax is dropped. Before opset 13 Softmax normalises over every axis from
    ``axis`` on, so it is only bypassed there when the class axis is the last one.
    """
    if spec.activation != "none" or spec.channel_axis is None:
        return spec
    index = GraphIndex(model.graph)
    producer = index.producer.get(spec.output)
    if producer is None:
        return spec
    node = index.nodes[producer]
    if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return spec
    opset = opset_of(model)
    axis = index.node_attribute(producer, "axis", -1 if opset >= 13 else 1)
    if axis % spec.rank != spec.channel_axis:
        return spec
    if opset < 13 and spec.channel_axis != spec.rank - 1:
        return spec
    if index.consumers.get(spec.output):
        return spec  # another node reads the probabilities: keep them
    return replace(spec, output=node.input[0], activation="softmax")


def append_score_head(model: onnx.ModelProto, spec: ScoreHeadSpec) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are the per-row lost/kept/score sums.

    Inputs added: ``spec.base_input`` (P of the unmodified input) and ``spec.region_input`` (R
    as 0/1), both float32 shaped ``spec.feed_shape``, and ``spec.class_input`` (int64 [c]).
    Nodes that do not lead to ``spec.output`` are dropped, so other outputs of a multi-output
    model are not computed. Only ops with broadcasting since opset 7 are used.
    """
    spec = _bypass_graph_softmax(model, spec)
    headed = _copy_keeping(model, [spec.output])
    del headed.graph.output[:]
    writer = _HeadWriter(headed.graph, spec, opset_of(model))
    probability = writer.probability()
    spatial_axes = list(range(1, spec.rank))
    base, region = spec.base_input, spec.region_input
    lost = writer.add("Relu", [writer.add("Sub", [base, probability], "diff")], "lost_v")
    # min(P', P) = P' − max(P' − P, 0): Min only broadcasts from opset 8.
    excess = writer.add("Relu", [writer.add("Sub", [probability, base], "excess_diff")], "excess")
    kept = writer.add("Sub", [probability, excess], "kept_v")
    for column, values in zip(HEAD_COLUMNS, (lost, kept, probability), strict=True):
        in_region = writer.add("Mul", [values, region], f"{column}_r")
        wide = writer.add("Cast", [in_region], f"{column}_f64", to=TensorProto.DOUBLE)
        writer.reduce_sum(wide, spatial_axes, 0, column)
    writer.finish(with_base=True)
    for column in spec.outputs:
        headed.graph.output.append(helper.make_tensor_value_info(column, TensorProto.DOUBLE, None))
    return headed


def append_target_score(model: onnx.ModelProto, spec: ScoreHeadSpec) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` that also computes T = Σ_R P per batch row (float32, shape (N,)).

    The gradient methods differentiate T; inputs added are ``spec.region_input`` and
    ``spec.class_input``. The model's outputs are kept.
    """
    headed = onnx.ModelProto()
    headed.CopyFrom(model)
    writer = _HeadWriter(headed.graph, spec, opset_of(model))
    probability = writer.probability(differentiable=True)
    in_region = writer.add("Mul", [probability, spec.region_input], "target_r")
    score = writer.reduce_sum(in_region, list(range(1, spec.rank)), 0, "target_score")
    writer.finish(with_base=False)
    headed.graph.output.append(helper.make_tensor_value_info(score, TensorProto.FLOAT, None))
    return headed, score

"""A score head: reduce each re-prediction to a few sums inside the graph itself.

Ablation and masked-input runs need only Σ_R max(P − P', 0), Σ_R min(P', P) and Σ_R P' per
row, not the K full-size predictions. Computing them in ONNX Runtime, right after the output,
means a run returns K×3 numbers instead of K volumes: no device-to-host copy of predictions on
CUDA and no per-chunk numpy pass on the host. The sums are accumulated in float64 (Cast before
ReduceSum) so they match a float64 host reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        feeds = {
            self.base_input: prediction.astype(np.float32).reshape(shape),
            self.region_input: weights.astype(np.float32),
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


def append_score_head(model: onnx.ModelProto, spec: ScoreHeadSpec) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are the per-row lost/kept/score sums.

    Inputs added: ``spec.base_input`` (P of the unmodified input) and ``spec.region_input`` (R
    as 0/1), both float32 shaped ``spec.feed_shape``, and ``spec.class_input`` (int64 [c]).
    Nodes that do not lead to ``spec.output`` are dropped, so other outputs of a multi-output
    model are not computed. Only ops with broadcasting since opset 7 are used.
    """
    opset = opset_of(model)
    index = GraphIndex(model.graph)
    keep = index.ancestor_nodes([spec.output])
    headed = onnx.ModelProto()
    headed.CopyFrom(model)
    graph = headed.graph
    del graph.node[:]
    graph.node.extend(index.nodes[i] for i in index.order if i in keep)
    del graph.output[:]
    del graph.value_info[:]

    def name(part: str) -> str:
        return f"{spec.prefix}.{part}"

    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def reduce_sum(source: str, axes: list[int], keepdims: int, output: str) -> str:
        if opset >= 13:
            axes_name = name(f"axes_{'_'.join(map(str, axes))}")
            if axes_name not in {t.name for t in graph.initializer}:
                graph.initializer.append(
                    numpy_helper.from_array(np.array(axes, np.int64), axes_name)
                )
            return add("ReduceSum", [source, axes_name], output, keepdims=keepdims)
        return add("ReduceSum", [source], output, axes=axes, keepdims=keepdims)

    logits = spec.output
    if spec.elem_type != TensorProto.FLOAT:
        logits = add("Cast", [logits], name("logits"), to=TensorProto.FLOAT)
    if spec.channel_axis is None:
        chosen = logits
    else:
        assert spec.class_input is not None
        chosen = add(
            "Gather", [logits, spec.class_input], name("class_logit"), axis=spec.channel_axis
        )
    if spec.activation == "softmax":
        assert spec.channel_axis is not None, "softmax needs a class axis"
        # softmax_c = 1 / Σ_j exp(l_j − l_c): no Softmax op, whose axis semantics changed at 13.
        shifted = add("Sub", [logits, chosen], name("shifted"))
        exponent = add("Exp", [shifted], name("exp"))
        total = reduce_sum(exponent, [spec.channel_axis], 1, name("exp_sum"))
        probability = add("Reciprocal", [total], name("probability"))
    elif spec.activation == "sigmoid":
        probability = add("Sigmoid", [chosen], name("probability"))
    else:
        probability = add("Identity", [chosen], name("probability"))

    spatial_axes = list(range(1, spec.rank))
    base, region = spec.base_input, spec.region_input
    lost = add("Relu", [add("Sub", [base, probability], name("diff"))], name("lost_v"))
    # min(P', P) = P' − max(P' − P, 0): Min only broadcasts from opset 8.
    excess = add("Relu", [add("Sub", [probability, base], name("excess_diff"))], name("excess"))
    kept = add("Sub", [probability, excess], name("kept_v"))
    for column, values in zip(HEAD_COLUMNS, (lost, kept, probability), strict=True):
        in_region = add("Mul", [values, region], name(f"{column}_r"))
        wide = add("Cast", [in_region], name(f"{column}_f64"), to=TensorProto.DOUBLE)
        reduce_sum(wide, spatial_axes, 0, name(column))

    graph.node.extend(nodes)
    for extra in (base, region):
        graph.input.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, None))
    if spec.class_input is not None:
        graph.input.append(helper.make_tensor_value_info(spec.class_input, TensorProto.INT64, [1]))
    for column in spec.outputs:
        graph.output.append(helper.make_tensor_value_info(column, TensorProto.DOUBLE, None))
    return headed

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

from segattr_onnx.graph.index import GraphIndex

HEAD_COLUMNS = ("lost", "kept", "score")
BASE_INPUT = "segattr_head.base_probability"
REGION_INPUT = "segattr_head.region"
_PREFIX = "segattr_head"


@dataclass(frozen=True)
class ScoreHeadSpec:
    """How the target turns one output into P: which tensor, class, axis and activation."""

    output: str
    elem_type: int
    rank: int
    channel_axis: int | None  # None: the output is already one map (N, *S)
    class_index: int
    activation: str  # "softmax", "sigmoid" or "none"

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(f"{_PREFIX}.{column}" for column in HEAD_COLUMNS)

    def feed_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the base-P and region inputs: (1, *S) with a 1 at the class axis."""
        shape = [1, *spatial]
        if self.channel_axis is not None:
            shape.insert(self.channel_axis, 1)
        return tuple(shape)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def append_score_head(model: onnx.ModelProto, spec: ScoreHeadSpec) -> onnx.ModelProto:
    """A copy of ``model`` whose only outputs are the per-row lost/kept/score sums.

    Inputs added: ``BASE_INPUT`` (P of the unmodified input) and ``REGION_INPUT`` (R as 0/1),
    both float32 shaped ``spec.feed_shape``. Nodes that do not lead to ``spec.output`` are
    dropped, so other outputs of a multi-output model are not computed.
    """
    opset = _opset(model)
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
        return f"{_PREFIX}.{part}"

    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(
            helper.make_node(op, inputs, [output], name=f"{_PREFIX}/{output}", **attributes)
        )
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
        class_name = name("class_index")
        graph.initializer.append(
            numpy_helper.from_array(np.array([spec.class_index], np.int64), class_name)
        )
        chosen = add("Gather", [logits, class_name], name("class_logit"), axis=spec.channel_axis)
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
    lost = add("Relu", [add("Sub", [BASE_INPUT, probability], name("diff"))], name("lost_v"))
    kept = add("Min", [probability, BASE_INPUT], name("kept_v"))
    for column, values in zip(HEAD_COLUMNS, (lost, kept, probability), strict=True):
        in_region = add("Mul", [values, REGION_INPUT], name(f"{column}_r"))
        wide = add("Cast", [in_region], name(f"{column}_f64"), to=TensorProto.DOUBLE)
        reduce_sum(wide, spatial_axes, 0, name(column))

    graph.node.extend(nodes)
    for extra in (BASE_INPUT, REGION_INPUT):
        graph.input.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, None))
    for column in spec.outputs:
        graph.output.append(helper.make_tensor_value_info(column, TensorProto.DOUBLE, None))
    return headed

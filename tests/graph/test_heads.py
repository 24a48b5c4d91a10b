"""The in-graph score head computes exactly the host reduction of the target's probabilities."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx import Explainer
from segattr_onnx.graph.heads import ScoreHeadSpec, append_score_head, unused_prefix
from tests.conftest import fixture, run_reference


def _logit_model(opset: int, channels_last: bool, classes: int) -> onnx.ModelProto:
    """Identity-like model whose output is its input: the head sees exactly the given logits."""
    shape = [None, 4, 5, classes] if channels_last else [None, classes, 4, 5]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "logits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def _host_sums(logits, base, region, axis, class_index, activation):
    values = np.moveaxis(logits, axis, 1).astype(np.float64)
    if activation == "softmax":
        exp = np.exp(values - values.max(axis=1, keepdims=True))
        probability = exp[:, class_index] / exp.sum(axis=1)
    elif activation == "sigmoid":
        probability = 1 / (1 + np.exp(-values[:, class_index]))
    else:
        probability = values[:, class_index]
    lost = (np.maximum(base - probability, 0) * region).reshape(len(logits), -1).sum(1)
    kept = (np.minimum(probability, base) * region).reshape(len(logits), -1).sum(1)
    score = (probability * region).reshape(len(logits), -1).sum(1)
    return lost, kept, score


@pytest.mark.parametrize("opset", [7, 11, 13, 17])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("classes", "activation"), [(3, "softmax"), (1, "sigmoid"), (2, "none")])
def test_head_sums_equal_a_float64_host_reduction(opset, channels_last, classes, activation):
    rng = np.random.default_rng(opset + classes)
    axis = 3 if channels_last else 1
    spec = ScoreHeadSpec("logits", TensorProto.FLOAT, 4, axis, activation)
    model = append_score_head(_logit_model(opset, channels_last, classes), spec)
    logits = rng.normal(0, 3, (6, 4, 5, classes) if channels_last else (6, classes, 4, 5))
    logits = logits.astype(np.float32)
    base = rng.uniform(0, 1, (4, 5)).astype(np.float32)
    region = (rng.uniform(0, 1, (4, 5)) > 0.3).astype(np.float32)
    feeds = {"x": logits, **spec.feeds(base, region, classes - 1)}
    lost, kept, score = run_reference(model, feeds)
    expected = _host_sums(logits, base, region, axis, classes - 1, activation)
    for got, want in zip((lost, kept, score), expected, strict=True):
        assert got.dtype == np.float64 and got.shape == (6,)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("opset", [7, 13, 17])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("class_index", [0, 1])
def test_a_two_class_softmax_head_is_a_sigmoid_of_the_margin(opset, channels_last, class_index):
    """With the class axis fixed at 2, P_c is sigmoid(l_c − l_other): the same sums as the
    host's softmax, without Exp on both classes or a sum over the class axis."""
    rng = np.random.default_rng(opset + class_index)
    axis = 3 if channels_last else 1
    spec = ScoreHeadSpec("logits", TensorProto.FLOAT, 4, axis, "softmax", classes=2)
    model = append_score_head(_logit_model(opset, channels_last, 2), spec)
    ops = {node.op_type for node in model.graph.node}
    assert "Sigmoid" in ops and "Exp" not in ops
    logits = rng.normal(0, 3, (6, 4, 5, 2) if channels_last else (6, 2, 4, 5))
    by_class = np.moveaxis(logits, axis, 1)  # a view: (rows, class, ...)
    by_class[0, 0], by_class[0, 1] = 60, -60  # saturated margins, both ways, stay finite
    by_class[1, 0], by_class[1, 1] = -60, 60
    logits = logits.astype(np.float32)
    base = rng.uniform(0, 1, (4, 5)).astype(np.float32)
    region = (rng.uniform(0, 1, (4, 5)) > 0.3).astype(np.float32)
    feeds = {"x": logits, **spec.feeds(base, region, class_index)}
    got = run_reference(model, feeds)
    expected = _host_sums(logits, base, region, axis, class_index, "softmax")
    for value, want in zip(got, expected, strict=True):
        assert np.isfinite(value).all()
        np.testing.assert_allclose(value, want, rtol=2e-6, atol=1e-6)


def test_head_keeps_only_what_leads_to_the_target_output() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["logits"]),
            helper.make_node("Neg", ["x"], ["other"]),
        ],
        "two outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 3, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 2, 3, 3]),
            helper.make_tensor_value_info("other", TensorProto.FLOAT, [None, 2, 3, 3]),
        ],
        [numpy_helper.from_array(np.zeros(1, np.float32), "unused")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    spec = ScoreHeadSpec("logits", TensorProto.FLOAT, 4, 1, "none")
    headed = append_score_head(model, spec)
    assert "Neg" not in {node.op_type for node in headed.graph.node}
    assert [o.name for o in headed.graph.output] == list(spec.outputs)
    assert len(model.graph.node) == 2  # the input model is untouched


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d", "unet2d_nhwc", "unet2d_fp16"])
@pytest.mark.parametrize("method", ["kwc", "scorecam"])
def test_in_graph_and_host_reductions_give_the_same_explanation(name: str, method: str) -> None:
    x = fixture(name).input(0)
    in_graph = Explainer(fixture(name).path, provider="cpu").explain(x, method)
    on_host = Explainer(fixture(name).path, provider="cpu", reduce_in_graph=False).explain(
        x, method
    )
    tolerance = 1e-3 if fixture(name).is_fp16 else 1e-5
    np.testing.assert_allclose(in_graph.map, on_host.map, atol=tolerance)
    for a, b in zip(in_graph.layers, on_host.layers, strict=True):
        for term in a.terms:
            scale = max(np.abs(b.terms[term]).max(), 1e-12)
            np.testing.assert_allclose(a.terms[term], b.terms[term], atol=tolerance * scale)


def test_nodes_feeding_a_subgraph_body_are_kept() -> None:
    """An If whose branches read an outer tensor: that tensor's producer must stay."""
    branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["branch_out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, None)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Neg", ["x"], ["outer"]),
            helper.make_node(
                "Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True), "flag")
            ),
            helper.make_node("If", ["flag"], ["logits"], then_branch=branch, else_branch=branch),
        ],
        "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 3, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    spec = ScoreHeadSpec("logits", TensorProto.FLOAT, 4, 1, "none")
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    base, region = np.zeros((3, 3), np.float32), np.ones((3, 3), np.float32)
    _, _, score = run_reference(
        append_score_head(model, spec), {"x": x, **spec.feeds(base, region, 1)}
    )
    np.testing.assert_allclose(score, -x[:, 1].reshape(3, -1).sum(1), rtol=1e-5)


def test_the_head_prefix_avoids_names_the_model_already_uses() -> None:
    assert unused_prefix(frozenset({"x", "y"})) == "segattr_head"
    assert unused_prefix(frozenset({"segattr_head.probability"})) == "segattr_head2"
    assert unused_prefix(frozenset({"segattr_head.a", "segattr_head2"})) == "segattr_head3"


@pytest.mark.parametrize("opset", [11, 17])
def test_the_differentiable_target_score_is_a_stable_softmax_sum(opset: int) -> None:
    """T = Σ_R softmax_c, even for logits so large that exp overflows (a NaN gradient
    otherwise): Softmax op, with the class axis moved last where opset < 13 needs it."""
    from segattr_onnx.graph.heads import append_target_score

    spec = ScoreHeadSpec("logits", TensorProto.FLOAT, 4, 1, "softmax")
    model, score = append_target_score(_logit_model(opset, False, 3), spec)
    logits = np.random.default_rng(0).normal(0, 200, (2, 3, 4, 5)).astype(np.float32)
    region = np.ones((4, 5), np.float32)
    feeds = {
        "x": logits,
        spec.region_input: region.reshape(spec.feed_shape((4, 5))),
        spec.class_input: np.array([2], np.int64),
    }
    outputs = [o.name for o in model.graph.output]
    total = run_reference(model, feeds)[outputs.index(score)]
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    expected = (np.exp(shifted[:, 2]) / np.exp(shifted).sum(axis=1)).reshape(2, -1).sum(1)
    assert np.all(np.isfinite(total))
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-6)


def _softmax_model(opset: int, axis: int, extra_reader: bool) -> onnx.ModelProto:
    """Logits → Softmax(axis) as the output; optionally another output reads the softmax too."""
    nodes = [helper.make_node("Softmax", ["x"], ["probabilities"], axis=axis)]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3, 4, 5])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["probabilities"], ["negated"]))
        outputs.append(helper.make_tensor_value_info("negated", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 5])],
        outputs,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize(
    ("opset", "axis", "extra_reader", "bypassed"),
    [
        (13, 1, False, True),  # the class axis: Softmax dropped, logits read directly
        (17, -3, False, True),  # the same axis, counted from the end
        (13, 1, True, False),  # another node reads the probabilities: keep the Softmax
        (11, 1, False, False),  # opset < 13 normalises over axes 1..3 together: not per class
        (13, 2, False, False),  # a Softmax over another axis is not the class activation
    ],
)
def test_a_final_class_softmax_is_replaced_by_the_class_only_form(
    opset: int, axis: int, extra_reader: bool, bypassed: bool
) -> None:
    rng = np.random.default_rng(7)
    model = _softmax_model(opset, axis, extra_reader)
    spec = ScoreHeadSpec("probabilities", TensorProto.FLOAT, 4, 1, "none")
    headed = append_score_head(model, spec)
    ops = [node.op_type for node in headed.graph.node]
    assert ("Softmax" not in ops) is bypassed
    logits = rng.normal(0, 4, (6, 3, 4, 5)).astype(np.float32)
    base = rng.uniform(0, 1, (4, 5)).astype(np.float32)
    region = (rng.uniform(0, 1, (4, 5)) > 0.3).astype(np.float32)
    probabilities = run_reference(model, {"x": logits})[0]
    lost, kept, score = run_reference(headed, {"x": logits, **spec.feeds(base, region, 2)})
    expected = _host_sums(probabilities, base, region, 1, 2, "none")
    for got, want in zip((lost, kept, score), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)

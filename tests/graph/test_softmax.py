"""Softmax over the class axis, rewritten as reductions, against softmax written out."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from segattr_onnx.graph.softmax import softmax_as_reductions


def _softmax_model(opset: int, axis: int, elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["logits"], ["probabilities"], axis=axis, name="head")],
        "softmax",
        [helper.make_tensor_value_info("logits", elem_type, ["n", 3, 5, 7])],
        [helper.make_tensor_value_info("probabilities", elem_type, ["n", 3, 5, 7])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"logits": x})[0]


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("axis", [1, -3])
def test_rewritten_softmax_equals_the_formula(opset: int, axis: int) -> None:
    model = _softmax_model(opset, axis)
    rewritten = softmax_as_reductions(model)
    assert "Softmax" not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten, full_check=True)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 5, 7)) * 30).astype(np.float32)
    x[0, :, 0, 0] = [900.0, 899.0, -900.0]  # exp would overflow without the max taken first
    shifted = x.astype(np.float64) - x.max(axis=1, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    got = _run(rewritten, x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, _run(model, x), rtol=1e-6, atol=1e-7)
    assert model.graph.node[0].op_type == "Softmax"  # the input model is left as it was


@pytest.mark.parametrize(
    ("opset", "axis", "elem_type"),
    [
        (12, 1, TensorProto.FLOAT),  # before 13, Softmax flattens every axis from `axis` on
        (17, -1, TensorProto.FLOAT),  # already the last axis: ORT's kernel needs no transpose
        (17, 1, TensorProto.FLOAT16),
    ],
)
def test_softmax_left_alone_where_the_rewrite_would_change_or_gain_nothing(
    opset: int, axis: int, elem_type: int
) -> None:
    model = _softmax_model(opset, axis, elem_type)
    assert softmax_as_reductions(model) is model

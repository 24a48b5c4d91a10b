"""A narrow 1×1 head after a normalisation runs as a MatMul on the CPU, with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.graph.narrow_pointwise import MAX_CLASSES, pointwise_as_matmul

RNG = np.random.default_rng(7)


def _model(
    classes: int = 2,
    channels: int = 16,
    before: tuple[str, ...] = ("InstanceNormalization", "Relu"),
    kernel: int = 1,
    bias: bool = True,
    spatial: int = 2,
    opset: int = 17,
    **conv_attributes,
) -> onnx.ModelProto:
    """x (symbolic batch and size) → ``before`` → Conv to ``classes`` channels."""
    nodes, tensor = [], "x"
    initializers = [
        numpy_helper.from_array(
            RNG.standard_normal((channels, channels, *([3] * spatial))).astype(np.float32), "w3"
        ),
        numpy_helper.from_array(RNG.uniform(0.5, 2, channels).astype(np.float32), "gamma"),
        numpy_helper.from_array(RNG.standard_normal(channels).astype(np.float32), "beta"),
    ]
    for position, op in enumerate(before):
        out = f"t{position}"
        if op == "InstanceNormalization":
            nodes.append(helper.make_node(op, [tensor, "gamma", "beta"], [out]))
        elif op == "Conv":
            nodes.append(helper.make_node(op, [tensor, "w3"], [out], pads=[1] * 2 * spatial))
        else:
            nodes.append(helper.make_node(op, [tensor], [out]))
        tensor = out
    weight = RNG.standard_normal((classes, channels, *([kernel] * spatial))).astype(np.float32)
    initializers.append(numpy_helper.from_array(weight, "head.weight"))
    inputs = [tensor, "head.weight"]
    if bias:
        initializers.append(
            numpy_helper.from_array(RNG.standard_normal(classes).astype(np.float32), "head.bias")
        )
        inputs.append("head.bias")
    nodes.append(helper.make_node("Conv", inputs, ["logits"], name="head", **conv_attributes))
    dims = ["batch", channels, *[f"s{i}" for i in range(spatial)]]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes, *dims[2:]])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("classes", [1, 2, MAX_CLASSES])
@pytest.mark.parametrize("bias", [True, False])
def test_a_head_after_instance_norm_becomes_a_matmul_with_the_same_logits(classes, bias) -> None:
    model = _model(classes=classes, bias=bias)
    before = model.SerializeToString()
    rewritten = pointwise_as_matmul(model)
    assert model.SerializeToString() == before  # the caller's model is left as it was
    assert "MatMul" in _ops(rewritten) and _ops(rewritten).count("Conv") == 0
    names = {t.name for t in rewritten.graph.initializer}
    assert "head.weight" not in names and "head.bias" not in names  # unread, dropped
    onnx.checker.check_model(rewritten, full_check=True)
    # Another batch and size than any traced: the output shape is read off the input.
    for shape in [(1, 16, 32, 32), (3, 16, 20, 12)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        expected, got = _run(model, x), _run(rewritten, x)
        assert got.shape == expected.shape == (shape[0], classes, *shape[2:])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_volume_head_is_rewritten_too() -> None:
    model = _model(classes=3, spatial=3, before=("InstanceNormalization", "LeakyRelu"))
    rewritten = pointwise_as_matmul(model)
    assert "MatMul" in _ops(rewritten)
    x = RNG.standard_normal((2, 16, 6, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(_model(before=("Conv", "Relu")), id="after-a-conv"),  # NCHWc all along
        pytest.param(_model(before=("Relu",)), id="after-a-graph-input"),
        pytest.param(_model(classes=MAX_CLASSES + 1), id="wide"),
        pytest.param(_model(kernel=3, pads=[1, 1, 1, 1]), id="3x3"),
        pytest.param(_model(strides=[2, 2]), id="strided"),
        pytest.param(_model(pads=[1, 1, 1, 1]), id="padded"),
        pytest.param(_model(opset=11), id="old-opset"),
    ],
)
def test_other_convolutions_are_left_alone(model: onnx.ModelProto) -> None:
    assert pointwise_as_matmul(model) is model


def test_a_grouped_head_is_left_alone() -> None:
    model = _model(classes=4, channels=16)
    grouped = onnx.ModelProto()
    grouped.CopyFrom(model)
    head = grouped.graph.node[-1]
    head.attribute.append(helper.make_attribute("group", 2))
    weight = next(t for t in grouped.graph.initializer if t.name == "head.weight")
    weight.CopyFrom(
        numpy_helper.from_array(RNG.standard_normal((4, 8, 1, 1)).astype(np.float32), weight.name)
    )
    assert pointwise_as_matmul(grouped) is grouped

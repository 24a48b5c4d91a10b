"""Graph patterns the fixtures do not cover, each checked against a weight-edited reference or
the full re-run (found in review; each test failed before its fix)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.errors import GraphRewriteError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.graph.rewrite import insert_ablation
from segattr_onnx.runtime.ablation import AblationRunner
from tests.conftest import assert_close, run_reference

RNG = np.random.default_rng(0)
X = RNG.standard_normal((1, 1, 8, 8)).astype(np.float32)
KWC_MASKS = np.concatenate([1 - np.eye(4), np.eye(4)])


def _weight(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, initializers, outputs=("y",), opset=17, ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "edge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _zero_kernel(model: onnx.ModelProto, weight: str, k: int) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for tensor in edited.graph.initializer:
        if tensor.name == weight:
            values = numpy_helper.to_array(tensor).copy()
            values[k] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, weight))
    return edited


def _outputs(runner, layer, masks, use_suffix, name="y"):
    return np.concatenate(
        [c.outputs[name] for c in runner.ablate(X, layer, masks, use_suffix=use_suffix)]
    )


@pytest.mark.parametrize("use_suffix", [False, True])
def test_conv_that_is_a_graph_output_and_feeds_more_layers(use_suffix: bool) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="enc"),
        helper.make_node("Conv", ["a", "w2"], ["feat"], pads=[1] * 4, name="mid"),
        helper.make_node("Conv", ["feat", "w3"], ["y"], name="head"),
    ]
    inits = [_weight("w1", (4, 1, 3, 3)), _weight("w2", (4, 4, 3, 3)), _weight("w3", (2, 4, 1, 1))]
    model = _model(nodes, inits, outputs=("y", "feat"))
    runner = AblationRunner(analyse_model(model), provider="cpu")
    masks = np.ones((1, 4))
    masks[0, 2] = 0
    ref_y, ref_feat = run_reference(_zero_kernel(model, "w2", 2), {"x": X})
    assert_close(_outputs(runner, "mid", masks, use_suffix, "feat"), ref_feat, 1e-6)
    assert_close(_outputs(runner, "mid", masks, use_suffix, "y"), ref_y, 1e-6)


def test_skip_tensor_whose_batch_symbol_was_lost_is_still_broadcast() -> None:
    """onnx names the batch 'unk__0' after a Resize with computed sizes; it is still the batch."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="enc"),
        helper.make_node("Shape", ["a"], ["sa"]),
        helper.make_node("Slice", ["sa", "zero", "two"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw"], ["sz"], axis=0),
        helper.make_node("Resize", ["a", "", "", "sz"], ["skip"], mode="nearest"),
        helper.make_node("Conv", ["skip", "w2"], ["b"], pads=[1] * 4, strides=[2, 2], name="down"),
        helper.make_node("Shape", ["skip"], ["ss"]),
        helper.make_node("Resize", ["b", "", "", "ss"], ["u"], mode="nearest"),
        helper.make_node("Concat", ["u", "skip"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w3"], ["y"], name="head"),
    ]
    inits = [
        _weight("w1", (4, 1, 3, 3)),
        _weight("w2", (4, 4, 3, 3)),
        _weight("w3", (2, 8, 1, 1)),
        _ints("zero", [0]),
        _ints("two", [2]),
        _ints("hw", [8, 8]),
    ]
    analysis = analyse_model(_model(nodes, inits))
    assert not isinstance(analysis.tensors["skip"].shape[0], int)
    runner = AblationRunner(analysis, provider="cpu")
    assert "skip" in runner.ablated("down").suffix.expanded_inputs
    full = _outputs(runner, "down", KWC_MASKS, use_suffix=False)
    assert_close(_outputs(runner, "down", KWC_MASKS, use_suffix=True), full, 1e-6)


def test_node_pulled_in_for_its_indices_is_not_also_fed() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="enc"),
        helper.make_node("MaxPool", ["a"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["b"], pads=[1] * 4, name="mid"),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("MaxUnpool", ["br", "idx"], ["u"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["br", "p"], ["s"]),
        helper.make_node("Resize", ["s", "", "scales"], ["su"], mode="nearest"),
        helper.make_node("Add", ["u", "su"], ["v"]),
        helper.make_node("Conv", ["v", "w3"], ["y"], pads=[1] * 4, name="head"),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    inits = [_weight("w1", (4, 1, 3, 3)), _weight("w2", (4, 4, 3, 3)), _weight("w3", (2, 4, 3, 3))]
    runner = AblationRunner(analyse_model(_model(nodes, [*inits, scales])), provider="cpu")
    assert "p" not in runner.ablated("mid").suffix.boundary_inputs
    full = _outputs(runner, "mid", KWC_MASKS, use_suffix=False)
    assert_close(_outputs(runner, "mid", KWC_MASKS, use_suffix=True), full, 1e-6)


def test_suffix_on_an_opset_9_model() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="enc"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "w2"], ["b"], pads=[1] * 4, strides=[2, 2], name="down"),
        helper.make_node("Upsample", ["b", "scales"], ["u"], mode="nearest"),
        helper.make_node("Concat", ["u", "ar"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w3"], ["y"], name="head"),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    inits = [_weight("w1", (4, 1, 3, 3)), _weight("w2", (4, 4, 3, 3)), _weight("w3", (2, 8, 1, 1))]
    runner = AblationRunner(
        analyse_model(_model(nodes, [*inits, scales], opset=9, ir_version=4)), provider="cpu"
    )
    full = _outputs(runner, "down", KWC_MASKS, use_suffix=False)
    assert_close(_outputs(runner, "down", KWC_MASKS, use_suffix=True), full, 1e-6)


def test_layer_read_inside_an_if_branch_is_refused() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["b"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4, name="enc"),
        helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1] * 4, name="mid"),
        helper.make_node("If", ["cond"], ["u"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Conv", ["u", "w3"], ["y"], name="head"),
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    inits = [_weight("w1", (4, 1, 3, 3)), _weight("w2", (4, 4, 3, 3)), _weight("w3", (2, 4, 1, 1))]
    analysis = analyse_model(_model(nodes, [*inits, cond]))
    with pytest.raises(GraphRewriteError, match="If/Loop/Scan"):
        insert_ablation(analysis, "mid")


def test_quantised_block_output_without_dequantize_is_refused() -> None:
    def const(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    weights = numpy_helper.from_array(RNG.integers(0, 255, (4, 1, 3, 3)).astype(np.uint8), "wq")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node(
            "QLinearConv",
            ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"],
            ["yq"],
            pads=[1] * 4,
            name="qconv",
        ),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    inits = [
        const("xs", 0.05, np.float32),
        const("xz", 128, np.uint8),
        weights,
        const("ws", 0.01, np.float32),
        const("wz", 128, np.uint8),
        const("ys", 0.1, np.float32),
        const("yz", 100, np.uint8),
    ]
    analysis = analyse_model(_model(nodes, inits))
    assert analysis.layer("qconv").kernels == 4
    with pytest.raises(GraphRewriteError, match="quantised"):
        insert_ablation(analysis, "qconv")


def test_analysis_never_writes_into_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """ORT's symbolic inference saves a temp model into the CWD when it gives up; we must not."""
    monkeypatch.chdir(tmp_path)
    fused = {"domain": "com.microsoft", "activation": "Relu", "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("FusedConv", ["x", "w1"], ["a"], name="stem", **fused),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("w1", (4, 1, 3, 3)), _weight("w2", (2, 4, 1, 1))],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    analysis = analyse_model(model)
    assert analysis.layer("stem").spatial_shape == (8, 8)
    assert os.listdir(tmp_path) == []

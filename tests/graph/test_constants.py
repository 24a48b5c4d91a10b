"""Constant folding: chains computed from constants become initializers, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.graph.backward import add_vjp
from segattr_onnx.graph.constants import fold_constants
from segattr_onnx.graph.shapes import infer_tensor_infos
from tests.conftest import fixture, run_reference


def _padded_to_skip_model() -> onnx.ModelProto:
    """F.pad-to-skip as PyTorch exports it: the pads come from a chain of ops on constants."""
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["four"],
            ["zeros"],
            value=numpy_helper.from_array(np.zeros(1, np.int64), "v"),
        ),
        helper.make_node("Concat", ["zeros", "amounts"], ["pads_long"], axis=0),
        helper.make_node("Reshape", ["pads_long", "grid"], ["pads_grid"]),
        helper.make_node("Transpose", ["pads_grid"], ["pads_t"], perm=[1, 0]),
        helper.make_node("Reshape", ["pads_t", "flat"], ["pads_i"]),
        helper.make_node("Cast", ["pads_i"], ["pads"], to=TensorProto.INT64),
        helper.make_node("Pad", ["x", "pads"], ["padded"]),
        helper.make_node("Concat", ["padded", "skip"], ["joined"], axis=1),
        helper.make_node("Mul", ["joined", "joined"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([4], np.int64), "four"),
        numpy_helper.from_array(np.array([1, 0, 0, 1], np.int64), "amounts"),  # H before, W after
        numpy_helper.from_array(np.array([4, 2], np.int64), "grid"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "pad_to_skip",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3]),
            helper.make_tensor_value_info("skip", TensorProto.FLOAT, [1, 2, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_folding_keeps_the_outputs_and_leaves_no_constant_chain() -> None:
    model = _padded_to_skip_model()
    folded = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Pad", "Concat", "Mul"]
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32),
        "skip": rng.standard_normal((1, 2, 4, 4)).astype(np.float32),
    }
    np.testing.assert_array_equal(run_reference(folded, feeds)[0], run_reference(model, feeds)[0])
    assert len(model.graph.node) == 9  # the input model is untouched


def test_a_pad_fed_by_a_constant_chain_is_differentiable_after_folding() -> None:
    folded = fold_constants(_padded_to_skip_model())
    infos = infer_tensor_infos(folded, {"x": (1, 2, 3, 3), "skip": (1, 2, 4, 4)}, False)
    assert infos["padded"].shape == (1, 2, 4, 4)
    folded.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, None))
    backward, grads = add_vjp(folded, infos, {"y": "seed"}, ["x"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    skip = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    seed = np.ones((1, 4, 4, 4), np.float32)
    outputs = [o.name for o in backward.graph.output]
    gradient = run_reference(backward, {"x": x, "skip": skip, "seed": seed})[
        outputs.index(grads["x"])
    ]
    np.testing.assert_allclose(gradient, 2 * x, rtol=1e-6)  # d(Σ y)/dx = 2x where x lands


def test_models_without_constant_chains_come_back_unchanged() -> None:
    model = onnx.load(str(fixture("unet2d_torchscript").path))
    assert fold_constants(model) is model


def test_quantised_weights_stay_quantised() -> None:
    """Folding DequantizeLinear of int8 weights would stop runtimes fusing integer kernels, so
    the rewritten model would compute differently from the original."""
    model = fixture("unet2d_qdq").load_with_weights()
    folded = fold_constants(model)
    count = [n.op_type for n in model.graph.node].count("DequantizeLinear")
    assert [n.op_type for n in folded.graph.node].count("DequantizeLinear") == count

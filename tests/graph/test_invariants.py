"""Hoisting what no varying input reaches: the two parts compute what the whole graph did."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from segattr_onnx.graph.invariants import hoist_invariants

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _skip_like_model():
    """rows x (N, 4) and a shared s (1, 4): out = Relu(x·w + (s·v + c)), where s·v + c is the
    same for every row and c comes from a Constant node both parts need."""
    w = numpy_helper.from_array(np.arange(1, 5, dtype=np.float32), "w")
    v = numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "v")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(0.5))),
        helper.make_node("Mul", ["s", "v"], ["sv"]),
        helper.make_node("Add", ["sv", "c"], ["shared_part"]),
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "shared_part"], ["sum"]),
        helper.make_node("Add", ["sum", "c"], ["sum_c"]),
        helper.make_node("Relu", ["sum_c"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", F, ["rows", 4]),
        helper.make_tensor_value_info("s", F, [1, 4]),
    ]
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", F, ["rows", 4])], [w, v])


def test_the_two_parts_compute_what_the_whole_graph_computes() -> None:
    model = _skip_like_model()
    hoisted = hoist_invariants(model, {"x"})
    assert hoisted is not None
    assert hoisted.frontier == ("shared_part",)
    assert hoisted.invariant_inputs == ("s",)
    assert [n.op_type for n in hoisted.invariant.graph.node] == ["Constant", "Mul", "Add"]
    # The varying part keeps the Constant it reads itself, and never the shared input.
    assert {n.op_type for n in hoisted.varying.graph.node} == {"Constant", "Mul", "Add", "Relu"}
    assert "s" not in {i.name for i in hoisted.varying.graph.input}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    s = rng.standard_normal((1, 4)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model).run(None, {"x": x, "s": s})
    (shared,) = ReferenceEvaluator(hoisted.invariant).run(None, {"s": s})
    (got,) = ReferenceEvaluator(hoisted.varying).run(None, {"x": x, "shared_part": shared})
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", ["nothing invariant", "random", "invariant output", "subgraph"])
def test_graphs_that_cannot_be_split_safely_are_left_whole(case: str) -> None:
    model = _skip_like_model()
    graph = model.graph
    if case == "nothing invariant":
        model = _skip_like_model()
        assert hoist_invariants(model, {"x", "s"}) is None
        return
    if case == "random":  # sampled once would not be sampled per run
        graph.node.insert(0, helper.make_node("RandomNormalLike", ["s"], ["noise"]))
        graph.node[2].input[1] = "noise"  # Mul(s, noise)
    elif case == "invariant output":
        graph.output.append(helper.make_tensor_value_info("shared_part", F, [1, 4]))
    elif case == "subgraph":
        branch = helper.make_graph(
            [helper.make_node("Identity", ["s"], ["b"])],
            "branch",
            [],
            [helper.make_tensor_value_info("b", F, [1, 4])],
        )
        graph.node.append(
            helper.make_node("If", ["flag"], ["chosen"], then_branch=branch, else_branch=branch)
        )
    assert hoist_invariants(model, {"x"}) is None

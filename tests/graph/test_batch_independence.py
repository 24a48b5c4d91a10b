"""Proving from the graph that a model keeps the cases of a batch apart: never for a model that
mixes them (checked against the run itself on every fixture and family the proof accepts),
and not for graphs whose operators, attributes or constants could reach the batch axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx import Explainer
from segattr_onnx.graph.batch_independence import provably_keeps_cases_apart
from segattr_onnx.runtime import batch_check
from segattr_onnx.runtime.batch_check import keeps_cases_apart
from segattr_onnx.runtime.sessions import SessionCache
from tests.builders import build

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _fixture_models() -> list[tuple[str, Path, list[int]]]:
    found = []
    for folder in ("models", "families"):
        manifest = json.loads((FIXTURES / folder / "manifest.json").read_text())
        for name, spec in manifest.get("fixtures", manifest).items():
            path = FIXTURES / folder / spec.get("file", f"{name}.onnx")
            found.append((name, path, spec["test_shape"]))
    return found


def _proven(model: onnx.ModelProto) -> bool:
    data = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    rank = len(data[0].type.tensor_type.shape.dim)
    return provably_keeps_cases_apart(model, data[0].name, rank)


@pytest.mark.parametrize(("name", "path", "shape"), _fixture_models(), ids=lambda v: str(v))
def test_a_proof_never_contradicts_the_run(name: str, path: Path, shape: list[int]) -> None:
    model = onnx.load(str(path), load_external_data=False)
    if not _proven(model):
        return  # not proven: the run decides, as before
    explainer = Explainer(path, provider="cpu")
    analysis = explainer.analysis(tuple(shape))
    if not analysis.input.dynamic_batch:
        return  # a fixed batch of 1: batches are never tried
    assert keeps_cases_apart(analysis, SessionCache("cpu", analysis.model.external_data_dir), 0)


def test_the_common_exports_are_proven() -> None:
    proven = {name for name, path, _ in _fixture_models() if _proven(onnx.load(str(path)))}
    assert {"unet2d_torchscript", "unet3d", "unet2d_nhwc", "dynunet3d"} <= proven


@pytest.mark.parametrize("softmax", ["hard-coded", "per-case"])
def test_reshapes_are_left_to_the_run(softmax: str) -> None:
    assert not _proven(build(token_softmax=softmax))
    assert not _proven(build(hard_batch=True, batch="n"))
    assert _proven(build())


def _graph(nodes, initializers=(), rank=4, opset=17) -> onnx.ModelProto:
    shape = ["n", 3, 4, 4][:rank]
    return helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            list(initializers),
        ),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8,
    )


def _constant(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _node(op: str, inputs, **attributes) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), ["y"], **attributes)


PROVEN = {
    "add a per-channel constant": _graph(
        [_node("Add", ["x", "c"])], [_constant("c", (1, 3, 1, 1))]
    ),
    "add a trailing constant": _graph([_node("Add", ["x", "c"])], [_constant("c", (4,))]),
    "channel-last transpose": _graph([_node("Transpose", ["x"], perm=[0, 2, 3, 1])]),
    "softmax over channels": _graph([_node("Softmax", ["x"], axis=1)]),
    "layer norm over channels": _graph(
        [_node("LayerNormalization", ["x", "s"], axis=1)], [_constant("s", (3, 4, 4))]
    ),
    "inference batch norm": _graph(
        [_node("BatchNormalization", ["x", "s", "b", "m", "v"])],
        [_constant(n, (3,)) for n in "sbmv"],
    ),
    "resize by 1x1x2x2": _graph(
        [_node("Resize", ["x", "", "scales"], mode="nearest")],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    ),
}

NOT_PROVEN = {
    "add a constant with a batch of 2": _graph(
        [_node("Add", ["x", "c"])], [_constant("c", (2, 3, 1, 1))]
    ),
    "concat along the batch": _graph([_node("Concat", ["x", "x"], axis=0)]),
    "concat with a constant": _graph(
        [_node("Concat", ["x", "c"], axis=1)], [_constant("c", (1, 3, 4, 4))]
    ),
    "softmax over the batch": _graph([_node("Softmax", ["x"], axis=0)]),
    "old softmax over the batch": _graph([_node("Softmax", ["x"], axis=0)], opset=11),
    "layer norm over everything": _graph(
        [_node("LayerNormalization", ["x", "s"], axis=0)], [_constant("s", (2, 3, 4, 4))]
    ),
    "training batch norm": _graph(
        [_node("BatchNormalization", ["x", "s", "b", "m", "v"], training_mode=1)],
        [_constant(n, (3,)) for n in "sbmv"],
    ),
    "weights computed from the input": _graph([_node("Conv", ["x", "x"])]),
    "transpose moving the batch": _graph([_node("Transpose", ["x"], perm=[1, 0, 2, 3])]),
    "resize to fixed sizes": _graph(
        [_node("Resize", ["x", "", "", "sizes"], mode="nearest")],
        [numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "sizes")],
    ),
    "resize the batch": _graph(
        [_node("Resize", ["x", "", "scales"], mode="nearest")],
        [numpy_helper.from_array(np.array([2, 1, 1, 1], np.float32), "scales")],
    ),
    "max pool indices": helper.make_model(
        helper.make_graph(
            [helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
            [
                helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("i", TensorProto.INT64, None),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    ),
    "reduce over every axis": _graph([_node("ReduceMean", ["x"])]),
    "nodes listed out of order": _graph(  # the Concat along the batch comes first
        [
            helper.make_node("Concat", ["t", "t"], ["y"], axis=0),
            helper.make_node("Relu", ["x"], ["t"]),
        ]
    ),
    "a branch whose body reads the input": _graph(
        [
            helper.make_node(
                "If",
                ["flag"],
                ["y"],
                then_branch=helper.make_graph(
                    [helper.make_node("Concat", ["x", "x"], ["z"], axis=0)],
                    "then",
                    [],
                    [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                ),
                else_branch=helper.make_graph(
                    [helper.make_node("Identity", ["x"], ["z"])],
                    "else",
                    [],
                    [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                ),
            )
        ],
        [numpy_helper.from_array(np.array(True), "flag")],
    ),
    "another domain's operator": _graph(
        [helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft")],
        [_constant("w", (3, 3, 1, 1))],
    ),
}


@pytest.mark.parametrize("case", sorted(PROVEN))
def test_operators_that_keep_each_case_alone_are_proven(case: str) -> None:
    assert _proven(PROVEN[case]), case


@pytest.mark.parametrize("case", sorted(NOT_PROVEN))
def test_anything_that_could_reach_the_batch_axis_is_not(case: str) -> None:
    assert not _proven(NOT_PROVEN[case]), case


def test_a_proven_model_explains_without_the_check_runs(monkeypatch, counted) -> None:
    """The proof replaces the three passes; the explanation is the same as with them."""
    case = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    proven = Explainer(build(), provider="cpu").explain(case, method="kwc")
    assert counted == []
    monkeypatch.setattr(batch_check, "provably_keeps_cases_apart", lambda *_: False)
    checked = Explainer(build(), provider="cpu").explain(case, method="kwc")
    assert counted == [True]
    np.testing.assert_array_equal(proven.map, checked.map)

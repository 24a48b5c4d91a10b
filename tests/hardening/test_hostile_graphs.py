"""Hostile graphs end in one ``ModelFileError``, never a crash, a traceback or a runaway.

A model-local function that calls itself, directly or through another, kills ONNX Runtime
(SIGSEGV) and is refused before onnx's inliner or ORT sees it; calls nested in calls would
inline into millions of nodes; and a graph output that declares a shape the graph does not
compute is named as such instead of failing later inside a rewritten graph.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.cli import main
from segattr_onnx.errors import InputShapeError, ModelFileError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.graph.loading import from_proto, load_model
from segattr_onnx.graph.validation import INLINED_NODE_LIMIT

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    values = np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _model_calling(
    functions: list[onnx.FunctionProto], called: str = "F", calls: int = 1
) -> onnx.ModelProto:
    """A conv, then ``calls`` chained calls of local function ``called`` (x -> x)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], pads=[1, 1, 1, 1], name="conv")]
    for i in range(calls):
        nodes.append(helper.make_node(called, [f"t{i}"], [f"t{i + 1}"], domain="local"))
    nodes.append(helper.make_node("Identity", [f"t{calls}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "calls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [_weight("w", (2, 1, 3, 3))],
    )
    return helper.make_model(graph, opset_imports=OPSETS, functions=functions, ir_version=8)


def _function(name: str, nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    return helper.make_function("local", name, ["x"], ["y"], nodes, OPSETS)


def _call(name: str, source: str = "x", out: str = "y") -> onnx.NodeProto:
    return helper.make_node(name, [source], [out], domain="local")


def _recursive_through_if() -> list[onnx.FunctionProto]:
    """F calls G; G calls F again, hidden in the else-branch of an If."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["r"])],
        "then",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [_call("F", "x", "r")],
        "else",
        [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
    )
    condition = helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "c")
    )
    choose = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)
    return [_function("F", [_call("G")]), _function("G", [condition, choose])]


RECURSIVE = {
    "direct": ([_function("F", [_call("F")])], "local::F -> local::F"),
    "mutual": (
        [_function("F", [_call("G")]), _function("G", [_call("H")]), _function("H", [_call("F")])],
        "local::F -> local::G -> local::H -> local::F",
    ),
    "through-if": (_recursive_through_if(), "local::F -> local::G -> local::F"),
    "behind-a-sound-one": (
        [_function("A", [_call("B")]), _function("B", [_call("B", "x", "y")])],
        "local::B -> local::B",
    ),
}


@pytest.mark.parametrize("case", RECURSIVE)
def test_recursive_functions_are_refused_naming_the_cycle(case: str) -> None:
    functions, cycle = RECURSIVE[case]
    called = "A" if case == "behind-a-sound-one" else "F"
    with pytest.raises(ModelFileError, match="calls itself") as caught:
        from_proto(_model_calling(functions, called))
    assert cycle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_recursive_model_file_is_one_error_line_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "recursive.onnx"
    path.write_bytes(_model_calling(RECURSIVE["mutual"][0]).SerializeToString())
    with pytest.raises(ModelFileError, match="recursive functions cannot be inlined"):
        load_model(path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--provider", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "calls itself" in lines[0]


def test_calls_nested_in_calls_are_refused_before_inlining() -> None:
    """F0 is one Relu; each F(k+1) calls Fk twice: F24 inlines into 2**24 nodes."""
    functions = [_function("F0", [helper.make_node("Relu", ["x"], ["y"])])]
    for k in range(24):
        functions.append(_function(f"F{k + 1}", [_call(f"F{k}", "x", "m"), _call(f"F{k}", "m")]))
    started = time.perf_counter()
    with pytest.raises(ModelFileError, match=f"more than {INLINED_NODE_LIMIT:,} nodes"):
        from_proto(_model_calling(functions, "F24"))
    assert time.perf_counter() - started < 1.0


def test_functions_defined_twice_are_refused() -> None:
    twice = [_function("F", [helper.make_node("Relu", ["x"], ["y"])])] * 2
    with pytest.raises(ModelFileError, match="local::F more than once"):
        from_proto(_model_calling(twice))


def test_sound_functions_still_inline_and_their_convolutions_are_found() -> None:
    """A function called from two places, holding a conv: no recursion, so it loads."""
    conv = helper.make_node("Conv", ["x", "fw"], ["y"], pads=[1, 1, 1, 1], name="inner")
    weight = helper.make_node("Constant", [], ["fw"], value=_weight("fw", (2, 2, 3, 3), seed=1))
    relu = _function("R", [helper.make_node("Relu", ["x"], ["y"])])
    block = _function(
        "B", [weight, conv, _call("R", "y", "z"), helper.make_node("Identity", ["z"], ["y2"])]
    )
    block.output[:] = ["y2"]
    model = _model_calling([relu, block], "B", calls=2)
    loaded = from_proto(model)
    assert not loaded.proto.functions
    assert [n.op_type for n in loaded.proto.graph.node].count("Conv") == 3
    analysis = analyse_model(loaded)
    assert len(analysis.layers) == 3
    assert analysis.outputs[0].shape == (1, 2, 8, 8)


# ------------------------------------------------------------------ outputs that lie
def _encoder(declared: list, input_dims: list | None = None) -> onnx.ModelProto:
    """Conv, strided conv (halving 32 to 16), 1x1 head: computes 1x2x16x16."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="enc"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node(
            "Conv", ["ar", "w2"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2], name="down"
        ),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("Conv", ["br", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "liar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims or [1, 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)],
        [_weight("w1", (4, 1, 3, 3)), _weight("w2", (4, 4, 3, 3)), _weight("w3", (2, 4, 1, 1))],
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1], ir_version=8)


LIES = {
    "spatial": ([1, 2, 32, 32], "declared 1x2x32x32 but the graph computes 1x2x16x16"),
    "channels": ([1, 3, 16, 16], "declared 1x3x16x16 but the graph computes 1x2x16x16"),
    "rank": ([1, 2, 16, 16, 1], "declared 1x2x16x16x1 but the graph computes 1x2x16x16"),
    "scalar": ([], "declared a scalar but the graph computes 1x2x16x16"),
}


@pytest.mark.parametrize("lie", LIES)
def test_an_output_that_lies_about_its_shape_is_named(lie: str) -> None:
    declared, message = LIES[lie]
    with pytest.raises(ModelFileError, match="declared output shape is wrong") as caught:
        analyse_model(_encoder(declared))
    assert message in str(caught.value)
    assert "from its 1x1x32x32 input" in str(caught.value)


def test_honest_and_partly_declared_outputs_pass() -> None:
    for declared in ([1, 2, 16, 16], ["n", 2, "h", "w"], [1, 2, None, 16], None):
        analysis = analyse_model(_encoder(declared))
        assert analysis.outputs[0].shape == (1, 2, 16, 16)


def test_at_a_size_the_input_leaves_free_the_computed_shape_wins() -> None:
    """Fixed output sizes with free input dims are an exporter's leftovers, not a lie at the
    size analysed: the analysis uses what the graph computes."""
    model = _encoder([1, 2, 32, 32], input_dims=["n", 1, "h", "w"])
    analysis = analyse_model(model, (1, 1, 32, 32))
    assert analysis.outputs[0].shape[1:] == (2, 16, 16)
    assert analysis.layer("head").spatial_shape == (16, 16)


@pytest.mark.parametrize("command", ["inspect", "explain"])
def test_a_lying_output_is_one_error_line_from_the_cli(tmp_path: Path, command: str) -> None:
    path = tmp_path / "liar.onnx"
    path.write_bytes(_encoder([1, 2, 32, 32]).SerializeToString())
    arguments = ["inspect", str(path), "--provider", "cpu"]
    if command == "explain":
        image = tmp_path / "image.npy"
        np.save(image, np.ones((1, 1, 32, 32), np.float32))
        arguments = ["explain", str(path), str(image), "--out", str(tmp_path / "map.npy")]
        arguments += ["--provider", "cpu", "--quiet", "--method", "scorecam", "--layers", "all"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output 'y' is declared 1x2x32x32")
    assert not (tmp_path / "map.npy").exists()


# ------------------------------------------------------------------ sizes ORT cannot survive
def _single_conv(weight: onnx.TensorProto | None, size: int = 4, **attributes) -> onnx.ModelProto:
    nodes, initializers = [], []
    if weight is None:  # the weight as a Constant node feeding a Cast, as some exporters write
        value = numpy_helper.from_array(np.ones((2, 3, 0, 3), np.float16), "w16")
        nodes += [
            helper.make_node("Constant", [], ["w16"], value=value),
            helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        ]
    else:
        initializers.append(weight)
    nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attributes))
    graph = helper.make_graph(
        nodes,
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1], ir_version=8)


@pytest.mark.parametrize(
    ("weight", "attributes", "shape"),
    [
        (_weight("w", (1, 3, 3, 0)), {"auto_pad": "SAME_UPPER"}, "[1, 3, 3, 0]"),
        (_weight("w", (1, 3, 0, 0)), {}, "[1, 3, 0, 0]"),
        (_weight("w", (0, 3, 3, 3)), {}, "[0, 3, 3, 3]"),
        (None, {}, "[2, 3, 0, 3]"),
    ],
)
def test_an_empty_kernel_is_refused_before_onnx_runtime_loops_on_it(
    weight, attributes: dict, shape: str
) -> None:
    """ONNX Runtime never returns from a Conv whose weight has a spatial size of 0."""
    started = time.perf_counter()
    with pytest.raises(ModelFileError, match="has a weight of shape") as caught:
        analyse_model(_single_conv(weight, **attributes))
    assert shape in str(caught.value) and "'conv'" in str(caught.value)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("size", "attributes", "computed"),
    [
        (2, {}, "1x2x0x0"),  # a 3x3 kernel on a 2x2 input, unpadded
        (4, {"dilations": [2**31, 2**31]}, "1x2x-4294967292x-4294967292"),
    ],
)
def test_a_computed_size_below_one_is_an_input_shape_error(
    size: int, attributes: dict, computed: str
) -> None:
    model = _single_conv(_weight("w", (2, 3, 3, 3)), size=size, **attributes)
    with pytest.raises(InputShapeError, match="a size below 1") as caught:
        analyse_model(model)
    assert f"'y' would be {computed} for a 1x3x{size}x{size} input" in str(caught.value)


def test_the_smallest_input_a_kernel_fits_still_works() -> None:
    analysis = analyse_model(_single_conv(_weight("w", (2, 3, 3, 3)), size=3))
    assert analysis.layers[0].spatial_shape == (1, 1)


def _ranked(input_dims: list, nodes: list[onnx.NodeProto], weights: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "ranks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        weights,
    )
    return helper.make_model(graph, opset_imports=OPSETS[:1], ir_version=8)


RANK_CASES = {
    # onnx's inference (which ORT runs too) gives this ConvTranspose's output only (N, C):
    # its output_shape is smaller than its input. The Conv reading it then aborts ORT's
    # session building (an assertion: the process dies).
    "behind-output-shape": (
        [1, 1, 5, 5],
        [
            helper.make_node("ConvTranspose", ["x", "w0"], ["t0"], output_shape=[1, 1], name="up"),
            helper.make_node("Relu", ["t0"], ["t1"]),
            helper.make_node("Conv", ["t1", "w1"], ["y"], name="conv"),
        ],
        "ConvTranspose node 'up' has a 4-D weight but its output has 2 dims (its output_shape "
        "[1, 1] is smaller than its input)",
    ),
    "declared-input": (
        [1, 1, 5],
        [helper.make_node("ConvTranspose", ["x", "w0"], ["y"], name="up")],
        "ConvTranspose node 'up' takes a 3-D input (1x1x5) but has a 4-D weight",
    ),
}


@pytest.mark.parametrize("case", RANK_CASES)
def test_a_convolution_on_fewer_dims_than_its_weight_is_refused(case: str) -> None:
    dims, nodes, message = RANK_CASES[case]
    weights = [_weight("w0", (1, 1, 1, 1)), _weight("w1", (1, 1, 1, 1))]
    convolutions = [n for n in nodes if n.op_type.startswith("Conv")]
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot run it") as caught:
        analyse_model(_ranked(dims, nodes, weights[: len(convolutions)]))
    assert message in str(caught.value)


def test_an_output_whose_class_count_nothing_tells_is_one_error_line(tmp_path: Path) -> None:
    """Channels 2 + 4 do not broadcast, so inference cannot size the output, and its
    declaration (1x?x?x?) leaves the class axis unknown: a TargetError, not a TypeError."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="a"),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="b"),
        helper.make_node("Add", ["b", "a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unsized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None, None])],
        [_weight("wa", (4, 1, 1, 1)), _weight("wb", (2, 4, 1, 1))],
    )
    path = tmp_path / "unsized.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=OPSETS[:1], ir_version=8).SerializeToString()
    )
    image = tmp_path / "image.npy"
    np.save(image, np.ones((1, 1, 4, 4), np.float32))
    arguments = ["explain", str(path), str(image), "--out", str(tmp_path / "map.npy")]
    arguments += ["--layers", "all", "--provider", "cpu", "--quiet"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "the number of classes of output 'y' (its axis 1) is unknown" in errors[0]


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_an_input_size_beyond_memory_is_refused_before_anything_is_allocated(
    command: str, tmp_path: Path
) -> None:
    """--input-shape 1x1x999999x999999 once made the shape probe ask numpy for 3.6 TiB and
    crash with a traceback."""
    from click.testing import CliRunner

    from segattr_onnx.cli import main
    from tests.conftest import fixture

    args = [command, str(fixture("unet2d_torchscript").path), "--input-shape", "1x1x999999x999999"]
    if command == "export":
        args += ["--out", str(tmp_path / "x.onnx")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "more than the free memory" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.onnx").exists()

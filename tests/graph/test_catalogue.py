"""The kernel-layer catalogue against what each fixture's PyTorch architecture says."""

from __future__ import annotations

import numpy as np
import pytest

from segattr_onnx.errors import InputShapeError, NoKernelLayersError
from segattr_onnx.graph.catalogue import analyse_model
from tests.conftest import Fixture


def _analyse(fx: Fixture):
    return analyse_model(fx.path, fx.test_shape)


def test_layers_match_the_architecture(any_fixture: Fixture) -> None:
    analysis = _analyse(any_fixture)
    expected = any_fixture.spec["kernel_layers"]
    layers = sorted(analysis.layers, key=lambda layer: layer.depth)
    assert len(layers) == len(expected)
    for layer, want in zip(layers, expected, strict=True):
        assert layer.op == want["op"], want["module"]
        assert layer.kernels == want["out_channels"], want["module"]
        assert list(layer.spatial_shape) == want["output_spatial"], want["module"]
        assert layer.group == want["group"], want["module"]
        assert layer.spatial_rank == len(want["output_spatial"])
        if "onnx_node" in want:
            assert layer.node_name == want["onnx_node"]


def test_bottleneck_and_post_bottleneck_lists(any_fixture: Fixture) -> None:
    analysis = _analyse(any_fixture)
    by_node = {layer.node_name: layer.name for layer in analysis.layers}
    expected = any_fixture.spec["kernel_layers"]
    assert analysis.bottleneck == [
        by_node[w["onnx_node"]] for w in expected if w["group"] == "bottleneck"
    ]
    assert sorted(analysis.post_bottleneck) == sorted(
        by_node[w["onnx_node"]] for w in expected if w["group"] == "decoder"
    )


def test_input_layout_and_outputs(any_fixture: Fixture) -> None:
    analysis = _analyse(any_fixture)
    spec = any_fixture.spec
    assert analysis.input.layout == spec["layout"]
    assert analysis.input.dynamic_batch == spec["dynamic_batch"]
    assert analysis.input.dtype == spec["dtype"]
    output = analysis.outputs[0]
    assert output.name == spec["output_name"]
    want_activation = None if spec["final_activation"] == "none" else spec["final_activation"]
    assert output.activation == want_activation
    channels_last = spec["layout"] in ("NHWC", "NDHWC")
    assert output.channel_axis == (len(spec["test_shape"]) - 1 if channels_last else 1)


def test_channels_last_blocks_end_in_nhwc() -> None:
    """tf2onnx-style Transpose→Conv→Transpose→Mul→Relu: the block output is NHWC (axis 3)."""
    from tests.conftest import fixture

    analysis = _analyse(fixture("unet2d_nhwc"))
    convs = [layer for layer in analysis.layers if layer.op == "Conv" and layer.group != "head"]
    assert convs
    for layer in convs:
        assert layer.channel_axis == 1
        assert layer.block_channel_axis == 3
        assert layer.block_ops == ("Transpose", "Mul", "Relu")


def test_blocks_follow_norms_and_quantisation() -> None:
    from tests.conftest import fixture

    unet3d = _analyse(fixture("unet3d"))
    encoder = [layer for layer in unet3d.layers if layer.group == "encoder"]
    assert all(layer.block_ops == ("InstanceNormalization", "LeakyRelu") for layer in encoder)
    qdq = _analyse(fixture("unet2d_qdq"))
    assert all(
        layer.block_ops[-2:] == ("QuantizeLinear", "DequantizeLinear") for layer in qdq.layers
    )
    # Kernel counts of QDQ convs come from the int8 weights behind DequantizeLinear.
    assert [layer.kernels for layer in qdq.layers] == [
        w["out_channels"] for w in fixture("unet2d_qdq").spec["kernel_layers"]
    ]


def test_free_spatial_dims_need_an_input_shape() -> None:
    from tests.conftest import fixture

    path = fixture("unet2d_torchscript").path
    with pytest.raises(InputShapeError, match=r"input_shape=\(1, 1, 128, 128\)"):
        analyse_model(path)
    bigger = analyse_model(path, (1, 1, 64, 48))
    assert bigger.layer(bigger.bottleneck[0]).spatial_shape == (16, 12)
    with pytest.raises(InputShapeError, match="dim 1 must be 1"):
        analyse_model(path, (1, 3, 64, 64))


def test_model_without_convolutions_is_refused() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(NoKernelLayersError, match="no convolution"):
        analyse_model(model)


def test_gate_convolutions_are_not_the_bottleneck() -> None:
    """A squeeze-excitation gate (1x1 conv on a pooled tensor) must not become the bottleneck."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["b"], pads=[1, 1, 1, 1], name="deep"),
        helper.make_node("GlobalAveragePool", ["b"], ["g"]),
        helper.make_node("Conv", ["g", "w3"], ["s"], name="se_gate"),
        helper.make_node("Sigmoid", ["s"], ["sg"]),
        helper.make_node("Mul", ["b", "sg"], ["bs"]),
        helper.make_node("Resize", ["bs", "", "scales"], ["u"], mode="linear"),
        helper.make_node("Conv", ["u", "w4"], ["c"], pads=[1, 1, 1, 1], name="dec"),
        helper.make_node("Conv", ["c", "w5"], ["y"], name="head"),
    ]
    initializers = [
        weight("w1", (4, 1, 3, 3)),
        weight("w2", (8, 4, 3, 3)),
        weight("w3", (8, 8, 1, 1)),
        weight("w4", (4, 8, 3, 3)),
        weight("w5", (2, 4, 1, 1)),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    graph = helper.make_graph(
        nodes,
        "se",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    analysis = analyse_model(model)
    groups = {layer.name: layer.group for layer in analysis.layers}
    assert groups == {
        "stem": "encoder",
        "deep": "bottleneck",
        "se_gate": "bottleneck",
        "dec": "decoder",
        "head": "head",
    }
    assert analysis.layer("se_gate").is_gate


def test_contrib_fused_conv_shapes_come_from_the_probe_run_fallback() -> None:
    """Neither onnx nor ORT's symbolic inference knows com.microsoft.FusedConv; a probe run does."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in [("w1", (4, 1, 3, 3)), ("w2", (8, 4, 3, 3)), ("w3", (2, 8, 1, 1))]
    ]
    fused = {"domain": "com.microsoft", "activation": "Relu", "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("FusedConv", ["x", "w1"], ["a"], name="stem", **fused),
        helper.make_node("FusedConv", ["a", "w2"], ["b"], name="down", strides=[2, 2], **fused),
        helper.make_node("Resize", ["b", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Conv", ["u", "w3"], ["y"], name="head"),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(
        nodes,
        "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [*weights, scales],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    analysis = analyse_model(model)
    assert analysis.layer("stem").spatial_shape == (16, 16)
    assert analysis.layer("down").spatial_shape == (8, 8)
    assert [layer.group for layer in analysis.layers] == ["encoder", "bottleneck", "head"]
    assert analysis.layer("down").kernels == 8

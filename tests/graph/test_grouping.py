"""Layer groups per output: each output has its own path, head and rule, and ``last`` and the
empty-group errors say what they found. (Whole architectures: tests/methods/test_families.py.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.errors import LayerSelectionError, NoKernelLayersError, TargetError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.methods.layers import select_layers
from tests.builders import build

SHAPE = (1, 1, 8, 8)


def _groups(analysis, output):
    grouping = analysis.grouping(output)
    return grouping.rule, {name: grouping.groups[name] for name in grouping.order}


def test_each_output_is_grouped_along_its_own_path() -> None:
    analysis = analyse_model(build(two_outputs=True), SHAPE)
    rule, main = _groups(analysis, "main")
    assert rule == "upsampling-decoder"
    assert main == {
        "enc": "encoder",
        "bottleneck": "bottleneck",
        "aux": "off-path",  # the side head does not feed 'main'
        "decoder": "decoder",
        "head": "head",
    }
    # The side output at the bottleneck's resolution: nothing follows the smallest size, so the
    # encoder-head rule splits at the widest map on the way, the bottleneck's own output.
    rule, aux = _groups(analysis, "aux")
    assert rule == "encoder-head"
    assert aux["aux"] == "head" and aux["decoder"] == aux["head"] == "off-path"
    assert aux["bottleneck"] == "bottleneck"
    assert analysis.primary_output == "main"
    # The layer's own group field is the primary output's; off its path, the other output's.
    assert {layer.name: layer.group for layer in analysis.layers}["aux"] == "head"


def test_groups_and_last_are_taken_for_the_output_asked_for() -> None:
    analysis = analyse_model(build(two_outputs=True), SHAPE)
    assert [layer.name for layer in select_layers(analysis, "last")] == ["decoder"]
    assert [layer.name for layer in select_layers(analysis, "last", output="aux")] == ["bottleneck"]
    with pytest.raises(LayerSelectionError, match=r"empty for output 'aux'.*encoder-head"):
        select_layers(analysis, "decoder", output="aux")
    with pytest.raises(TargetError, match="no output 'nope'"):
        select_layers(analysis, "decoder", output="nope")


def _single_conv_model() -> onnx.ModelProto:
    weight = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1], name="only"),
            helper.make_node("Sigmoid", ["image"], ["passthrough"]),
        ],
        "single",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 8, 8]),
            helper.make_tensor_value_info("passthrough", TensorProto.FLOAT, [1, 1, 8, 8]),
        ],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_last_is_the_classifier_when_nothing_else_feeds_the_output() -> None:
    analysis = analyse_model(_single_conv_model(), SHAPE)
    assert analysis.primary_output == "logits"
    assert analysis.grouping("logits").rule == "head-only"
    assert [layer.name for layer in select_layers(analysis, "last")] == ["only"]
    with pytest.raises(LayerSelectionError, match="empty for output 'logits'"):
        select_layers(analysis, "decoder")


def test_an_output_no_kernel_feeds_is_named_with_its_fix() -> None:
    analysis = analyse_model(_single_conv_model(), SHAPE)
    with pytest.raises(NoKernelLayersError, match="no kernel layer feeds output 'passthrough'"):
        select_layers(analysis, "last", output="passthrough")


def test_the_segmentation_shaped_output_fed_by_most_layers_is_primary() -> None:
    """Two heads on one decoder tie on kernel layers: the larger output wins, the other is
    named; a deep-supervision side output is fed by fewer layers and loses."""
    assert analyse_model(build(two_outputs=True), SHAPE).primary_ties == ()
    analysis = analyse_model(build(second_head_channels=3), SHAPE)
    assert analysis.primary_output == "edges" and analysis.primary_ties == ("main",)


def _one_level_unet() -> onnx.ModelProto:
    """conv1 → MaxPool → conv2 → Resize back → Concat with conv1's map → conv3 → head: the
    shape of one pyramid bin, but a U-Net's bottleneck."""
    rng = np.random.default_rng(1)

    def conv(name, source, c_in, c_out, kernel=3):
        weight = rng.standard_normal((c_out, c_in, kernel, kernel)).astype(np.float32)
        pad = kernel // 2
        node = helper.make_node("Conv", [source, f"{name}.w"], [name], name=name, pads=[pad] * 4)
        return node, numpy_helper.from_array(weight, f"{name}.w")

    nodes, weights = [], []
    for name, source, c_in, c_out, kernel in [
        ("conv1", "image", 1, 4, 3),
        ("conv2", "pooled", 4, 8, 3),
        ("conv3", "joined", 12, 4, 3),
        ("head", "r3", 4, 2, 1),
    ]:
        node, weight = conv(name, source, c_in, c_out, kernel)
        nodes.append(node)
        weights.append(weight)
    nodes[1:1] = [
        helper.make_node("Relu", ["conv1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    nodes[4:4] = [
        helper.make_node("Relu", ["conv2"], ["r2"]),
        helper.make_node("Resize", ["r2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["r1", "up"], ["joined"], axis=1),
    ]
    nodes.insert(-1, helper.make_node("Relu", ["conv3"], ["r3"]))
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    graph = helper.make_graph(
        nodes,
        "one_level",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, [1, 2, 16, 16])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_one_level_unet_is_not_taken_for_a_pyramid_pooling_module() -> None:
    analysis = analyse_model(_one_level_unet(), (1, 1, 16, 16))
    rule, groups = _groups(analysis, "head")
    assert not analysis.layer("conv2").is_gate
    assert rule == "upsampling-decoder"
    assert groups == {
        "conv1": "encoder",
        "conv2": "bottleneck",
        "conv3": "decoder",
        "head": "head",
    }

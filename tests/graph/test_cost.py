"""Multiply-adds counted from the ONNX graph against the torch model it was exported from,
counted by forward hooks on the torch modules themselves."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from segattr_onnx import Explainer
from segattr_onnx.graph.cost import graph_macs
from segattr_onnx.graph.shapes import infer_tensor_infos
from tests.conftest import fixture
from tests.methods.test_windowed_reference import _torch_twin


def _torch_macs(net: torch.nn.Module, x: torch.Tensor) -> int:
    """Σ over the convolutions that ran of (output or input elements) × the kernel's fan."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kernel = math.prod(module.kernel_size)
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            total += inputs[0][0].numel() * (module.out_channels // module.groups) * kernel
        else:
            total += output[0].numel() * (module.in_channels // module.groups) * kernel

    hooks = [
        module.register_forward_hook(count)
        for module in net.modules()
        if isinstance(module, torch.nn.modules.conv._ConvNd)
    ]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return total


@pytest.mark.parametrize(("name", "shape"), [("unet2d_torchscript", (1, 1, 48, 64)),
                                             ("unet3d", (1, 1, 16, 16, 16))])  # fmt: skip
def test_graph_multiply_adds_equal_the_torch_models_own(name: str, shape) -> None:
    analysis = Explainer(fixture(name).path, provider="cpu").analysis(shape)
    counted = graph_macs(analysis.model.proto, analysis.tensors)
    net = _torch_twin(name)
    assert counted == _torch_macs(net, torch.zeros(shape, dtype=torch.float64))
    assert counted > 0


def test_grouped_transposed_and_matrix_products_by_hand() -> None:
    """A grouped Conv, a ConvTranspose and a MatMul whose counts are written out here."""
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.standard_normal((8, 2, 3, 3)).astype(np.float32),  # group 2: 4 in
        "up_w": rng.standard_normal((8, 4, 2, 2)).astype(np.float32),
        "proj": rng.standard_normal((20, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["a"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("ConvTranspose", ["a", "up_w"], ["b"], strides=[2, 2]),
        helper.make_node("Reshape", ["b", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "proj"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.array([1, 4 * 12 * 10 // 20, 20], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    infos = infer_tensor_infos(model, {"x": (1, 4, 6, 5)}, dynamic_batch=False)
    conv = (8 * 6 * 5) * 2 * 9  # output elements × (C_in / group) × kernel
    transposed = (8 * 6 * 5) * 4 * 4  # input elements × C_out × kernel
    product = (4 * 12 * 10 // 20) * 5 * 20  # rows × columns × inner length
    assert graph_macs(model, infos) == conv + transposed + product

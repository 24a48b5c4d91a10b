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


def _module_path(scope: str) -> str:
    """The torch module of a TorchScript node scope: "up1/blocks/blocks.0/conv" names
    ``up1.blocks.0.conv`` (each part after the first repeats its parent's name)."""
    parts: list[str] = []
    for part in scope.split("/"):
        parent = parts[-1] if parts else None
        parts.append(part[len(parent) + 1 :] if parent and part.startswith(f"{parent}.") else part)
    return ".".join(parts)


def test_a_suffix_with_split_convolutions_counts_them_per_item_and_per_run() -> None:
    """The torch twin's decoder convolutions after the first decoder layer, counted by hooks,
    equal the suffix's count, whose Conv over the skip Concat is split in two halves with
    gathered weights (shapes onnx infers); with ``batched_from`` the half over the skip alone,
    run once per session run, is left out: exactly its share C_skip / C_in of that Conv."""
    shape = (1, 1, 48, 64)
    explainer = Explainer(fixture("unet2d_torchscript").path, provider="cpu")
    ablation = explainer._for_shape(shape).engine.ablation
    analysis = explainer.analysis(shape)
    layer = analysis.post_bottleneck[0]
    ablated = ablation.ablated(layer)
    suffix = ablated.suffix.model
    assert any("segattr_split" in n.name for n in suffix.graph.node)  # the case under test
    net = _torch_twin("unet2d_torchscript")
    counts: dict[str, int] = {}

    def count(name):
        def hook(module, inputs, output):
            kernel = math.prod(module.kernel_size)
            if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
                counts[name] = inputs[0][0].numel() * module.out_channels * kernel
            else:
                counts[name] = output[0].numel() * module.in_channels * kernel

        return hook

    for name, module in net.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            module.register_forward_hook(count(name))
    with torch.no_grad():
        net(torch.zeros(shape, dtype=torch.float64))
    start = _module_path(layer.strip("/").rsplit("/", 1)[0])
    names = list(counts)
    after = names[names.index(start) + 1 :]
    assert graph_macs(suffix, ablated.infos) == sum(counts[n] for n in after)
    per_item = graph_macs(suffix, ablated.infos, batched_from=[ablated.site.mask_input])
    initializers = {t.name: numpy_helper.to_array(t) for t in suffix.graph.initializer}
    left_out = 0
    for node in suffix.graph.node:
        if node.name.endswith("segattr_split.shared"):
            module = _module_path(node.name.strip("/").split("/conv/")[0] + "/conv")
            columns = initializers[f"{node.output[0]}_columns"]  # the skip's input channels
            left_out += counts[module] * len(columns) // net.get_submodule(module).in_channels
    assert left_out > 0
    assert per_item == sum(counts[n] for n in after) - left_out

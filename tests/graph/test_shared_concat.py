"""Convs over Concat(varying, shared skip) are split so the skip half runs once per run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.graph import rewrite
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.runtime.ablation import AblationRunner
from tests.conftest import fixture


def _suffix_ops(runner: AblationRunner, layer: str) -> list[str]:
    """Op types of the suffix's nodes, leaving out the shape arithmetic of its Expands."""
    nodes = runner.ablated(layer).suffix.model.graph.node
    return [n.op_type for n in nodes if not n.output[0].startswith("segattr_suffix.")]


def test_the_skip_half_of_a_decoder_conv_runs_at_batch_one_and_gives_the_same_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, (1, 1, 32, 32))
    layer = next(name for name in analysis.post_bottleneck if "ConvTranspose" in name)
    split_runner = AblationRunner(analysis, provider="cpu")
    split_suffix = split_runner.ablated(layer).suffix
    monkeypatch.setattr(rewrite, "_split_shared_concats", lambda cut, expanded, *_: expanded)
    plain_runner = AblationRunner(analysis, provider="cpu")
    plain_suffix = plain_runner.ablated(layer).suffix

    # The plain suffix broadcasts the skips with Expand and joins them with Concat; the split
    # one reads them at batch 1, with one more Conv (the skip half) per split Conv.
    assert plain_suffix.expanded_inputs and "Expand" in _suffix_ops(plain_runner, layer)
    assert split_suffix.expanded_inputs == ()
    assert "Expand" not in _suffix_ops(split_runner, layer)
    assert "Concat" not in _suffix_ops(split_runner, layer)
    splits = _suffix_ops(plain_runner, layer).count("Concat")
    assert splits >= 1
    assert _suffix_ops(split_runner, layer).count("Conv") == (
        _suffix_ops(plain_runner, layer).count("Conv") + splits
    )

    channels = analysis.layer(layer).kernels
    masks = np.concatenate([1 - np.eye(channels), np.eye(channels)])
    x = fx.input(seed=3)

    def predictions(runner: AblationRunner) -> np.ndarray:
        return np.concatenate([c.outputs["logits"] for c in runner.ablate(x, layer, masks)])

    split, plain = predictions(split_runner), predictions(plain_runner)
    np.testing.assert_allclose(split, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    assert np.abs(plain[: len(masks) // 2] - plain[len(masks) // 2 :]).max() > 1e-2  # masks matter


def _concat_conv_model(group: int, axis: int, extra_reader: bool) -> onnx.ModelProto:
    """x → Relu (the layer) → Concat(·, skip) → Conv, skip computed from x before the layer."""
    rng = np.random.default_rng(0)
    channels = 4
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["a"], name="layer", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["z"]),
        helper.make_node("Conv", ["x", "ws"], ["skip"], name="skip_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["z", "skip"], ["cat"], axis=axis),
        helper.make_node("Conv", ["cat", "w1", "b1"], ["y"], name="head", group=group),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["cat"], ["neg"]))
        outputs.append(helper.make_tensor_value_info("neg", TensorProto.FLOAT, None))
    inits = [
        numpy_helper.from_array(rng.normal(size=(channels, 1, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=(channels, 1, 3, 3)).astype(np.float32), "ws"),
        numpy_helper.from_array(
            rng.normal(size=(2, 2 * channels // group, 1, 1)).astype(np.float32), "w1"
        ),
        numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "b1"),
    ]
    graph = helper.make_graph(
        nodes,
        "concat_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("group", "extra_reader", "split"),
    [(1, False, True), (2, False, False), (1, True, False)],
)
def test_only_plain_convs_that_alone_read_the_concat_are_split(
    group: int, extra_reader: bool, split: bool
) -> None:
    analysis = analyse_model(_concat_conv_model(group, 1, extra_reader))
    runner = AblationRunner(analysis, provider="cpu")
    ops = [node.op_type for node in runner.ablated("layer").suffix.model.graph.node]
    assert ("Concat" not in ops) is split
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    masks = np.concatenate([1 - np.eye(4), np.eye(4)])
    fast = np.concatenate([c.outputs["y"] for c in runner.ablate(x, "layer", masks)])
    slow = np.concatenate(
        [c.outputs["y"] for c in runner.ablate(x, "layer", masks, use_suffix=False)]
    )
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)

"""Every architecture family, every method: groups as the torch modules say, maps that mean
something, and Grad-CAM weights that match finite differences.

The fixtures (``tests/fixtures/families``, made by ``tests/fixtures/make_family_models.py``) are
small versions of the architectures users bring: DeepLabV3 with ASPP, LR-ASPP, FCN, PSPNet, a
mask among landmark and score outputs, reflect padding, a Keras-style Tile upsampling in NHWC,
transformer blocks (LayerNorm, GELU, attention), GroupNorm, and MONAI's own networks. The
expected groups come from the torch module hierarchy recorded in the manifest, never from the
ONNX graph.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from segattr_onnx import Explainer, Target
from segattr_onnx.graph.catalogue import analyse_model
from tests.methods.test_gradients import _freeze_gates, _shift_differences

FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"
MANIFEST = json.loads((FAMILIES / "manifest.json").read_text())["fixtures"]
NAMES = sorted(MANIFEST)
METHODS = ("kwc", "ablationcam", "scorecam", "gradcam", "gradcampp")
RULES = {"unet": "upsampling-decoder", "encoder-head": "encoder-head"}


def _input(name: str, seed: int = 0) -> np.ndarray:
    shape = MANIFEST[name]["test_shape"]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@cache
def _explainer(name: str) -> Explainer:
    return Explainer(FAMILIES / MANIFEST[name]["file"], provider="cpu")


def _target(name: str) -> Target:
    return Target(output=MANIFEST[name]["target_output"])


def _node_groups(name: str) -> tuple[object, dict[str, str]]:
    spec = MANIFEST[name]
    analysis = analyse_model(FAMILIES / spec["file"], spec["test_shape"])
    grouping = analysis.grouping(spec["target_output"])
    by_node = {layer.node_name: grouping.groups[layer.name] for layer in analysis.layers}
    return grouping, by_node


@pytest.mark.parametrize("name", NAMES)
def test_grouping_rule_and_groups_follow_the_architecture(name: str) -> None:
    spec = MANIFEST[name]
    grouping, by_node = _node_groups(name)
    assert grouping.rule == RULES[spec["expected_rule"]], name
    # Without --output-name, the mask is what gets explained, even beside other outputs.
    assert (
        analyse_model(FAMILIES / spec["file"], spec["test_shape"]).primary_output
        == (spec["target_output"])
    )
    for node in spec["classifier_convs"]:
        assert by_node[node] == "head", (name, node)
    decoder = {node for node, group in by_node.items() if group == "decoder"}
    assert by_node[spec["backbone_last_conv"]] == "bottleneck", name
    if spec["expected_rule"] == "encoder-head":
        assert decoder == set(spec["head_convs"]), name
    else:
        # The torch modules' decoder, except a first convolution still at the bottleneck's
        # size (SegResNet's channel reduction before upsampling), which the rule groups with
        # the bottleneck; UNETR's upsampling "encoders" of the hidden states count as decoder.
        bottleneck = {node for node, group in by_node.items() if group == "bottleneck"}
        assert set(spec["head_convs"]) <= decoder | bottleneck, name
        assert len(set(spec["head_convs"]) & decoder) >= len(spec["head_convs"]) - 1, name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layers", ["decoder", "last"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_finite_map_with_structure(name: str, method: str, layers: str):
    x = _input(name)
    explainer = _explainer(name)
    result = explainer.explain(x, method, layers=layers, target=_target(name))
    spatial = [d for axis, d in enumerate(x.shape) if axis not in (0, _channel_axis(name))]
    assert result.map.shape == tuple(spatial)
    assert np.all(np.isfinite(result.map))
    if method == "gradcam" and not any(layer.weights.any() for layer in result.layers):
        # A normalisation after every explained layer (MONAI's InstanceNorm blocks, SegResNet's
        # GroupNorm) makes each kernel's gradient sum to 0: Grad-CAM's map is 0, not noise.
        for layer in result.layers:
            gradient = explainer._memo.gradients[layer.layer].astype(np.float64)
            rows = gradient.reshape(len(gradient), -1)
            assert (np.abs(rows.sum(1)) <= 1e-4 * np.abs(rows).sum(1)).all(), layer.layer
        assert not result.map.any()
        return
    assert float(result.map.max() - result.map.min()) > 1e-6, f"{name}: constant map"
    assert result.target["output"] == MANIFEST[name]["target_output"]
    if layers == "last":
        (only,) = result.layers
        _, by_node = _node_groups(name)
        analysis = _explainer(name).analysis(x.shape)
        assert by_node[analysis.layer(only.layer).node_name] != "head" or all(
            group in ("head", "off-path") for group in by_node.values()
        )


def _channel_axis(name: str) -> int:
    return len(MANIFEST[name]["test_shape"]) - 1 if MANIFEST[name]["layout"] == "NHWC" else 1


@pytest.mark.parametrize("name", NAMES)
def test_gradcam_weights_equal_finite_differences(name: str) -> None:
    """∂T/∂A_k averaged over positions against shifting channel k by ±ε (a forward-only
    reference through the graph rewriter), with ReLU gates frozen at the point where the
    network has them, live otherwise (smooth activations need no freezing)."""
    x = _input(name, seed=1)
    explainer = _explainer(name)
    result = explainer.explain(x, "gradcam", target=_target(name))
    model = onnx.load(str(FAMILIES / MANIFEST[name]["file"]))
    input_name = MANIFEST[name]["input_name"]
    # The gate freezer feeds ``image``: rename the input for it, then back.
    frozen = _rename_input(
        _freeze_gates(_rename_input(model, input_name, "image"), x), "image", input_name
    )
    analysis = explainer.analysis(x.shape)
    informative = 0  # layers whose weights stand well above the rounding floor
    for attribution in result.layers:
        # Richardson's combination of steps 0.1 and 0.05 cancels the O(ε²) term of smooth
        # activations (GELU, sigmoid, the norms); steps this large keep float32 rounding of T
        # far below the signal, which the per-channel shift spreads over every position.
        coarse = _shift_differences(frozen, x, result, attribution.layer, 1e-1)
        fine = _shift_differences(frozen, x, result, attribution.layer, 5e-2)
        numeric = (4 * fine - coarse) / 3
        positions = int(np.prod(analysis.layer(attribution.layer).spatial_shape))
        # What float32 rounding of T alone can move a difference by (a norm right after the
        # layer removes a per-channel shift: there the true weights are 0 and only this is left).
        noise = 64 * np.finfo(np.float32).eps * result.base_score / (2 * 5e-2 * positions)
        error = float(np.abs(attribution.weights - numeric).max())
        bound = 2e-2 * float(np.abs(numeric).max()) + noise
        assert error <= bound, f"{name} {attribution.layer}: {error:.3g} > {bound:.3g}"
        informative += float(np.abs(numeric).max()) > 10 * noise
    assert informative, f"{name}: no layer's weights rise above float32 noise; nothing checked"


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    if old == new:
        return model
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for value in renamed.graph.input:
        if value.name == old:
            value.name = new
    for node in renamed.graph.node:
        for position, tensor in enumerate(node.input):
            if tensor == old:
                node.input[position] = new
    return renamed


@pytest.mark.parametrize("name", NAMES)
def test_onnx_runtime_computes_what_the_torch_model_computed(name: str) -> None:
    """The committed files are the architectures the script built: ORT equals torch."""
    spec = MANIFEST[name]
    references = np.load(FAMILIES / "reference_io.npz")
    x = references[f"{name}_input"]
    session = ort.InferenceSession(str(FAMILIES / spec["file"]), providers=["CPUExecutionProvider"])
    outputs = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {spec["input_name"]: x}),
            strict=True,
        )
    )
    for output in spec["outputs"]:
        want = references[f"{name}_{output['name']}"]
        scale = max(float(np.abs(want).max()), 1.0)
        np.testing.assert_allclose(
            outputs[output["name"]], want, atol=spec["reference_atol"] * scale, err_msg=name
        )

"""Grad-CAM and Grad-CAM++ on the fixtures, with gradients checked against finite differences.

The backward graph is the library's; the references here only run forward passes:
- Grad-CAM's w_k is the spatial mean of ∂T/∂A_k, so it must equal the central difference of T
  when channel k of the layer's raw output is shifted by ±ε everywhere, divided by the number
  of positions (the shift is a per-channel additive input inserted by the graph layer);
- the whole ∂T/∂A must give ⟨g, V⟩ equal to the central difference of T along a random V,
  added to A by an Add node this test inserts itself.

ReLU networks are piecewise linear: a step of ε moves some pre-activations across 0, which
biases central differences by O(ε), while float32 rounding swamps steps much below 1e-4. So the
tight checks differentiate the network with its ReLU/LeakyReLU gates frozen at the evaluation
point (each gate replaced by multiplication with its own derivative there, read from a forward
pass): the same function to first order — the gradient at a point off the kinks is the frozen
network's — but smooth, so ε = 1e-2 gives central differences good to ~1e-5. A looser check on
the unmodified network (1e-2, ε = 3e-4) guards against the freezing hiding anything.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from segattr_onnx import Explainer, Target
from segattr_onnx.engine import AttributionEngine
from segattr_onnx.graph.heads import ScoreHeadSpec, append_score_head
from tests.conftest import assert_close, fixture, run_reference
from tests.methods import reference

FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_nhwc", "unet2d_dynamo"]


def _engine(explainer: Explainer, x: np.ndarray) -> AttributionEngine:
    return explainer._for_shape(x.shape).engine


def _head(engine: AttributionEngine, result) -> ScoreHeadSpec:
    info = engine.analysis.tensors[result.target["output"]]
    target = Target(class_index=result.target["class_index"]).resolve(engine.analysis)
    return ScoreHeadSpec(
        target.output, info.elem_type, len(info.shape), target.channel_axis, target.activation
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_gradcam_weights_equal_channel_shift_finite_differences(name: str) -> None:
    fx = fixture(name)
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    result = explainer.explain(x, "gradcam")
    analysis = _engine(explainer, x).analysis
    model = fx.load_with_weights()
    frozen = _freeze_gates(model, x)
    for attribution in result.layers:
        what = f"{name} {attribution.layer}"
        layer = analysis.layer(attribution.layer)
        smooth = _shift_differences(frozen, x, result, attribution.layer, 1e-2)
        if layer.block_ops[:1] == ("InstanceNormalization",):
            # InstanceNorm removes a per-channel shift: T cannot move, so w must be 0, and the
            # differences only show float32 noise.
            scale = float(np.abs(explainer._memo.gradients[layer.name]).mean())
            assert scale > 0, what
            assert np.abs(attribution.weights).max() <= 1e-6 * scale, what
            assert np.abs(smooth).max() <= 1e-3 * scale, what
            continue
        assert np.abs(smooth).max() > 0, what
        assert_close(attribution.weights, smooth, 1e-3, what)
        plain = _shift_differences(model, x, result, attribution.layer, 3e-4)
        assert_close(attribution.weights, plain, 3e-2, f"{what} (gates live)")


GATES = ("Relu", "LeakyRelu")


def _freeze_gates(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """Each Relu/LeakyRelu replaced by Mul with its derivative at ``x`` (a constant)."""
    gates = [n for n in model.graph.node if n.op_type in GATES]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for gate in gates:
        probe.graph.output.append(helper.make_tensor_value_info(gate.input[0], 1, None))
    values = run_reference(probe, {"image": x})[len(model.graph.output) :]
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    for position, gate in enumerate(list(frozen.graph.node)):
        if gate.op_type not in GATES:
            continue
        value = values[[g.output[0] for g in gates].index(gate.output[0])]
        alpha = 0.0
        if gate.op_type == "LeakyRelu":
            alpha = next((a.f for a in gate.attribute if a.name == "alpha"), 0.01)
        slope = np.where(value > 0, 1.0, alpha).astype(np.float32)
        name = f"frozen_slope_{position}"
        frozen.graph.initializer.append(onnx.numpy_helper.from_array(slope, name))
        frozen.graph.node[position].CopyFrom(
            helper.make_node("Mul", [gate.input[0], name], [gate.output[0]], name=gate.name)
        )
    return frozen


def _shift_differences(
    model: onnx.ModelProto, x: np.ndarray, result, layer_name: str, epsilon: float
) -> np.ndarray:
    """(T(+ε e_k) − T(−ε e_k)) / 2ε / positions for every kernel k, via the shift rewrite."""
    explainer = Explainer(model, provider="cpu")
    engine = _engine(explainer, x)
    spec = _head(engine, result)
    layer = engine.analysis.layer(layer_name)
    kernels = layer.kernels
    shifts = np.concatenate([np.eye(kernels), -np.eye(kernels)]) * epsilon
    head = _StaticHead(spec, spec.feeds(result.prediction, None, result.target["class_index"]))
    scores = np.concatenate(
        [
            chunk.outputs[spec.outputs[2]]
            for chunk in engine.ablation.ablate(x, layer.name, shifts, form="shift", head=head)
        ]
    )
    positions = int(np.prod(layer.spatial_shape))
    return (scores[:kernels] - scores[kernels:]) / (2 * epsilon) / positions


class _StaticHead:
    """The score head with fixed feeds, as the engine would attach it."""

    def __init__(self, spec: ScoreHeadSpec, feeds: dict) -> None:
        self.key = ("test-head", spec)
        self.outputs = spec.outputs
        self.feeds = feeds
        self._spec = spec

    def attach(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return append_score_head(model, self._spec)


def _perturbed(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """Every reader of ``tensor`` reads tensor + V instead, V a new graph input."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    for node in edited.graph.node:
        for position, name in enumerate(node.input):
            if name == tensor:
                node.input[position] = "perturbed"
    edited.graph.node.append(helper.make_node("Add", [tensor, "direction"], ["perturbed"]))
    edited.graph.input.append(
        helper.make_tensor_value_info("direction", onnx.TensorProto.FLOAT, None)
    )
    return edited


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d", "unet2d_nhwc"])
def test_full_gradient_matches_directional_differences(name: str) -> None:
    fx = fixture(name)
    x = fx.input(1)
    explainer = Explainer(fx.path, provider="cpu")
    result = explainer.explain(x, "gradcam")
    engine = _engine(explainer, x)
    model = _freeze_gates(fx.load_with_weights(), x)
    rng = np.random.default_rng(3)
    for attribution in result.layers:
        layer = engine.analysis.layer(attribution.layer)
        gradient = explainer._memo.gradients[layer.name]  # this case's ∂T/∂A, (C, *S)
        raw_shape = engine.analysis.tensors[layer.output].shape
        direction = rng.standard_normal((1, *raw_shape[1:])).astype(np.float32)
        perturbed = _perturbed(model, layer.output)

        def score(step: float, perturbed=perturbed, direction=direction) -> float:
            (output,) = run_reference(
                perturbed, {"image": x, "direction": (step * direction).astype(np.float32)}
            )
            target = Target(class_index=result.target["class_index"])
            resolved = target.resolve(engine.analysis)
            return float(resolved.probabilities(output)[0].astype(np.float64).sum())

        def central(epsilon: float) -> float:
            return (score(epsilon) - score(-epsilon)) / (2 * epsilon)

        # Richardson: the O(ε²) terms of the smooth (frozen-gate) network cancel.
        numeric = (4 * central(1e-2) - central(2e-2)) / 3
        channel_first = np.moveaxis(direction, layer.channel_axis, 1)[0]
        analytic = float(np.sum(gradient.astype(np.float64) * channel_first))
        assert abs(analytic - numeric) <= 5e-3 * abs(numeric), (
            f"{name} {layer.name}: {analytic} vs {numeric}"
        )


def _raw_activation(fx, x: np.ndarray, layer) -> np.ndarray:
    """A_ℓ read from the model itself (its raw conv output made a graph output)."""
    model = fx.load_with_weights()
    model.graph.output.append(helper.make_tensor_value_info(layer.output, 1, None))
    value = run_reference(model, {"image": x})[-1]
    return np.moveaxis(value, layer.channel_axis, 1)[0]


def _gradcampp_reference(gradient: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """The spec's α and weights, written out per kernel and position."""
    weights = []
    for g, a in zip(
        gradient.reshape(len(gradient), -1), activation.reshape(len(gradient), -1), strict=True
    ):
        total = a.sum()
        alpha = [(v**2) / (2 * v**2 + total * v**3 + 1e-6) if v != 0 else 0.0 for v in g.tolist()]
        weights.append(sum(max(v, 0.0) * al for v, al in zip(g.tolist(), alpha, strict=True)))
    return np.array(weights)


@pytest.mark.parametrize("variant", ["p1", "p2"])
def test_gradcampp_weights_follow_the_spec_from_the_same_gradients(variant: str) -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(2)
    explainer = Explainer(fx.path, provider="cpu")
    plain = explainer.explain(x, "gradcam", variant=variant)
    plus = explainer.explain(x, "gradcampp", variant=variant)
    engine = _engine(explainer, x)
    assert sum(run.passes for run in plus.runs if run.purpose == "gradient") == 0  # reused
    for layer_plain, layer_plus in zip(plain.layers, plus.layers, strict=True):
        gradient = explainer._memo.gradients[layer_plain.layer]
        activation = _raw_activation(fx, x, engine.analysis.layer(layer_plain.layer))
        mean = gradient.astype(np.float64).reshape(len(gradient), -1).mean(1)
        assert_close(layer_plain.weights, mean, 1e-9)
        # A_ℓ here comes from an unoptimised session, the library's from an optimised one.
        assert_close(layer_plus.weights, _gradcampp_reference(gradient, activation), 1e-4)


@pytest.mark.parametrize(("method", "positive"), [("layercam", True), ("hirescam", False)])
@pytest.mark.parametrize("variant", ["p1", "p2"])
@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d", "unet2d_nhwc"])
def test_elementwise_cams_follow_their_formula_from_the_same_gradients(
    name: str, variant: str, method: str, positive: bool
) -> None:
    """LayerCAM: M = ReLU(Σ_k ReLU(g_k) ⊙ A_k); HiResCAM: M = ReLU(Σ_k g_k ⊙ A_k); then the
    CAM combination. The gradients are the ones the finite-difference tests above check."""
    fx = fixture(name)
    x = fx.input(4)
    explainer = Explainer(fx.path, provider="cpu")
    result = explainer.explain(x, method, variant=variant)
    engine = _engine(explainer, x)
    maps = []
    for attribution in result.layers:
        gradient = explainer._memo.gradients[attribution.layer].astype(np.float64)
        activation = _raw_activation(fx, x, engine.analysis.layer(attribution.layer))
        used = np.maximum(gradient, 0.0) if positive else gradient
        expected = np.maximum(np.einsum("k...,k...->...", used, activation), 0.0)
        assert_close(attribution.map, expected, 1e-4, f"{name} {attribution.layer}")
        assert_close(attribution.weights, used.reshape(len(used), -1).mean(1), 1e-9)
        maps.append(expected)
    combined = reference.combine_cam(maps, result.map.shape, variant)
    assert_close(result.map, combined, 1e-4, f"{name} combined")


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "hirescam"])
@pytest.mark.parametrize(
    "name", ["unet2d_torchscript", "unet3d", "unet2d_nhwc", "unet2d_fp16", "unet2d_qdq"]
)
def test_gradient_methods_run_on_every_fixture(name: str, method: str) -> None:
    fx = fixture(name)
    result = Explainer(fx.path, provider="cpu").explain(fx.input(0), method)
    assert result.map.shape == tuple(
        fx.spec["test_shape"][2:]
        if fx.spec["layout"].startswith("NC")
        else fx.spec["test_shape"][1:-1]
    )
    # unet3d's decoder convolutions feed InstanceNorm: Grad-CAM's weights are 0 there.
    expected_peak = 0.0 if (name, method) == ("unet3d", "gradcam") else 1.0
    assert np.isfinite(result.map).all() and result.map.max() == expected_peak
    assert [run.purpose for run in result.runs] == ["observation+gradient"]
    assert all(np.isfinite(layer.weights).all() for layer in result.layers)


@pytest.mark.parametrize(("name", "floor"), [("unet2d_fp16", 0.99), ("unet2d_qdq", 0.98)])
def test_reduced_precision_exports_explain_like_their_float32_original(name, floor) -> None:
    """Same weights as the float32 fixture: Grad-CAM must agree (fp16 keeps its gradient in
    fp16; QDQ needs the saturation-aware QuantizeLinear backward, since static quantisation
    replaced the ReLUs by saturation at the zero point)."""
    x = fixture("unet2d_torchscript").input(0)
    reference = Explainer(fixture("unet2d_torchscript").path, provider="cpu").explain(x, "gradcam")
    reduced_x = x.astype(np.float16) if fixture(name).is_fp16 else x
    reduced = Explainer(fixture(name).path, provider="cpu").explain(reduced_x, "gradcam")
    assert np.corrcoef(reference.map.ravel(), reduced.map.ravel())[0, 1] >= floor
    for a, b in zip(reference.layers, reduced.layers, strict=True):
        assert np.corrcoef(a.weights, b.weights)[0, 1] >= floor, a.layer


def _pad_to_skip_model() -> onnx.ModelProto:
    """A dynamic-size export that pads an upsampled map to its skip's size, with the padding
    computed at run time from Shape nodes (what F.pad(x, [dx // 2, ...]) exports to)."""
    rng = np.random.default_rng(4)
    conv = lambda name, c_in, c_out: onnx.numpy_helper.from_array(  # noqa: E731
        rng.normal(0, 0.5, (c_out, c_in, 3, 3)).astype(np.float32), name
    )
    inits = [
        conv("w_enc", 1, 3),
        conv("w_down", 3, 3),
        conv("w_dec", 6, 4),
        conv("w_head", 4, 2),
        onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "hw"),
        onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        onnx.numpy_helper.from_array(np.zeros(2, np.int64), "zeros2"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w_enc"], ["e"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["e"], ["skip"]),
        helper.make_node("Conv", ["skip", "w_down"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["d"], ["low"]),
        helper.make_node("Resize", ["low", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Shape", ["skip"], ["skip_shape"]),
        helper.make_node("Shape", ["up"], ["up_shape"]),
        helper.make_node("Gather", ["skip_shape", "hw"], ["skip_hw"]),
        helper.make_node("Gather", ["up_shape", "hw"], ["up_hw"]),
        helper.make_node("Sub", ["skip_hw", "up_hw"], ["missing"]),
        helper.make_node("Concat", ["zeros2", "zeros2", "zeros2", "missing"], ["pads"], axis=0),
        helper.make_node("Pad", ["up", "pads"], ["padded"]),
        helper.make_node("Concat", ["skip", "padded"], ["joined"], axis=1),
        helper.make_node("Conv", ["joined", "w_dec"], ["dec"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["dec"], ["dec_r"]),
        helper.make_node("Conv", ["dec_r", "w_head"], ["logits"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "pad_to_skip",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 2, "h", "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_padding_computed_from_run_time_shapes_is_differentiated() -> None:
    """Odd sizes: the upsampled map is one row short and padded at run time. The backward
    model is specialised to the case's size, so the padding becomes a literal it can undo."""
    model = _pad_to_skip_model()
    x = np.random.default_rng(5).standard_normal((1, 1, 9, 7)).astype(np.float32)
    result = Explainer(model, provider="cpu").explain(x, "gradcam", layers="all")
    frozen = _freeze_gates(model, x)
    for attribution in result.layers:
        smooth = _shift_differences(frozen, x, result, attribution.layer, 1e-2)
        assert_close(attribution.weights, smooth, 1e-3, attribution.layer)


@pytest.mark.parametrize(
    ("name", "rtol"),
    [
        ("unet2d_torchscript", 1e-5),
        ("unet2d_nhwc", 1e-5),
        ("unet3d", 1e-5),
        ("unet2d_dynamo", 1e-5),
        ("unet2d_fp16", 1e-2),
        ("unet2d_qdq", 2e-2),
    ],
)
def test_the_backward_graph_observes_what_the_plain_model_computes(name: str, rtol: float):
    """The one-run path reads P and the activations off the backward graph's session: they
    must be what the model itself computes (fp16 and int8 to their own precision), or the
    explanation would be of another prediction."""
    fx = fixture(name)
    x = fx.input(2)
    explainer = Explainer(fx.path, provider="cpu")
    result = explainer.explain(x, "gradcam")
    engine = _engine(explainer, x)
    layers = [engine.analysis.layer(a.layer) for a in result.layers]
    target = Target(class_index=result.target["class_index"]).resolve(engine.analysis, layers)
    plain = engine.observe(x, layers, target)
    (reference,) = run_reference(fx.load_with_weights(), {fx.spec["input_name"]: x})
    output = plain.outputs[target.output].astype(np.float32)
    np.testing.assert_allclose(output, reference.astype(np.float32), rtol=rtol, atol=rtol)
    fused = engine.observe_with_gradients(x, layers, target, explainer._memo)
    scale = np.abs(output).max()
    np.testing.assert_allclose(
        fused.outputs[target.output].astype(np.float32), output, atol=rtol * scale
    )
    for layer in layers:
        expected = plain.activations[layer.name]
        np.testing.assert_allclose(
            fused.activations[layer.name], expected, atol=rtol * np.abs(expected).max()
        )


def test_gradient_cancellation_rule_against_sums_written_out() -> None:
    from segattr_onnx.methods.gradcam import CANCELLATION, gradient_cancels

    rng = np.random.default_rng(0)
    real = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    centred = real - real.reshape(8, -1).mean(1).reshape(8, 1, 1, 1)  # every row sums to ~0
    ratios = np.abs(centred.astype(np.float64).reshape(8, -1).sum(1)) / np.abs(
        centred.astype(np.float64)
    ).reshape(8, -1).sum(1)
    assert ratios.max() <= CANCELLATION  # the reference: rounding only
    assert gradient_cancels(centred, 8)
    assert not gradient_cancels(real, 8)
    one_real_kernel = centred.copy()
    one_real_kernel[3] = real[3]
    assert not gradient_cancels(one_real_kernel, 8)  # a layer cancels only when all kernels do
    assert not gradient_cancels(np.zeros_like(real), 8)  # nothing flows: not a cancellation


@pytest.mark.parametrize(("name", "cancels"), [("unet3d", True), ("unet2d_torchscript", False)])
def test_gradcam_gives_zero_weights_where_the_gradient_cancels(name: str, cancels: bool) -> None:
    """unet3d's decoder convolutions feed InstanceNorm: Σ_v g_k,v = 0 exactly, so Grad-CAM's
    weights are 0 (not rounding noise), with a warning; Grad-CAM++ and LayerCAM still see."""
    from segattr_onnx.methods.gradcam import ZeroGradientMeanWarning

    fx = fixture(name)
    explainer = Explainer(fx.path, provider="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explainer.explain(fx.input(0), "gradcam")
    warned = [w for w in caught if issubclass(w.category, ZeroGradientMeanWarning)]
    assert bool(warned) == cancels
    for attribution in result.layers:
        gradient = explainer._memo.gradients[attribution.layer].astype(np.float64)
        sums = np.abs(gradient.reshape(len(gradient), -1).sum(1))
        spread = np.abs(gradient).reshape(len(gradient), -1).sum(1)
        if cancels:
            assert (sums <= 1e-4 * spread).all()
            assert not attribution.weights.any() and not attribution.map.any()
        else:
            assert attribution.weights.any()
    if cancels:
        assert not result.map.any()
        assert Explainer(fx.path, provider="cpu").explain(fx.input(0), "layercam").map.max() == 1


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet2d_fp16"])
def test_a_second_gradient_method_on_the_case_reuses_the_backward_runs_observation(name) -> None:
    """Grad-CAM++ after Grad-CAM (or Grad-CAM again) runs nothing more and gives the map a
    fresh explainer gives: the activations are the ones the gradients came with, not another
    graph's rounding of them (float16 rounding, on the fp16 fixture)."""
    fx = fixture(name)
    x = fx.input(3)
    explainer = Explainer(fx.path, provider="cpu")
    first = explainer.explain(x, "gradcam")
    again = explainer.explain(x, "gradcam")
    plus = explainer.explain(x, "gradcampp")
    assert first.forward_passes == 1 and again.forward_passes == plus.forward_passes == 0
    assert again.runs[0].reused_rows == 1
    np.testing.assert_array_equal(again.map, first.map)
    fresh = Explainer(fx.path, provider="cpu").explain(x, "gradcampp")
    np.testing.assert_array_equal(plus.map, fresh.map)

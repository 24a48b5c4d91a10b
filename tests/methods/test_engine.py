"""The method engine: suffix-only ablation runs, planned passes, chunking, reuse and inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from segattr_onnx import Explainer, explain
from segattr_onnx.errors import InputDataError, MethodError, NumericalError
from segattr_onnx.explainer import SIZES_KEPT, _cast_checked
from segattr_onnx.methods import AttributionMethod, KernelWeights, create_method, register_method
from tests.conftest import assert_close, fixture, run_reference


def _explainer(name: str, **options) -> Explainer:
    return Explainer(fixture(name).path, provider="cpu", **options)


def _decoder_kernels(explainer: Explainer, x: np.ndarray) -> list[int]:
    analysis = explainer.analysis(x.shape)
    return [layer.kernels for layer in analysis.layers if layer.group == "decoder"]


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d", "unet2d_nhwc"])
def test_p2_ablations_run_only_the_suffix_after_each_layer(name: str) -> None:
    explainer = _explainer(name)
    x = fixture(name).input(0)
    result = explainer.explain(x, "kwc")
    kernels = _decoder_kernels(explainer, x)
    full_nodes = len(explainer.model.proto.graph.node)
    ablations = [run for run in result.runs if run.purpose == "ablation"]
    assert [run.layer for run in ablations] == result.layer_names
    # "linear": rows start after the layer's linear readers (runtime/linear_ablation.py)
    assert all(run.graph in ("suffix", "linear") for run in ablations)
    assert all(run.graph_nodes < full_nodes for run in ablations)
    assert [run.passes for run in ablations] == [2 * c for c in kernels]
    # One observation pass collects every suffix's skip inputs: no per-layer prefix pass.
    assert [run.purpose for run in result.runs].count("observation") == 1
    assert "prefix" not in [run.purpose for run in result.runs]
    assert result.forward_passes == 1 + sum(2 * c for c in kernels)
    for run in ablations:
        chunks = -(-run.passes // run.batch_size)
        # A linear tail also runs its readers once (Y(1)) and each reader's contributions once.
        assert run.session_runs - run.layer_runs == chunks
        if run.graph == "suffix":  # the part no mask reaches (a skip half), if any, once
            ablated = explainer._for_shape(x.shape).engine.ablation.ablated(run.layer)
            assert run.layer_runs == int(ablated.suffix_hoisted is not None)
        else:  # Y(1) and B once, then at least one group's contributions
            assert run.layer_runs >= 3


def test_p1_ablations_add_one_prefix_pass_per_layer_for_the_random_kernels() -> None:
    explainer = _explainer("unet2d_torchscript")
    x = fixture("unet2d_torchscript").input(0)
    result = explainer.explain(x, "kwc", variant="p1")
    kernels = _decoder_kernels(explainer, x)
    prefixes = [run for run in result.runs if run.purpose == "prefix"]
    assert len(prefixes) == len(kernels)
    # Each prefix runs only what the suffix needs: never the layers after it or the outputs.
    full_nodes = len(explainer.model.proto.graph.node)
    assert all(run.graph == "boundary" and run.graph_nodes < full_nodes for run in prefixes)
    assert result.forward_passes == 1 + sum(2 * c + 1 for c in kernels)
    assert {run.graph for run in result.runs if run.purpose == "ablation"} == {"suffix"}


@pytest.mark.parametrize("variant", ["p2", "p1"])
@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d"])
def test_suffix_and_full_model_runs_give_the_same_explanation(name: str, variant: str) -> None:
    x = fixture(name).input(1)
    suffix = _explainer(name).explain(x, "kwc", variant=variant, use_suffix=True)
    full = _explainer(name).explain(x, "kwc", variant=variant, use_suffix=False)
    assert {run.graph for run in full.runs if run.purpose == "ablation"} == {"full"}
    np.testing.assert_allclose(suffix.map, full.map, rtol=1e-5, atol=1e-6)
    for a, b in zip(suffix.layers, full.layers, strict=True):
        scale = max(np.abs(b.terms["dependent"]).max(), 1e-12)
        np.testing.assert_allclose(a.terms["dependent"], b.terms["dependent"], atol=1e-5 * scale)
        weight_scale = max(np.abs(b.weights).max(), 1e-12)
        np.testing.assert_allclose(a.weights, b.weights, atol=1e-5 * weight_scale)


def test_progress_reports_exactly_the_planned_passes() -> None:
    seen: dict[str, object] = {"updates": 0}

    class Recorder:
        def update(self, count: int) -> None:
            seen["updates"] += count

        def close(self) -> None:
            seen["closed"] = True

    def factory(total: int, label: str) -> Recorder:
        seen["total"], seen["label"] = total, label
        return Recorder()

    x = fixture("unet2d_torchscript").input(0)
    result = _explainer("unet2d_torchscript").explain(x, "kwc", variant="p1", progress=factory)
    assert seen["total"] == seen["updates"] == result.forward_passes
    assert seen["closed"] is True
    assert f"{result.forward_passes} forward passes" in str(seen["label"])


def test_fixed_batch_models_run_one_mask_at_a_time_and_dynamic_ones_in_batches() -> None:
    x = fixture("unet2d_fixed_batch").input(0)
    fixed = _explainer("unet2d_fixed_batch").explain(x, "kwc")
    dynamic = _explainer("unet2d_torchscript").explain(x, "kwc")
    # one run per pass, besides the linear tails' once-per-layer runs
    assert fixed.session_runs - sum(r.layer_runs for r in fixed.runs) == fixed.forward_passes
    chunked = dynamic.session_runs - sum(r.layer_runs for r in dynamic.runs)
    assert chunked < dynamic.forward_passes / 4
    # Same weights, so the batching must not change the answer.
    np.testing.assert_allclose(fixed.map, dynamic.map, rtol=1e-5, atol=1e-6)
    scorecam = _explainer("unet2d_fixed_batch").explain(x, "scorecam")
    assert scorecam.session_runs == scorecam.forward_passes


def test_a_small_memory_budget_splits_runs_into_chunks_with_the_same_result() -> None:
    x = fixture("unet2d_torchscript").input(0)
    roomy = _explainer("unet2d_torchscript").explain(x, "kwc")
    tight = _explainer("unet2d_torchscript", memory_budget=1 << 20).explain(x, "kwc")
    chunked = tight.session_runs - sum(r.layer_runs for r in tight.runs)
    assert chunked == tight.forward_passes
    assert tight.session_runs > roomy.session_runs
    np.testing.assert_allclose(tight.map, roomy.map, rtol=1e-5, atol=1e-6)


def test_forgetting_the_case_makes_the_next_explanation_run_everything_again() -> None:
    x = fixture("unet2d_torchscript").input(0)
    explainer = _explainer("unet2d_torchscript")
    first = explainer.explain(x, "kwc")
    again = explainer.explain(x, "ablationcam")
    assert sum(run.reused_rows for run in again.runs) > 0
    explainer.forget_case()
    after = explainer.explain(x, "ablationcam")
    assert sum(run.reused_rows for run in after.runs) == 0
    assert after.forward_passes == 1 + sum(_decoder_kernels(explainer, x))
    assert first.forward_passes > after.forward_passes


def test_ablation_cam_reuses_the_dependent_runs_kwc_made_for_the_same_case() -> None:
    x = fixture("unet2d_torchscript").input(0)
    shared = _explainer("unet2d_torchscript")
    shared.explain(x, "kwc")
    reused = shared.explain(x, "ablationcam")
    ablations = [run for run in reused.runs if run.purpose == "ablation"]
    assert sum(run.passes for run in ablations) == 0
    assert [run.reused_rows for run in ablations] == _decoder_kernels(shared, x)
    fresh = _explainer("unet2d_torchscript").explain(x, "ablationcam")
    assert sum(run.passes for run in fresh.runs if run.purpose == "ablation") > 0
    for a, b in zip(reused.layers, fresh.layers, strict=True):
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6, atol=1e-9)
    # A different case is not served from the memo.
    other = shared.explain(fixture("unet2d_torchscript").input(5), "ablationcam")
    assert sum(run.passes for run in other.runs if run.purpose == "ablation") > 0


def test_fp16_model_explains_like_its_fp32_original() -> None:
    x = fixture("unet2d_torchscript").input(0)
    fp32 = _explainer("unet2d_torchscript").explain(x, "kwc")
    fp16 = _explainer("unet2d_fp16").explain(x.astype(np.float16), "kwc")
    assert np.isfinite(fp16.map).all()
    assert np.corrcoef(fp32.map.ravel(), fp16.map.ravel())[0, 1] >= 0.99


@pytest.mark.parametrize("variant", ["p2", "p1"])
def test_quantised_model_gives_a_finite_informative_map(variant: str) -> None:
    x = fixture("unet2d_qdq").input(0)
    result = _explainer("unet2d_qdq").explain(x, "kwc", variant=variant)
    assert np.isfinite(result.map).all() and result.map.max() == 1.0
    assert result.map.std() > 0


def test_p1_random_kernels_are_fixed_by_the_seed() -> None:
    x = fixture("unet2d_torchscript").input(0)
    first = _explainer("unet2d_torchscript", seed=3).explain(x, "kwc", variant="p1")
    again = _explainer("unet2d_torchscript", seed=3).explain(x, "kwc", variant="p1")
    other = _explainer("unet2d_torchscript", seed=4).explain(x, "kwc", variant="p1")
    np.testing.assert_array_equal(first.map, again.map)
    assert not np.allclose(first.layers[0].terms["dependent"], other.layers[0].terms["dependent"])


def test_inputs_with_or_without_the_batch_axis_give_the_same_map() -> None:
    x = fixture("unet3d").input(0)
    explainer = _explainer("unet3d")
    np.testing.assert_array_equal(explainer.explain(x).map, explainer.explain(x[0]).map)
    assert explainer.explain(x).map.shape == (16, 16, 16)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((2, 1, 32, 32), np.float32), "batch of 2"),
        (np.zeros((32,), np.float32), "dims"),
        (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(x: np.ndarray, message: str) -> None:
    with pytest.raises(InputDataError, match=message):
        _explainer("unet2d_torchscript").explain(x)


def test_unknown_methods_and_variants_are_refused() -> None:
    x = fixture("unet2d_torchscript").input(0)
    with pytest.raises(MethodError, match="unknown"):
        explain(fixture("unet2d_torchscript").path, x, method="nope", provider="cpu")
    with pytest.raises(MethodError, match="variant"):
        explain(fixture("unet2d_torchscript").path, x, variant="p3", provider="cpu")


@register_method
class _UniformCAM(AttributionMethod):
    """A plugin-style method: every kernel weighs 1, so M_ℓ = ReLU(Σ_k A_k)."""

    name = "test-uniform-cam"

    def kernel_weights(self, case, layer, results) -> KernelWeights:
        return KernelWeights(np.ones(layer.kernels))


def test_registered_methods_run_through_the_same_engine() -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    explainer = _explainer("unet2d_torchscript")
    result = explainer.explain(x, "test-uniform-cam", layers="last", variant="p1")
    assert isinstance(create_method("test-uniform-cam"), _UniformCAM)
    assert result.forward_passes == 1
    (layer,) = result.layers
    # Reference: the layer's raw conv output read from the model itself, M = ReLU(Σ_k A_k).
    conv = explainer.analysis(x.shape).layer(layer.layer)
    model = fx.load_with_weights()
    model.graph.output.append(onnx.helper.make_tensor_value_info(conv.output, 1, None))
    activation = run_reference(model, {"image": x})[-1][0]
    assert_close(layer.map, np.maximum(activation.sum(axis=0), 0), 1e-5, "ReLU(Σ A)")
    with pytest.raises(ValueError, match="already taken"):

        @register_method
        class _Clash(AttributionMethod):
            name = "test-uniform-cam"


def test_values_the_model_dtype_cannot_hold_are_refused_not_wrapped() -> None:
    explainer = _explainer("unet2d_fp16")
    with pytest.raises(InputDataError, match="beyond the largest float16"):
        explainer.explain(np.full((1, 1, 32, 32), 1e6, np.float32))
    with pytest.raises(InputDataError, match="integer encoding"):
        _cast_checked(np.zeros(3, np.float32), np.dtype(np.uint8))
    with pytest.raises(InputDataError, match=r"\[0, 1023\]"):
        _cast_checked(np.arange(1024), np.dtype(np.uint8))
    np.testing.assert_array_equal(_cast_checked(np.arange(4), np.dtype(np.uint8)), np.arange(4))


def test_a_prediction_that_overflows_is_reported_as_such() -> None:
    # 6e4 fits float16, but the network's activations overflow to inf on it.
    x = np.full((1, 1, 32, 32), 6e4, np.float16)
    with pytest.raises((InputDataError, NumericalError), match=r"finite|overflow"):
        _explainer("unet2d_fp16").explain(x)


def test_only_a_few_input_sizes_keep_their_sessions() -> None:
    explainer = _explainer("unet2d_torchscript")
    sizes = [16, 24, 32, 40, 48, 56]
    for size in sizes:
        explainer.explain(np.ones((1, 1, size, size), np.float32), layers="last")
    kept = [shape[-1] for shape in explainer._sized]
    assert kept == sizes[-SIZES_KEPT:]


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet2d_nhwc", "unet3d"])
def test_a_bare_image_fits_a_one_channel_model(name: str) -> None:
    """(H, W) or (D, H, W) alone: both the batch and the channel axis are added."""
    x = fixture(name).input(0)
    spatial = np.squeeze(x)
    explainer = _explainer(name)
    np.testing.assert_array_equal(explainer.explain(spatial).map, explainer.explain(x).map)

"""Shapes real exports have: several outputs, heads behind Resize/Squeeze, batch 1 hard-coded
inside, inputs without a channel axis. Each twisted model must explain exactly like its plain
twin (same weights), which is the independent reference here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from segattr_onnx import Explainer, Target
from segattr_onnx.errors import TargetError
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from tests.builders import build
from tests.conftest import run_reference

CASE = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)


def _explain(model, x=CASE, **options):
    return Explainer(model, provider="cpu").explain(x, **options)


@pytest.mark.parametrize("method", ["kwc", "scorecam", "ablationcam"])
def test_deep_supervision_explains_the_output_the_decoder_feeds(method: str) -> None:
    twin = _explain(build(), method=method)
    result = _explain(build(two_outputs=True), method=method)
    assert result.target["output"] == "main"
    np.testing.assert_array_equal(result.map, twin.map)
    chosen = _explain(
        build(two_outputs=True), method=method, layers="bottleneck", target=Target(output="aux")
    )
    assert chosen.target["output"] == "aux" and chosen.map.shape == (8, 8)


def test_an_output_not_fed_by_a_selected_layer_names_the_fix() -> None:
    with pytest.raises(TargetError, match=r"Target\(output=\.\.\.\)"):
        _explain(build(two_outputs=True), layers="all")


def test_class_axis_is_followed_through_a_resize_after_the_head() -> None:
    model = build(resize_head=True)
    explainer = Explainer(model, provider="cpu")
    analysis = explainer.analysis(CASE.shape)
    assert {o.name: o.channel_axis for o in analysis.outputs} == {"main": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guessing needed: the axis is traced
        result = explainer.explain(CASE, layers="all")
    assert result.target["activation"] == "softmax" and result.map.shape == (8, 8)


def test_a_squeezed_single_map_output_is_one_foreground_probability() -> None:
    result = _explain(build(squeeze_output=True, classes=1), method="kwc")
    assert result.target["activation"] == "sigmoid" and result.target["class_index"] == 0
    # Its twin keeps the (N, 1, H, W) head: same weights, so the same explanation.
    twin = _explain(build(classes=1), method="kwc")
    np.testing.assert_array_equal(result.map, twin.map)


def test_class_axis_override_is_checked_and_used() -> None:
    with pytest.raises(TargetError, match="class axis 7"):
        _explain(build(), target=Target(class_axis=7))
    model = build()
    # Read the H axis as 8 "classes": P must be the softmax over H of the raw output, class 1.
    result = _explain(model, target=Target(class_axis=2))
    (logits,) = run_reference(model, {"image": CASE})
    exp = np.exp(logits[0] - logits[0].max(axis=1, keepdims=True))
    np.testing.assert_allclose(result.prediction, exp[:, 1] / exp.sum(axis=1), rtol=1e-5)


def test_an_activation_before_a_resize_is_not_applied_twice() -> None:
    model = build(resize_head=True, softmax_before_resize=True)
    explainer = Explainer(model, provider="cpu")
    result = explainer.explain(CASE, layers="all")
    assert result.target["activation"] == "none"
    (probabilities,) = run_reference(model, {"image": CASE})
    np.testing.assert_allclose(result.prediction, probabilities[0, 1], rtol=1e-6)


def test_when_several_outputs_qualify_the_largest_is_explained_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="'main' also qualifies"):
        result = _explain(build(second_head_channels=3))
    assert result.target["output"] == "edges"
    chosen = _explain(build(second_head_channels=3), target=Target(output="main"))
    # Not bit-identical: the plain twin forms its rows after the decoder's linear readers; here
    # one of those readers (the edges head) is a model output, so the rows run the whole suffix.
    np.testing.assert_allclose(chosen.map, _explain(build()).map, rtol=1e-6, atol=1e-7)


def test_one_explainer_serves_several_targets_without_mixing_them_up() -> None:
    """Sessions and memoised rows are keyed by the whole target, class axis included."""
    shared = Explainer(build(), provider="cpu")
    for target in (Target(), Target(class_index=0), Target(class_axis=2), Target()):
        for method in ("kwc", "scorecam"):
            fresh = Explainer(build(), provider="cpu").explain(CASE, method, target=target)
            np.testing.assert_array_equal(
                shared.explain(CASE, method, target=target).map, fresh.map
            )


@pytest.mark.parametrize("method", ["kwc", "scorecam"])
def test_batch_one_hard_coded_inside_falls_back_to_one_at_a_time(method: str) -> None:
    twin = _explain(build(), method=method)
    with pytest.warns(BatchFallbackWarning, match="at a time"):
        result = _explain(build(hard_batch=True), method=method)
    np.testing.assert_allclose(result.map, twin.map, rtol=1e-6, atol=1e-7)
    chunked = result.session_runs - sum(run.layer_runs for run in result.runs)
    assert chunked == result.forward_passes


def test_inputs_without_a_channel_axis_are_explained_like_their_twin() -> None:
    model = build(no_channel_input=True)
    analysis = Explainer(model, provider="cpu").analysis((1, 8, 8))
    assert (analysis.input.layout, analysis.input.channel_axis) == ("NHW", None)
    for method in ("kwc", "scorecam"):
        result = _explain(model, CASE[:, 0], method=method)
        np.testing.assert_array_equal(result.map, _explain(build(), method=method).map)


@pytest.mark.parametrize("method", ["kwc", "scorecam"])
def test_a_model_that_silently_mixes_batch_rows_is_run_one_case_at_a_time(method: str) -> None:
    """Reshape to a literal batch of 1 runs at batch K but mixes the cases: the load-time
    check must catch it, not only crashes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that keeps its cases apart passes the check
        twin = _explain(build(token_softmax="per-case"), method=method)
    explainer = Explainer(build(token_softmax="hard-coded"), provider="cpu")
    with pytest.warns(BatchFallbackWarning, match="changes with the batch"):
        result = explainer.explain(CASE, method=method)
    np.testing.assert_allclose(result.map, twin.map, rtol=1e-5, atol=1e-6)
    assert all(run.batch_size <= 1 for run in result.runs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap is the model's: no second check or warning
        again = explainer.explain(np.ones((1, 1, 8, 8), np.float32), method=method)
    assert again.session_runs == again.forward_passes

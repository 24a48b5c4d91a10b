"""What a gradient explanation runs: one pass of the backward graph and nothing else.

The backward graph computes the whole forward pass, so when the seed of T is known before the
prediction (the region does not depend on P) that one run is also the observation; a region
taken from the prediction (its largest component) needs the observation first. The
batch-consistency check (three passes of the full model) protects batched runs only, so a
gradient method never pays for it; the first batched method on the same size runs it and still
falls back to one case at a time on a model that mixes batch rows. Behavioural checks (sessions
built, runs recorded), not timings: the machines running the tests are shared and noisy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from segattr_onnx import Explainer, Target
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from tests.builders import build

CASE = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_a_gradient_method_builds_one_session_and_runs_one_pass(method: str) -> None:
    explainer = Explainer(build(), provider="cpu")
    result = explainer.explain(CASE, method)
    engine = explainer._for_shape(CASE.shape).engine
    assert [run.purpose for run in result.runs] == ["observation+gradient"]
    assert result.session_runs == 1
    kinds = sorted(key[0] for key in engine.sessions._sessions)
    assert kinds == ["gradients"]  # no observation session, no full-model batch check


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_a_region_taken_from_the_prediction_observes_first_and_agrees(method: str) -> None:
    """The largest component needs P before the seed exists: two runs. Given as a mask, the
    same region is known up front: one run, and the same explanation."""
    two = Explainer(build(), provider="cpu").explain(
        CASE, method, target=Target(region="largest-component")
    )
    assert [run.purpose for run in two.runs] == ["observation", "gradient"]
    component = Target(region="largest-component").resolve(
        Explainer(build(), provider="cpu").analysis(CASE.shape)
    )
    explainer = Explainer(build(), provider="cpu")
    (logits,) = (
        explainer._for_shape(CASE.shape).engine.observe(CASE, [], component).outputs.values()
    )
    mask = component.region_mask(logits)
    one = explainer.explain(CASE, method, target=Target(region=mask))
    assert [run.purpose for run in one.runs] == ["observation+gradient"]
    # The same graphs, equal up to float32 rounding (the sessions optimise them differently).
    np.testing.assert_allclose(one.map, two.map, rtol=1e-5, atol=1e-6)
    for fused, separate in zip(one.layers, two.layers, strict=True):
        np.testing.assert_allclose(fused.weights, separate.weights, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method", ["kwc", "scorecam"])
def test_the_batch_check_still_runs_before_the_first_batched_method(method: str) -> None:
    explainer = Explainer(build(hard_batch=True), provider="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the gradient method runs no batch and checks nothing
        explainer.explain(CASE, "gradcam")
    with pytest.warns(BatchFallbackWarning, match="at a time"):
        result = explainer.explain(CASE, method)
    assert result.session_runs == result.forward_passes  # one case per run
    twin = Explainer(build(), provider="cpu").explain(CASE, method)
    np.testing.assert_allclose(result.map, twin.map, rtol=1e-6, atol=1e-7)

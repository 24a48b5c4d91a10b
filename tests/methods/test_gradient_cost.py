"""What a gradient explanation runs (issue 12): its two passes and nothing else.

The batch-consistency check (three passes of the full model) protects batched runs only, so a
gradient method never pays for it; the first batched method on the same size runs it and still
falls back to one case at a time on a model that mixes batch rows. Behavioural checks (sessions
built, runs recorded), not timings: the machines running the tests are shared and noisy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from segattr_onnx import Explainer
from segattr_onnx.runtime.executor import BatchFallbackWarning
from tests.builders import build

CASE = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_a_gradient_method_builds_two_sessions_and_runs_two_passes(method: str) -> None:
    explainer = Explainer(build(), provider="cpu")
    result = explainer.explain(CASE, method)
    engine = explainer._for_shape(CASE.shape).engine
    assert [run.purpose for run in result.runs] == ["observation", "gradient"]
    assert result.session_runs == 2
    kinds = sorted(key[0] for key in engine.sessions._sessions)
    assert kinds == ["gradients", "observe"]  # no full-model session for a batch check


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

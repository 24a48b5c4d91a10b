"""Work items (kernel ablations, masked inputs) are plain data: pickled and run elsewhere,
the same rows.

This is the seam a cluster executor uses: the engine hands each batch of a layer's kernel
ablations to ``engine.executor`` as an ``AblationWork``. Here every item is pickled (as it
would be sent to a worker) and run by a separate executor that shares nothing with the
explainer: its own analysis of the model file, its own sessions. The explanation must be the
same as with the local executor, and every item must have crossed.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from segattr_onnx import Explainer, Target
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.methods.registry import create_method
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.backends import LocalBackend
from segattr_onnx.runtime.work import AblationWork, InputsWork, LocalExecutor
from tests.conftest import fixture


class _RemoteLike:
    """An executor in another 'process': items arrive pickled, its runner is its own."""

    def __init__(self, runner: AblationRunner) -> None:
        # Only what a worker would be sent: the model file, the input size and the seed.
        self.path = runner.analysis.model.path
        self.input_shape, self.seed = runner.analysis.input.shape, runner.seed
        self.received: list[AblationWork] = []
        self._local: LocalExecutor | None = None

    def _receive(self, work, kind):
        item = pickle.loads(pickle.dumps(work))
        assert isinstance(item, kind) and item is not work
        self.received.append(item)
        if self._local is None:
            analysis = analyse_model(self.path, self.input_shape)
            self._local = LocalExecutor(AblationRunner(analysis, "cpu", seed=self.seed))
        return item, self._local

    def run_ablation(self, work, progress=None):
        item, local = self._receive(work, AblationWork)
        yield from local.run_ablation(item, progress)

    def run_inputs(self, work, progress=None):
        item, local = self._receive(work, InputsWork)
        yield from local.run_inputs(item, progress)


@pytest.mark.parametrize(
    ("name", "method", "variant"),
    [
        ("unet2d_torchscript", "kwc", "p2"),
        ("unet2d_torchscript", "ablationcam", "p1"),
        ("unet2d_torchscript", "scorecam", "p2"),
        ("unet3d", "kwc", "p2"),
    ],
)
def test_pickled_work_items_run_elsewhere_give_the_same_explanation(
    name: str, method: str, variant: str
) -> None:
    fx = fixture(name)
    x = fx.input(0)
    target = Target(class_index=1)
    local = Explainer(fx.path, provider="cpu").explain(x, method, target=target, variant=variant)
    executors: list[_RemoteLike] = []

    class RemoteLikeBackend(LocalBackend):
        def case_executor(self, explainer: Explainer, runner: AblationRunner) -> _RemoteLike:
            executors.append(_RemoteLike(runner))
            return executors[-1]

    explainer = Explainer(fx.path, provider="cpu", executor=RemoteLikeBackend())
    shipped = explainer.explain(x, method, target=target, variant=variant)
    (remote,) = executors
    shipped_runs = [r for r in local.runs if r.purpose in ("ablation", "masked-input")]
    assert len(remote.received) == len(shipped_runs) > 0
    np.testing.assert_allclose(shipped.map, local.map, rtol=1e-6, atol=1e-7)
    for a, b in zip(shipped.layers, local.layers, strict=True):
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-6, atol=1e-9)


def test_masked_input_requests_are_data_that_rebuild_the_same_inputs_elsewhere() -> None:
    from segattr_onnx.methods.base import MaskedInputRequest
    from segattr_onnx.metrics import scoring

    fx = fixture("unet2d_torchscript")
    explainer = Explainer(fx.path, provider="cpu")
    prepared = explainer.case(fx.input(0), Target(class_index=1), "decoder")
    layer = prepared.layers[0]
    requests = list(create_method("scorecam").requests(prepared.case, layer))
    captured: list[MaskedInputRequest] = []
    original_run = explainer.run

    def capture(prepared_case, reqs, *args, **kwargs):
        captured.extend(reqs)
        return original_run(prepared_case, reqs, *args, **kwargs)

    explainer.run = capture
    attribution = np.random.default_rng(0).random(prepared.case.spatial_shape)
    scoring.score_map(explainer, fx.input(0), attribution, target=Target(class_index=1), steps=4)
    for request in [*requests, *captured]:
        copy = pickle.loads(pickle.dumps(request))
        for start, stop in ((0, 1), (1, min(request.count, 5))):
            np.testing.assert_array_equal(
                copy.make_inputs(start, stop), request.make_inputs(start, stop)
            )
    assert {r.layer for r in captured} == {"scoring"} and len(requests) == 1

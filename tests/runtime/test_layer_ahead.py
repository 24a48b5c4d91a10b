"""The next layer's start made on a helper thread (runtime/layer_ahead.py)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from segattr_onnx import Explainer, Target
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.work import LocalExecutor
from tests.conftest import fixture


def _explain(ahead: bool, **options):
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu", **options)
    runner = explainer._for_shape(x.shape).engine.ablation
    runner.streams = 2  # as on a CPU with cores to share, whatever the machine running this
    runner.layers_ahead = ahead
    explanation = explainer.explain(x, "kwc", "decoder", target=Target(class_index=1))
    return explanation, runner


def _assert_identical(actual, expected) -> None:
    np.testing.assert_array_equal(actual.map, expected.map)
    for a, b in zip(actual.layers, expected.layers, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
        for name in b.terms:
            np.testing.assert_array_equal(a.terms[name], b.terms[name])


def _assert_nothing_held(runner: AblationRunner) -> None:
    assert runner.tables.in_use_bytes == 0
    assert not runner.ahead.pending


def test_layers_started_ahead_give_the_same_explanation_bit_for_bit() -> None:
    inline, runner = _explain(ahead=False)
    assert runner.ahead.begun == 0
    ahead, runner = _explain(ahead=True)
    # Every linear layer after the first started ahead (the last one runs its suffix).
    ablations = [run for run in ahead.runs if run.purpose == "ablation"]
    linear = sum(run.graph == "linear" for run in ablations[1:])
    assert linear >= 3 and runner.ahead.begun == runner.ahead.taken == linear
    _assert_identical(ahead, inline)
    _assert_nothing_held(runner)


def test_a_start_that_fails_on_the_helper_is_made_again_by_its_layer(monkeypatch) -> None:
    inline, _ = _explain(ahead=False)
    original = AblationRunner._formed_tables

    def failing_on_the_helper(self, *args):
        if threading.current_thread().name.startswith("segattr-ahead"):
            raise MemoryError("no room on the helper thread")
        return original(self, *args)

    monkeypatch.setattr(AblationRunner, "_formed_tables", failing_on_the_helper)
    ahead, runner = _explain(ahead=True)
    assert runner.ahead.begun >= 2 and runner.ahead.taken == 0
    _assert_identical(ahead, inline)
    _assert_nothing_held(runner)


def test_a_start_made_for_other_rows_is_dropped(monkeypatch) -> None:
    inline, _ = _explain(ahead=False)
    original = LocalExecutor.expect_ablation

    def other_rows(self, work):  # an announcement that does not match what will run
        original(self, dataclasses.replace(work, masks=work.masks[::-1].copy()))

    monkeypatch.setattr(LocalExecutor, "expect_ablation", other_rows)
    ahead, runner = _explain(ahead=True)
    assert runner.ahead.begun >= 2 and runner.ahead.taken == 0
    _assert_identical(ahead, inline)
    _assert_nothing_held(runner)


def test_nothing_starts_ahead_under_a_whole_process_budget() -> None:
    # The budget's slack was measured for one table and one chunk at a time.
    _, runner = _explain(ahead=True, memory_budget=1 << 30)
    assert runner.bounds_process and runner.ahead.begun == 0
    _assert_nothing_held(runner)


def test_a_start_nobody_takes_is_freed_at_the_end_of_the_run(monkeypatch) -> None:
    # The announced layer never runs (the caller stops after the current one): the start
    # made for it is waited for and its table memory given back.
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    runner.streams = 2
    original = AblationRunner._chunks
    runs: list[str] = []

    def stopping_after_two(self, x, layer, *args):
        runs.append(layer)
        if len(runs) == 3:
            raise RuntimeError("stopped by the caller")
        yield from original(self, x, layer, *args)

    monkeypatch.setattr(AblationRunner, "_chunks", stopping_after_two)
    try:
        explainer.explain(x, "kwc", "decoder", target=Target(class_index=1))
    except RuntimeError:
        pass
    else:
        raise AssertionError("the run should have stopped")
    assert runner.ahead.begun >= 2
    _assert_nothing_held(runner)

"""The next layer's start made on a helper thread (runtime/layer_ahead.py)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import onnx

from segattr_onnx import Explainer, Target
from segattr_onnx.dispatch import PlannedWork
from segattr_onnx.methods.base import AblationRequest, GradientRequest
from segattr_onnx.methods.kwc import OVERLAP
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.layer_ahead import _helper
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.runtime.table_memory import TableMemory
from segattr_onnx.runtime.work import LocalExecutor
from tests.conftest import fixture


def _explain(ahead: bool, **options):
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu", **options)
    runner = explainer._for_shape(x.shape).engine.ablation
    runner.streams = 2  # as on a CPU with cores to share, whatever the machine running this
    runner.cache_bytes = 1  # one row a chunk: a layer's next one starts after its second
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
    # A start nobody took is freed when the helper finishes it (nothing waits for it): let the
    # helper's one thread run out its queue, done-callbacks included, before looking.
    _helper().submit(lambda: None).result()
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
    runner.streams, runner.cache_bytes = 2, 1
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


def test_a_start_made_on_copies_of_the_boundary_is_not_taken(monkeypatch) -> None:
    # Equal values are not enough: the start must come from the very tensors the layer reads.
    original = LocalExecutor.expect_ablation

    def copied_boundary(self, work):
        copies = {name: value.copy() for name, value in work.boundary.items()}
        original(self, dataclasses.replace(work, boundary=copies))

    monkeypatch.setattr(LocalExecutor, "expect_ablation", copied_boundary)
    _, runner = _explain(ahead=True)
    assert runner.ahead.begun >= 2 and runner.ahead.taken == 0
    _assert_nothing_held(runner)


def test_a_taken_start_s_tables_are_the_ones_the_rows_read(monkeypatch) -> None:
    formed_by: list[str] = []
    original = AblationRunner._formed_tables

    def counted(self, *args):
        formed_by.append(threading.current_thread().name)
        return original(self, *args)

    monkeypatch.setattr(AblationRunner, "_formed_tables", counted)
    explanation, runner = _explain(ahead=True)
    linear = sum(run.graph == "linear" for run in explanation.runs if run.purpose == "ablation")
    on_helper = [name for name in formed_by if name.startswith("segattr-ahead")]
    assert len(on_helper) == runner.ahead.taken >= 2
    assert len(formed_by) == linear  # one table per layer: no layer formed its own again


def test_nothing_starts_ahead_with_one_stream_or_without_room(monkeypatch) -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    runner.streams, runner.cache_bytes = 1, 1  # one chunk at a time on every core
    explainer.explain(x, "kwc", "decoder", target=Target(class_index=1))
    assert runner.ahead.begun == 0
    runner.streams = 2
    monkeypatch.setattr(runner.tables, "bytes_after", lambda total: 1 << 60)
    explainer.explain(x + np.float32(0.5), "kwc", "decoder", target=Target(class_index=1))
    assert runner.ahead.begun == 0
    _assert_nothing_held(runner)


def test_a_loop_closed_before_its_rows_are_under_way_leaves_nothing_announced() -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    runner.streams, runner.cache_bytes = 2, 1
    layers = explainer.analysis(x.shape).post_bottleneck
    first, second = layers[0], layers[1]
    channels = runner.ablated(second).site.channels
    prefix = runner.prefix(x, second)
    runner.expect(second, np.eye(channels), prefix.boundary)
    loop = runner.ablate(x, first, np.eye(runner.ablated(first).site.channels))
    next(loop)
    loop.close()  # before its second chunk: the announced layer never started
    assert runner.ahead.begun == 0 and not runner.ahead.pending
    rows = list(runner.ablate(x, second, np.eye(channels), prefix=prefix))
    assert sum(chunk.stop - chunk.start for chunk in rows) == channels
    assert runner.ahead.begun == 0
    _assert_nothing_held(runner)


def test_the_helper_thread_never_builds_a_session() -> None:
    # SessionCache.get records warnings process-wide: the helper only runs sessions made
    # before it started.
    fx = fixture("unet2d_torchscript")
    cache = SessionCache("cpu")
    failures: list[BaseException] = []

    def build_on_the_helper() -> None:
        try:
            cache.get(("full",), lambda: onnx.load(fx.path))
        except BaseException as exc:
            failures.append(exc)

    helper = threading.Thread(target=build_on_the_helper, name="segattr-ahead_0")
    helper.start()
    helper.join()
    assert len(failures) == 1 and "was not made before the helper" in str(failures[0])
    assert len(cache) == 0


def test_tables_take_the_smallest_free_buffer_that_fits() -> None:
    tables = TableMemory()
    f32 = np.dtype(np.float32)
    with tables.take([(10, 10)], f32), tables.take([(100, 10)], f32):
        pass
    assert sorted(b.nbytes for b in tables.buffers()) == [400, 4000]
    assert tables.bytes_after(300) == 4400  # fits the small one: nothing grows
    with tables.take([(3, 25)], f32) as (small,):
        assert any(np.shares_memory(small, b) for b in tables.buffers() if b.nbytes == 400)
        assert tables.bytes_after(2000) == 4400  # the large one is free and fits
        assert tables.bytes_after(8000) == 4400 + 4000  # the large one grows to 8000
    with tables.take([(20, 10)], f32):  # 800 bytes: the 4000 one, the other is kept small
        assert sorted(b.nbytes for b in tables.buffers()) == [400, 4000]
        with tables.take([(1, 10)], f32), tables.take([(1, 10)], f32) as (own,):
            assert tables.bytes_after(100) == 4400 + 40 + 100  # no buffer free: own memory
            assert not any(np.shares_memory(own, b) for b in tables.buffers())
    assert tables.in_use_bytes == 0


def test_only_a_loop_of_ablation_rows_carries_the_next_announcement(monkeypatch) -> None:
    # Work that runs no ablation rows here (a gradient pass, rows all in the memo) would leave
    # the announcement to the next loop, which is the announced layer itself.
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=4)
    explainer = Explainer(fx.path, provider="cpu")
    prepared = explainer.case(x, Target(class_index=1), "decoder", ablation_form="block")
    engine = prepared.sized.engine
    engine.ablation.streams = 2
    executor = engine.executor
    announced: list[str] = []
    monkeypatch.setattr(executor, "expect_ablation", lambda work: announced.append(work.layer))
    first, second = (layer.name for layer in prepared.layers[:2])

    def planned(request, missing: int) -> PlannedWork:
        return PlannedWork(request, np.arange(missing), "linear", 1, 1, missing, 0)

    def rows(layer: str) -> AblationRequest:
        channels = engine.ablation.ablated(layer).site.channels
        return AblationRequest(layer, np.eye(channels), "block", OVERLAP)

    upcoming = planned(rows(second), 2)
    for current, expected in (
        (planned(GradientRequest(first), 1), []),
        (planned(rows(first), 0), []),  # every row already in the memo: no loop runs
        (planned(rows(first), 4), [second]),
    ):
        announced.clear()
        engine.dispatch.announce(
            current, upcoming, prepared.case, prepared.observation, True, 1 << 30, executor
        )
        assert announced == expected

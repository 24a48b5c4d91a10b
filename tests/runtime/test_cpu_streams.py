"""Chunks in flight at once on the CPU (runtime/cpu_streams.py, ChunkedRunner.streams)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from segattr_onnx import Explainer, Target
from segattr_onnx.errors import ModelRunError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.runtime import cpu_streams
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import QUEUED_PER_STREAM, ChunkedRunner, chunk_size
from segattr_onnx.runtime.sessions import SessionCache, create_session
from segattr_onnx.runtime.work import InputsWork, LazyRows, LocalExecutor
from tests.conftest import fixture


@pytest.fixture
def concurrent_loops(monkeypatch) -> list[int]:
    """The streams of every loop that ran chunks concurrently, as they start."""
    started: list[int] = []
    original = ChunkedRunner._concurrent

    def counted(self, *args):
        started.append(self.streams)
        yield from original(self, *args)

    monkeypatch.setattr(ChunkedRunner, "_concurrent", counted)
    return started


def test_two_streams_on_a_cpu_with_cores_to_share(monkeypatch) -> None:
    monkeypatch.setattr(cpu_streams, "usable_cpus", lambda: 8)
    assert cpu_streams.chunk_streams("cpu", None) == 2
    assert cpu_streams.stream_threads(2) == 4
    assert cpu_streams.stream_threads(1) is None  # ONNX Runtime's default
    # A caller's thread cap is its whole share of the machine; a GPU runs one chunk at a time.
    assert cpu_streams.chunk_streams("cpu", 1) == 1
    assert cpu_streams.chunk_streams("cpu", 4) == 1
    assert cpu_streams.chunk_streams("cuda", None) == 1
    monkeypatch.setattr(cpu_streams, "usable_cpus", lambda: 1)
    assert cpu_streams.chunk_streams("cpu", None) == 1


def test_streams_share_the_cache_and_the_budget() -> None:
    roomy = 10**9
    assert chunk_size(100, 1000, roomy, False, cache_bytes=8000) == 8
    assert chunk_size(100, 1000, roomy, False, cache_bytes=8000, streams=2) == 4
    assert chunk_size(100, 1000, 6000, False, streams=2) == 3
    assert chunk_size(100, 1000, 1500, False, streams=2) == 1  # never less than one item


def _scaling_model() -> onnx.ModelProto:
    """y = x · w + k, w a shared feed, x batched: every row's output tells which row it was."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "k"], ["y"])],
        "scaling",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("k", TensorProto.FLOAT, [1], [0.5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


class _MeetingSession:
    """A session whose runs after the first ``alone`` wait for each other in pairs: they pass
    only when two run at the same time (run one after another, they break the barrier)."""

    def __init__(self, session, alone: int, pairs: int = 1) -> None:
        self._session = session
        self._barrier = threading.Barrier(2, timeout=20)
        self._meeting = range(alone + 1, alone + 1 + 2 * pairs)
        self.threads: list[int] = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding, run_options=None):
        with self.lock:
            self.threads.append(threading.get_ident())
            meets = len(self.threads) in self._meeting
        if meets:
            self._barrier.wait()
        return self._session.run_with_iobinding(binding, run_options)


def _rows(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 4)


def test_chunks_run_at_once_and_come_back_in_order_with_the_same_values() -> None:
    model = _scaling_model()
    shared = {"w": np.full((1, 4), 2.0, np.float32)}
    x = _rows(9)
    session = _MeetingSession(create_session(model, "cpu"), alone=1)
    runner = ChunkedRunner(session, streams=2)
    seen: list[int] = []
    chunks = list(runner.iter_chunks(shared, {"x": x}, ["y"], 2, seen.append))
    # The first chunk of a real batch runs alone (a hard-coded batch of 1 fails there first);
    # the next two met at the barrier, so they ran at the same time.
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert seen == [2, 2, 2, 2, 1] and runner.runs == 5
    assert len(set(session.threads[1:3])) == 2
    serial = ChunkedRunner(create_session(model, "cpu"))
    alone = list(serial.iter_chunks(shared, {"x": x}, ["y"], 2))
    for ours, theirs in zip(chunks, alone, strict=True):
        np.testing.assert_array_equal(ours.outputs["y"], theirs.outputs["y"])
    np.testing.assert_array_equal(np.concatenate([c.outputs["y"] for c in chunks]), x * 2 + 0.5)


def test_lazy_rows_are_built_in_order_on_the_calling_thread() -> None:
    """A lazy stack may draw its rows from one random stream: its order must not depend on
    which chunk finished first."""
    calls: list[tuple[int, int, int]] = []

    def make(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop, threading.get_ident()))
        return _rows(stop)[start:stop]

    runner = ChunkedRunner(create_session(_scaling_model(), "cpu"), streams=2)
    shared = {"w": np.ones((1, 4), np.float32)}
    chunks = list(runner.iter_chunks(shared, {"x": LazyRows(7, make)}, ["y"], 1))
    assert [(start, stop) for start, stop, _ in calls] == [(i, i + 1) for i in range(7)]
    assert {thread for *_, thread in calls} == {threading.get_ident()}
    np.testing.assert_array_equal(np.concatenate([c.outputs["y"] for c in chunks]), _rows(7) + 0.5)


class _NumberedSession:
    """A session that numbers its runs (from 1, across threads) and calls ``before(number)``
    as each starts."""

    def __init__(self, session, before) -> None:
        self._session = session
        self._before = before
        self.calls = 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, binding, run_options=None):
        with self.lock:
            self.calls += 1
            number = self.calls
        self._before(number)
        return self._session.run_with_iobinding(binding, run_options)


def test_a_failing_chunk_fails_the_loop_and_nothing_runs_after_it() -> None:
    def fail_third(number: int) -> None:
        if number == 3:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : planted")

    session = _NumberedSession(create_session(_scaling_model(), "cpu"), fail_third)
    runner = ChunkedRunner(session, streams=2)
    loop = runner.iter_chunks({"w": np.ones((1, 4), np.float32)}, {"x": _rows(6)}, ["y"], 1)
    with pytest.raises(ModelRunError, match="planted"):
        list(loop)
    calls = session.calls
    threading.Event().wait(0.2)
    assert session.calls == calls  # no chunk was left running or started after the failure


def test_a_loop_left_early_waits_for_its_running_chunks() -> None:
    session = _MeetingSession(create_session(_scaling_model(), "cpu"), alone=20, pairs=0)
    runner = ChunkedRunner(session, streams=2)
    loop = runner.iter_chunks({"w": np.ones((1, 4), np.float32)}, {"x": _rows(20)}, ["y"], 1)
    next(loop)
    loop.close()
    started = len(session.threads)
    threading.Event().wait(0.2)
    # The one taken, and at most the queued chunks (the ones not started yet are cancelled).
    assert len(session.threads) == started <= 1 + QUEUED_PER_STREAM * 2


def test_a_stream_that_finishes_early_takes_the_next_chunk_at_once() -> None:
    # The caller waits for chunk 0 while stream B, done with chunk 1, must start chunk 2
    # from the queue: with only one chunk per stream submitted, chunk 2 would wait for the
    # caller to take chunk 0, which waits for chunk 2.
    third = threading.Event()

    def first_waits_for_third(number: int) -> None:
        if number == 3:
            third.set()
        if number == 1 and not third.wait(timeout=20):
            raise RuntimeError("no third chunk started while the first one ran")

    session = _NumberedSession(create_session(_scaling_model(), "cpu"), first_waits_for_third)
    runner = ChunkedRunner(session, streams=2)
    shared = {"w": np.full((1, 4), 3.0, np.float32)}
    chunks = list(runner.iter_chunks(shared, {"x": _rows(6)}, ["y"], 1))
    assert [c.start for c in chunks] == list(range(6))
    np.testing.assert_array_equal(
        np.concatenate([c.outputs["y"] for c in chunks]), 3.0 * _rows(6) + 0.5
    )


def test_only_items_that_fit_the_cache_run_in_streams() -> None:
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    runner = AblationRunner(analysis, provider="cpu")
    runner.streams, runner.cache_bytes = 2, 1000
    assert runner.streams_for(1000) == 2
    assert runner.streams_for(1001) == 1  # one item outgrows the cache: memory-bound already
    assert runner.streams_for(None) == 1
    # Two chunks in flight hold two items: a budget for fewer runs one chunk at a time.
    assert runner.streams_for(1000, memory_budget=4000) == 2
    assert runner.streams_for(1000, memory_budget=1500) == 1
    runner.memory_budget = 10**12  # a user's whole-process budget: its slack is for one chunk
    assert runner.bounds_process and runner.streams_for(1000) == 1
    runner.memory_budget = None
    runner.cache_bytes = None  # no cache bound (a GPU)
    assert runner.streams_for(10) == 1


@pytest.mark.parametrize("method", ["kwc", "ablationcam"])
def test_kwc_in_two_streams_is_the_same_explanation(method, concurrent_loops) -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=3)
    concurrent = concurrent_loops

    def explain(streams: int):
        explainer = Explainer(fx.path, provider="cpu")
        ablation = explainer._for_shape(x.shape).engine.ablation
        ablation.streams_for = lambda bytes_per_item, memory_budget=None: streams
        ablation.cache_bytes = 1  # one row a chunk: every layer's rows run in streams
        return explainer.explain(x, method, "decoder", target=Target(class_index=1))

    one = explain(1)
    assert concurrent == []
    two = explain(2)
    assert len(concurrent) == len(two.layers) and set(concurrent) == {2}
    np.testing.assert_allclose(two.map, one.map, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(two.layers, one.layers, strict=True):
        np.testing.assert_allclose(ours.weights, theirs.weights, rtol=1e-6, atol=1e-7)


def _child_loop(queue) -> None:
    runner = ChunkedRunner(create_session(_scaling_model(), "cpu"), streams=2)
    chunks = runner.iter_chunks({"w": np.ones((1, 4), np.float32)}, {"x": _rows(5)}, ["y"], 1)
    queue.put(float(np.concatenate([c.outputs["y"] for c in chunks]).sum()))


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="fork is POSIX")
def test_a_forked_child_runs_chunks_in_threads_of_its_own() -> None:
    """A pipeline may fork workers after an explanation: the parent's chunk threads do not
    exist in the child, and a pool that thinks they do would never run a chunk."""
    parent = ChunkedRunner(create_session(_scaling_model(), "cpu"), streams=2)
    list(parent.iter_chunks({"w": np.ones((1, 4), np.float32)}, {"x": _rows(4)}, ["y"], 1))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_loop, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's chunks never ran")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == float((_rows(5) + 0.5).sum())


@pytest.mark.parametrize("threads, concurrent", [(None, True), (1, False)])
def test_a_worker_with_a_thread_cap_runs_planned_streams_one_at_a_time(
    threads, concurrent, monkeypatch, concurrent_loops
) -> None:
    """A driver plans two streams; a worker capped to one CPU (a Ray actor) must not run two."""
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    sessions = SessionCache("cpu", intra_op_threads=threads)
    runner = AblationRunner(analysis, provider="cpu", sessions=sessions)
    monkeypatch.setattr(cpu_streams, "usable_cpus", lambda: 2)
    runner.streams = cpu_streams.chunk_streams("cpu", threads)
    ran = concurrent_loops
    x = fx.input(seed=2)
    work = InputsWork(
        make_inputs=lambda start, stop: np.repeat(x, stop - start, axis=0),
        count=4,
        outputs=(analysis.outputs[0].name,),
        batch_size=1,
        streams=2,
    )
    chunks = list(LocalExecutor(runner).run_inputs(work))
    assert [(c.start, c.stop) for c in chunks] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert ran == ([2] if concurrent else [])

"""Replaying the ONNX Runtime calls an explanation made: the floor a method is measured against.

Every benchmark that compares segattr-onnx with its floor patches ORT's Python API with a
``RunRecorder`` while an explanation runs, keeping each call's session, feeds and outputs, then
re-runs exactly those calls back to back with ``session.run``: what is left is the time ORT
itself needs for that work, without any of the engine's Python around it.

Calls the engine made from its chunk threads (``segattr-chunk``: several chunks in flight on
the CPU, ``runtime/cpu_streams.py``) are replayed the same way, as many at once as there were
such threads and as many queued; those of its helper thread (``segattr-ahead``: the next
layer's start, ``runtime/layer_ahead.py``) run beside them on a thread of their own, and the
first chunk of each layer's tail waits for them; the others run alone, after everything in
flight, as they did.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_inference_collection import IOBinding

from segattr_onnx.runtime.chunks import QUEUED_PER_STREAM
from segattr_onnx.runtime.layer_ahead import HELPER_THREAD  # the next layer's start

CHUNK_THREADS = "segattr-chunk"  # chunks in flight (runtime/cpu_streams.py)


class RunRecorder:
    """Patches ORT's Python API to record every run (session, feeds, outputs) and its time."""

    def __init__(self) -> None:
        # (session, feeds, outputs, the chunk or helper thread that made the call, or None)
        self.calls: list[tuple[ort.InferenceSession, dict, list[str], str | None]] = []
        self.in_call_seconds = 0.0
        self.recording = False

    def install(self) -> None:
        recorder = self
        original_run = ort.InferenceSession.run
        original_run_binding = ort.InferenceSession.run_with_iobinding
        original_bind_cpu = IOBinding.bind_cpu_input
        original_bind_value = IOBinding.bind_ortvalue_input
        original_bind_output = IOBinding.bind_output
        original_clear_outputs = IOBinding.clear_binding_outputs
        original_copy = IOBinding.copy_outputs_to_cpu

        def feeds_of(binding) -> dict:
            if not hasattr(binding, "_bench_feeds"):
                binding._bench_feeds, binding._bench_outputs = {}, []
            return binding._bench_feeds

        def bind_cpu_input(self, name, value):
            feeds_of(self)[name] = value
            return original_bind_cpu(self, name, value)

        def bind_ortvalue_input(self, name, value):
            # The OrtValue itself (kept alive by this reference): copying it to numpy at every
            # bind cost more than some of the runs measured (a linear tail binds its 64 MB
            # contributions once per layer). The replay makes the copy, outside its timing.
            feeds_of(self)[name] = value
            return original_bind_value(self, name, value)

        def bind_output(self, name, *args, **kwargs):
            feeds_of(self)
            self._bench_outputs.append(name)
            return original_bind_output(self, name, *args, **kwargs)

        def clear_binding_outputs(self):
            feeds_of(self)
            self._bench_outputs = []
            return original_clear_outputs(self)

        def copy_outputs_to_cpu(self):
            started = time.perf_counter()
            values = original_copy(self)
            recorder.in_call_seconds += time.perf_counter() - started
            return values

        def run(self, output_names, input_feed, *args, **kwargs):
            started = time.perf_counter()
            values = original_run(self, output_names, input_feed, *args, **kwargs)
            recorder.in_call_seconds += time.perf_counter() - started
            if recorder.recording:
                names = list(output_names or [o.name for o in self.get_outputs()])
                recorder.calls.append((self, dict(input_feed), names, _worker_thread()))
            return values

        def run_with_iobinding(self, binding, *args, **kwargs):
            started = time.perf_counter()
            result = original_run_binding(self, binding, *args, **kwargs)
            recorder.in_call_seconds += time.perf_counter() - started
            if recorder.recording:
                # References, not copies: the engine never writes into a bound array, and
                # copying a linear tail's shared contributions at every chunk cost more time
                # than the run being measured.
                feeds = dict(feeds_of(binding))
                recorder.calls.append((self, feeds, list(binding._bench_outputs), _worker_thread()))
            return result

        self._originals = dict(run=original_run)
        ort.InferenceSession.run = run
        ort.InferenceSession.run_with_iobinding = run_with_iobinding
        IOBinding.bind_cpu_input = bind_cpu_input
        IOBinding.bind_ortvalue_input = bind_ortvalue_input
        IOBinding.bind_output = bind_output
        IOBinding.clear_binding_outputs = clear_binding_outputs
        IOBinding.copy_outputs_to_cpu = copy_outputs_to_cpu

    def replay_seconds(self) -> float:
        """The recorded calls re-run back to back, with the engine's concurrency: ORT's time
        for exactly that work."""
        run = self._originals["run"]
        arrays: dict[int, np.ndarray] = {}  # one copy per bound OrtValue, however many calls
        calls = [
            (session, {k: _as_array(v, arrays) for k, v in feeds.items()}, outputs, thread)
            for session, feeds, outputs, thread in self.calls
        ]
        chunk_threads = {thread for *_, thread in calls if _is(thread, CHUNK_THREADS)}
        streams = max(1, len(chunk_threads))
        chunks: deque = deque()
        starts: deque = deque()

        def drain(futures: deque) -> None:
            while futures:
                futures.popleft().result()

        with ThreadPoolExecutor(streams) as pool, ThreadPoolExecutor(1) as helper:
            started = time.perf_counter()
            tail = None
            for session, feeds, outputs, thread in calls:
                if _is(thread, HELPER_THREAD):  # a next layer's start, beside the rows
                    starts.append(helper.submit(run, session, outputs, feeds))
                    continue
                if thread is None:  # alone, after everything in flight
                    drain(chunks)
                    drain(starts)
                    run(session, outputs, feeds)
                    continue
                if session is not tail:  # a layer's first rows wait for its start
                    drain(starts)
                    tail = session
                if len(chunks) == QUEUED_PER_STREAM * streams:
                    chunks.popleft().result()
                chunks.append(pool.submit(run, session, outputs, feeds))
            drain(chunks)
            drain(starts)
            return time.perf_counter() - started


def _worker_thread() -> str | None:
    name = threading.current_thread().name
    return name if name.startswith((CHUNK_THREADS, HELPER_THREAD)) else None


def _is(thread: str | None, prefix: str) -> bool:
    return thread is not None and thread.startswith(prefix)


def _as_array(value, arrays: dict[int, np.ndarray]):
    """A bound OrtValue as numpy, copied once: a linear tail binds a layer's contributions
    (64 MB on the benchmark U-Net) once for all its runs, and a copy per run held 14 GB."""
    if not isinstance(value, ort.OrtValue):
        return value
    if id(value) not in arrays:
        arrays[id(value)] = np.array(value.numpy())
    return arrays[id(value)]

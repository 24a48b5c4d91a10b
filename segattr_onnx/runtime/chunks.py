"""Running many feeds through one session in memory-bounded chunks.

Every perturbation method reduces to "run this session on K variants of one input": K masks for
the kernels of a layer, K masked images for Score-CAM. This is the one loop that does it. It
splits K into chunks sized from a memory budget (one at a time for models whose batch is fixed
at 1), keeps the inputs shared by all chunks bound once (on CUDA they are uploaded once), and
yields each chunk's outputs so callers can reduce them without holding all K results.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import threading
import warnings
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from segattr_onnx.errors import ModelRunError
from segattr_onnx.runtime.memory import room_for_runs
from segattr_onnx.runtime.providers import device_of

if TYPE_CHECKING:  # imported where used: the CLI reads this module's defaults at start-up
    import onnx
    import onnxruntime as ort

DEFAULT_BUDGET_FRACTION = 0.25
_FALLBACK_AVAILABLE = 4 << 30
_FALLBACK_GPU_BUDGET = 2 << 30
NVIDIA_SMI_TIMEOUT_S = 5.0
# A run's resident growth over its estimated bytes per item (``ablation.run_bytes_per_item``),
# with the shared arena: 1.4x on the benchmark 2D U-Net at 256² (16 and 384 channels wide),
# where the arena rounds blocks up and keeps the host's output copies beside its own.
PROCESS_SLACK = 2.0
# The arena keeps the pages of earlier runs, and they count as held when a batch is sized, so
# batches shrink as it grows. Only when a batch would be down to one item are its free pages
# given back first: releasing them for every loop cost KWC 10-30% of its time on the 2D
# benchmark U-Net at 256² (each loop faults its pages in afresh), small batches almost nothing.
RELEASE_BELOW_BATCH = 2
# Chunks cut and submitted per stream (``ChunkedRunner._concurrent``). With one per stream, a
# stream whose chunk ended first sat idle until the caller had taken the older chunk and cut
# the next: on the benchmark U-Net's KWC one stream ran alone for 0.3-0.57 s of 3.3-4.2 s.
# Two per stream left 0.12 s, and the explanation took 0.90x the time (interleaved runs, wall
# clock; 1.5 and 3 per stream measured 0.93x and 0.97x). The extra chunks hold their inputs
# until a stream takes them, and finished ones their outputs until the caller does: not
# counted in a batch's memory, so a whole-process budget runs one stream, without a queue
# (``AblationRunner.streams_for``).
QUEUED_PER_STREAM = 2


def available_memory_bytes() -> int:
    """Free memory as the kernel reports it (MemAvailable), without a psutil dependency."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_AVAILABLE


def default_memory_budget(device: str = "cpu") -> int:
    """Bytes one chunk of runs may take: a quarter of the free memory where chunks live.

    ``device`` is where the sessions run (``ChunkedRunner.device``, ``Explainer.device``). On the
    CPU that is the host's MemAvailable. On CUDA the activations of a chunk live in GPU memory,
    so it is the free memory of the GPU the sessions use: ``nvidia-smi``'s figure for the first
    entry of ``CUDA_VISIBLE_DEVICES`` (GPU 0 without it), read once per process, since later
    readings would count this process's own ONNX Runtime arena as used. (An index there counts
    in PCI bus order, which is CUDA's order only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; a UUID is
    exact.) Without a reading (no nvidia-smi, an error, a MIG slice it cannot report) the budget
    is a fixed 2 GiB, small enough for any GPU the CUDA provider runs on.
    """
    if device == "cpu":
        return int(available_memory_bytes() * DEFAULT_BUDGET_FRACTION)
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu = visible.split(",")[0].strip() if visible is not None else "0"
    free = _free_gpu_memory_bytes(gpu) if gpu and gpu != "-1" else None
    if free is None:
        return _FALLBACK_GPU_BUDGET
    return int(free * DEFAULT_BUDGET_FRACTION)


@functools.cache
def _free_gpu_memory_bytes(gpu: str) -> int | None:
    """Free memory of one GPU (an index or UUID, as nvidia-smi --id takes it); None if unknown.

    nvidia-smi rather than a CUDA binding: it needs no new dependency and no CUDA context (which
    would take GPU memory itself). The timeout keeps a hung driver from stalling explanations.
    """
    command = [
        "nvidia-smi",
        "--query-gpu=memory.free",
        "--format=csv,noheader,nounits",
        f"--id={gpu}",
    ]
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True
        )
        mebibytes = float(completed.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return int(mebibytes * (1 << 20)) if mebibytes > 0 else None


def chunk_size(
    total: int,
    bytes_per_item: int | None,
    memory_budget: int | None,
    fixed_batch: bool,
    whole_process: bool = False,
    cache_bytes: int | None = None,
    streams: int = 1,
) -> int:
    """How many feeds to run at once: as many as the budget holds, at least 1.

    With ``whole_process`` the budget bounds the process's resident memory (CPU sessions): the
    room is what it leaves beside what the process holds now (``memory.room_for_runs``), and an
    item costs ``PROCESS_SLACK`` times its estimate. Otherwise the budget is the room itself
    (GPU memory for CUDA sessions, where the process's host memory does not grow with a batch).
    ``cache_bytes`` (CPU sessions: ``cpu_cache.batch_cache_bytes``) also bounds the batch to what
    that cache holds, at least 1: a wider batch only streams its activations through memory.
    ``streams`` chunks run at once (``ChunkedRunner.streams``): they share the cache and the
    budget, so each item counts that many times.
    """
    if fixed_batch or total <= 1:
        return 1
    if not bytes_per_item:
        return min(total, 8)
    bytes_per_item *= max(1, streams)
    if cache_bytes is not None:
        total = min(total, max(1, cache_bytes // bytes_per_item))
    if whole_process and memory_budget is not None:
        cost = math.ceil(bytes_per_item * PROCESS_SLACK)
        room = room_for_runs(memory_budget)
        if room is not None and room // cost < min(total, RELEASE_BELOW_BATCH):
            from segattr_onnx.runtime.sessions import release_free_arena

            if release_free_arena():
                room = room_for_runs(memory_budget)
        if room is not None:
            return max(1, min(total, room // cost))
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    return max(1, min(total, budget // bytes_per_item))


def budget_holds(
    items: int, bytes_per_item: int | None, memory_budget: int | None, whole_process: bool = False
) -> bool:
    """Whether the budget alone (no cache bound, a free batch) holds ``items`` items at once:
    what ``items`` chunks in flight need at the least."""
    held = chunk_size(items, bytes_per_item, memory_budget, False, whole_process=whole_process)
    return held >= items


class BatchFallbackWarning(UserWarning):
    """The model failed at a batch > 1 (a batch of 1 hard-coded inside); runs go one by one."""


@dataclass
class BatchCap:
    """The largest batch a model has been seen to accept, shared by all its runners."""

    limit: int | None = None

    def apply(self, batch_size: int) -> int:
        return batch_size if self.limit is None else max(1, min(batch_size, self.limit))


@dataclass(frozen=True)
class OutputHead:
    """Nodes appended after a model's outputs so each run returns reductions, not predictions.

    ``key`` names the transform for the session cache; ``feeds`` are shared by every chunk.
    """

    key: Hashable
    attach: Callable[[onnx.ModelProto], onnx.ModelProto]
    outputs: tuple[str, ...]
    feeds: dict[str, np.ndarray]


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    outputs: dict[str, np.ndarray]


class ChunkedRunner:
    """Runs a session over a stack of varying feeds, with shared feeds bound once.

    With ``streams`` > 1 (CPU sessions, ``cpu_streams.py``) that many chunks run at once, each
    on its own binding of the same session (ONNX Runtime runs one session from several threads);
    chunks are still cut, fed and yielded in order, so results do not depend on it.
    """

    def __init__(
        self, session: ort.InferenceSession, cap: BatchCap | None = None, streams: int = 1
    ) -> None:
        self.session = session
        self.device = device_of(session)
        self.cap = cap if cap is not None else BatchCap()
        self.streams = max(1, streams)
        self.runs = 0  # session runs made, for tests and benchmarks

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None):
        """One plain run; returns outputs by name."""
        names = (
            list(outputs) if outputs is not None else [o.name for o in self.session.get_outputs()]
        )
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # ORT's own exception types
            raise ModelRunError(
                f"ONNX Runtime failed running the model: {_first_line(exc)}"
            ) from exc
        self.runs += 1
        return dict(zip(names, values, strict=True))

    def run_into(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """One run writing each output into the caller's array (C-contiguous, of the output's
        exact shape and type): on the CPU, ONNX Runtime writes straight into that memory, so a
        large output is neither copied out nor allocated twice."""
        import onnxruntime as ort

        try:
            if self.device != "cpu":
                values = self.session.run(list(outputs), feeds)
                for target, value in zip(outputs.values(), values, strict=True):
                    np.copyto(target, value)
            else:
                binding = self.session.io_binding()
                for name, value in feeds.items():
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                for name, target in outputs.items():
                    binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(target))
                self.session.run_with_iobinding(binding)
        except Exception as exc:  # ORT's own exception types
            raise _run_error(exc) from exc
        self.runs += 1

    def iter_chunks(
        self,
        shared: dict[str, np.ndarray],
        batched: dict[str, np.ndarray],
        outputs: Sequence[str],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Chunk]:
        """Yield outputs for ``batched[...][start:stop]`` chunk by chunk (axis 0 is K)."""
        if not batched:
            raise ValueError("iter_chunks needs at least one batched feed")
        total = len(next(iter(batched.values())))
        import onnxruntime as ort

        # Keep shared values alive as OrtValues on the device for the whole loop.
        shared_values = {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            for name, value in shared.items()
        }
        bindings: dict[int, ort.IOBinding] = {}  # one per thread that runs chunks

        def run(inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
            binding = bindings.get(threading.get_ident())
            if binding is None:
                binding = bindings[threading.get_ident()] = self.session.io_binding()
                for name, value in shared_values.items():
                    binding.bind_ortvalue_input(name, value)
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            binding.clear_binding_outputs()
            for name in outputs:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            values = dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))
            _check_rows(values, rows)
            return values

        def inputs_of(start: int, stop: int) -> dict[str, np.ndarray]:
            # Cut on the calling thread, in order: a lazy stack may draw from a random stream.
            return {n: np.ascontiguousarray(v[start:stop]) for n, v in batched.items()}

        batch_size = self.cap.apply(batch_size)
        start = 0
        # The first chunk runs alone when it is a real batch: a model that hard-codes a batch
        # of 1 fails there, and the loop goes on one by one.
        while start < total and (self.streams == 1 or (start == 0 and batch_size > 1)):
            stop = min(total, start + batch_size)
            try:
                values = run(inputs_of(start, stop), stop - start)
            except _ChunkRowsError:
                raise
            except Exception as exc:  # ORT raises its own Fail/InvalidArgument/RuntimeException
                if stop - start > 1 and start == 0:
                    # Many exports declare a free batch but Reshape to a literal 1 inside.
                    warnings.warn(
                        f"the model fails on a batch of {stop - start} although its batch dim "
                        "is free (it likely hard-codes batch 1 inside); running one at a time",
                        BatchFallbackWarning,
                        stacklevel=2,
                    )
                    self.cap.limit = batch_size = 1
                    continue
                raise _run_error(exc) from exc
            self.runs += 1
            yield Chunk(start, stop, values)
            if progress is not None:
                progress(stop - start)
            start = stop
        if start < total:
            yield from self._concurrent(run, inputs_of, start, total, batch_size, progress)

    def _concurrent(
        self,
        run: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]],
        inputs_of: Callable[[int, int], dict[str, np.ndarray]],
        start: int,
        total: int,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> Iterator[Chunk]:
        """The chunks from ``start`` on, ``streams`` of them running at once, yielded in
        order. ``QUEUED_PER_STREAM`` chunks per stream are cut and queued, so that a stream
        that finishes early starts the next queued chunk instead of waiting for the caller to
        take the oldest. Chunks still running or queued when the caller stops are waited for
        (or cancelled), never abandoned."""
        pool = _stream_pool(self.streams)
        pending: deque[tuple[int, int, Future]] = deque()
        try:
            while start < total or pending:
                while start < total and len(pending) < QUEUED_PER_STREAM * self.streams:
                    stop = min(total, start + batch_size)
                    pending.append(
                        (start, stop, pool.submit(run, inputs_of(start, stop), stop - start))
                    )
                    start = stop
                first, last, future = pending.popleft()
                try:
                    values = future.result()
                except _ChunkRowsError:
                    raise
                except Exception as exc:  # ORT's own exception types
                    raise _run_error(exc) from exc
                self.runs += 1
                yield Chunk(first, last, values)
                if progress is not None:
                    progress(last - first)
        finally:
            for *_, future in pending:
                future.cancel()
            wait([future for *_, future in pending])

    def run_batched(
        self,
        shared: dict[str, np.ndarray],
        batched: dict[str, np.ndarray],
        outputs: Sequence[str],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """All chunks' outputs concatenated along axis 0."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for chunk in self.iter_chunks(shared, batched, outputs, batch_size, progress):
            for name in outputs:
                parts[name].append(chunk.outputs[name])
        return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


class _ChunkRowsError(RuntimeError):
    """A chunk's output lacks a row per input: the graph does not carry the batch through."""


def _check_rows(values: dict[str, np.ndarray], rows: int) -> None:
    for name, value in values.items():
        if value.shape[:1] != (rows,):
            raise _ChunkRowsError(
                f"output {name!r} has {value.shape[0] if value.ndim else 0} rows for a "
                f"chunk of {rows}: the graph does not carry the batch through"
            )


def _run_error(exc: Exception) -> ModelRunError:
    return ModelRunError(f"ONNX Runtime failed running the model: {_first_line(exc)}")


_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the parent's pool threads do not exist there, and a pool that
    thinks it has its workers would never run a chunk."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def worker_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's ``workers`` threads named ``name`` (made once: a loop of a few chunks
    should not pay for starting threads)."""
    with _pools_lock:
        pool = _pools.get((name, workers))
        if pool is None:
            pool = _pools[name, workers] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool


def _stream_pool(streams: int) -> ThreadPoolExecutor:
    """The process's threads for ``streams`` chunks at once."""
    return worker_pool("segattr-chunk", streams)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[-1] if text else type(exc).__name__)[:300]


def planned_runs(total: int, batch_size: int) -> int:
    return math.ceil(total / batch_size) if total else 0

"""The Ray executor backend: a pool of actors, each holding one explainer's sessions.

Dataset scale: an audit's case runs go to the actors as they free up, and come back as they
finish. Case scale: one layer's kernel ablations (or one request's masked inputs) are put in
the object store once and split into row ranges over the actors; the driver reassembles the
chunks in order, so the engine sees what the local executor would have given it.

Faults: actors restart when their process dies, and a task running on a dead actor is sent
again (every item is a pure function of its data, so the retry gives the same rows).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.backends import (
    ExecutorError,
    ExecutorOptions,
    ExplainerRecipe,
    option_name,
)
from segattr_onnx.runtime.chunks import Chunk, default_memory_budget
from segattr_onnx.runtime.work import AblationWork, InputsWork
from segattr_ray.worker import Failed, SegattrWorker

IN_FLIGHT = 2  # items queued per actor: the next one waits on the actor, not on the driver
PIECES_PER_WORKER = 2  # a case's rows per actor come in this many ranges, to even out the end
RESTARTS = 3  # an actor whose process dies is restarted (and its running task retried) this often
DEFAULT_WORKER_CPUS = 1.0
# A cluster this backend starts has its idle worker processes import the worker module (and
# with it ONNX Runtime and onnx, a second or so) while the driver gets ready, not when the
# first actor is asked for. ``ray start --system-config`` takes the same for a standing cluster.
WORKER_SYSTEM_CONFIG = {"preload_python_modules": ["segattr_ray.worker"]}


class WorkerPool:
    """Actors built from one recipe; ``imap`` keeps each of them busy."""

    def __init__(self, recipe: ExplainerRecipe, options: ExecutorOptions) -> None:
        cpus = options.worker_cpus if options.worker_cpus is not None else DEFAULT_WORKER_CPUS
        gpus = options.worker_gpus or 0
        count = options.workers if options.workers is not None else _fitting_workers(cpus, gpus)
        _check_cluster_holds(count, cpus, gpus)
        actor = ray.remote(SegattrWorker).options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
        )
        # One copy of the model in the object store, however many actors (and restarts) read
        # it; every call carries the reference, so a restarted actor rebuilds from the next.
        self.shipped = [ray.put(recipe)]
        started = time.perf_counter()
        self._pending: dict[ray.ObjectRef, tuple[int, Any]] = {}
        self.actors = [actor.remote() for _ in range(count)]
        try:
            self.pids = ray.get([a.pid.remote() for a in self.actors], timeout=600)
            self.start_seconds = time.perf_counter() - started  # for benchmarks
        except GetTimeoutError as exc:
            self.close()
            raise ExecutorError(
                f"{count} Ray worker(s) of {cpus:g} CPU and {gpus:g} GPU did not start within "
                f"10 minutes; other jobs may hold the cluster's resources (give fewer "
                f"{option_name('workers')}, or a smaller {option_name('worker_cpus')} or "
                f"{option_name('worker_gpus')})"
            ) from exc
        except RayActorError as exc:
            self.close()
            raise ExecutorError(f"a Ray worker could not start: {_first_line(exc)}") from exc

    @property
    def size(self) -> int:
        return len(self.actors)

    def current_pids(self) -> list[int]:
        """The actors' process ids now (a restarted actor has a new one)."""
        return ray.get([a.pid.remote() for a in self.actors])

    def items_run(self) -> list[int]:
        """Items each actor's current process has run."""
        return ray.get([a.items_run.remote() for a in self.actors])

    def imap(
        self, submit: Callable[[Any, Any], ray.ObjectRef], items: Iterable
    ) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` of ``submit(actor, item)`` for every item, as each finishes.

        Items are drawn only when an actor has room, so a lazy iterable (an audit's cases,
        read one by one) never sits in memory all at once.
        """
        free = deque(self.actors * IN_FLIGHT)
        pending = self._pending  # what close() cancels if the caller stops early
        pending.clear()
        source = enumerate(items)
        exhausted = False
        while True:
            while free and not exhausted:
                drawn = next(source, None)
                if drawn is None:
                    exhausted = True
                    break
                index, item = drawn
                actor = free.popleft()
                pending[submit(actor, item)] = (index, actor)
            if not pending:
                return
            (done,), _ = ray.wait(list(pending), num_returns=1)
            index, actor = pending.pop(done)
            free.append(actor)
            yield index, _value(done)

    def close(self) -> None:
        """Stop the actors: queued items cancelled, unpacked model files deleted, processes
        ended."""
        for ref in list(self._pending):
            ray.cancel(ref)
        self._pending.clear()
        # A dead or stuck actor keeps its files; its process goes all the same.
        with contextlib.suppress(Exception):
            ray.get([a.cleanup.remote() for a in self.actors], timeout=30)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _fitting_workers(cpus: float, gpus: float) -> int:
    """As many actors as the cluster's CPUs (and GPUs, when asked for) can hold at once."""
    resources = ray.cluster_resources()
    count = int(resources.get("CPU", 1) // cpus)
    if gpus:
        count = min(count, int(resources.get("GPU", 0) // gpus))
        if count < 1:
            raise ExecutorError(
                f"the Ray cluster has {resources.get('GPU', 0):g} GPU(s), fewer than one worker's "
                f"{gpus:g}; give {option_name('worker_gpus')} 0 to run on CPUs"
            )
    return max(count, 1)


def _check_cluster_holds(count: int, cpus: float, gpus: float) -> None:
    """Refuse at once what the cluster can never hold (Ray would wait for it forever)."""
    resources = ray.cluster_resources()
    for kind, each in (("CPU", cpus), ("GPU", gpus)):
        total = resources.get(kind, 0)
        if each and count * each > total:
            raise ExecutorError(
                f"{count} worker(s) of {each:g} {kind} need {count * each:g} {kind}s but the Ray "
                f"cluster has {total:g}; give fewer {option_name('workers')} or less "
                f"{option_name('worker_' + kind.lower() + 's')}"
            )


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A HOST:PORT nobody listens on is refused at once: Ray itself retries for minutes."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(
            f"the Ray address {address!r} is not auto or HOST:PORT (e.g. 10.0.0.5:6379)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there with "
            "'ray start --head --port PORT', or check the address"
        ) from None


def _value(ref: ray.ObjectRef) -> Any:
    try:
        value = ray.get(ref)
    except RayActorError as exc:
        raise ExecutorError(
            f"a Ray worker died {RESTARTS + 1} times running one item, and was given up "
            f"({_first_line(exc)}); check the workers' memory and logs"
        ) from exc
    except RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise ExecutorError(
            f"a Ray worker failed: {type(cause).__name__}: {_first_line(cause)}"
        ) from exc
    if isinstance(value, Failed):
        value.raise_again()
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RayCaseExecutor:
    """Runs one input size's work items over the pool's actors, chunks back in order.

    With an in-graph score head each row comes back as a few numbers; without one, as whole
    predictions, so a piece then holds no more rows than the memory budget has room for
    (``row_bytes``: one row's outputs).
    """

    def __init__(
        self, pool: Callable[[], WorkerPool], input_shape: tuple[int, ...], row_bytes: int
    ) -> None:
        self._pool = pool
        self.input_shape = input_shape
        self.row_bytes = max(row_bytes, 1)

    def run_ablation(
        self, work: AblationWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        pool = self._pool()
        shared = ray.put(work)  # masks, input and skip tensors: in the object store once
        budget = work.memory_budget or default_memory_budget("cpu")
        most = None if work.head is not None else budget // (2 * self.row_bytes)
        pieces = _ranges(len(work.masks), pool.size * PIECES_PER_WORKER, most)
        results = pool.imap(
            lambda actor, rows: actor.ablate.remote(pool.shipped, shared, *rows), pieces
        )
        yield from _in_order(results, progress)

    def run_inputs(
        self, work: InputsWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        pool = self._pool()
        shared = ray.put(work)
        most = None if work.head is not None else work.batch_size  # the budget's own batch
        pieces = _ranges(work.count, pool.size * PIECES_PER_WORKER, most)
        shape = self.input_shape
        results = pool.imap(
            lambda actor, rows: actor.predict.remote(pool.shipped, shared, *rows, shape), pieces
        )
        yield from _in_order(results, progress)


def _ranges(total: int, parts: int, most: int | None = None) -> list[tuple[int, int]]:
    """``total`` rows in ``parts`` even ranges, more when a range may hold at most ``most``."""
    if most is not None:
        parts = max(parts, math.ceil(total / max(most, 1)))
    bounds = np.linspace(0, total, min(parts, total) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _in_order(
    results: Iterator[tuple[int, list[Chunk]]], progress: Callable[[int], None] | None
) -> Iterator[Chunk]:
    """Each piece's chunks, pieces in index order; progress counts rows as pieces finish."""
    waiting: dict[int, list[Chunk]] = {}
    next_index = 0
    for index, chunks in results:
        if progress is not None:
            progress(sum(c.stop - c.start for c in chunks))
        waiting[index] = chunks
        while next_index in waiting:
            yield from waiting.pop(next_index)
            next_index += 1


class RayBackend:
    """``--executor ray``: connects to (or starts) a Ray cluster and keeps one actor pool."""

    name = "ray"

    def __init__(self, options: ExecutorOptions) -> None:
        self.options = options
        _check_reachable(options.address)  # before any work, not after the first layer
        self._started = False
        self._pool: WorkerPool | None = None
        self._pool_key: tuple | None = None
        self._recipes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def current_pool(self) -> WorkerPool | None:
        """The actors of the latest run, if any (for tests and benchmarks)."""
        return self._pool

    def _connect(self) -> None:
        """Join the cluster the options (or ``RAY_ADDRESS``, or ``ray start`` on this machine)
        name; with none, start one of this machine for the run."""
        if ray.is_initialized():
            return
        # Ray turns token authentication on and says so on every start or connection: noise
        # for a user who did not ask for a cluster. The notice is left out, the security kept.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        address = self.options.address
        try:
            if address is None and "RAY_ADDRESS" not in os.environ:
                try:
                    ray.init(
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        _system_config=WORKER_SYSTEM_CONFIG,
                    )
                    self._started = True
                    return
                except ValueError as exc:  # 'ray start' runs here: Ray joins it instead
                    if "_system_config" not in str(exc):
                        raise
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ExecutorError(
                f"cannot reach a Ray cluster at {address!r} ({_first_line(exc)}); start one with "
                "'ray start --head' and give its address (or 'auto' on one of its machines)"
            ) from exc

    def _recipe(self, explainer) -> ExplainerRecipe:
        recipe = self._recipes.get(explainer)
        if recipe is None:
            cpus = self.options.worker_cpus or DEFAULT_WORKER_CPUS
            recipe = ExplainerRecipe.of(explainer, intra_op_threads=max(1, math.ceil(cpus)))
            self._recipes[explainer] = recipe
        return recipe

    def pool(self, explainer) -> WorkerPool:
        """The actors for ``explainer`` (built once; another model's replace them)."""
        recipe = self._recipe(explainer)
        key = (recipe.model.digest, *(v for k, v in vars(recipe).items() if k != "model"))
        if self._pool is None or self._pool_key != key:
            self._connect()
            if self._pool is not None:
                self._pool.close()
            self._pool, self._pool_key = WorkerPool(recipe, self.options), key
        return self._pool

    def map(self, explainer, job: Callable, items: Iterable) -> Iterator[tuple[int, Any]]:
        pool = self.pool(explainer)
        yield from pool.imap(lambda actor, item: actor.run.remote(pool.shipped, job, item), items)

    def case_executor(self, explainer, runner: AblationRunner) -> RayCaseExecutor:
        analysis = runner.analysis
        return RayCaseExecutor(
            lambda: self.pool(explainer), tuple(analysis.input.shape), _row_bytes(analysis)
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = self._pool_key = None
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def _row_bytes(analysis) -> int:
    """One re-prediction's outputs, in bytes (float32 upper bound), from the graph's shapes."""
    largest = 0
    for output in analysis.model.proto.graph.output:
        info = analysis.tensors.get(output.name)
        if info is not None and info.shape is not None:
            dims = [d for d in info.shape[1:] if isinstance(d, int)]
            largest = max(largest, 4 * math.prod(dims))
    return largest or 1

"""The next layer's start, made on a helper thread while this layer's rows run.

Before a linear layer's first row can run, its readers run twice (Y(1) and B), its tail's
hoisted part once, and its row tables are formed (``runtime/linear_ablation.py``). Until then
the chunk streams wait: on the benchmark U-Net's KWC that was 0.57-0.8 s of a 3.3-4.2 s
explanation in which nothing but that work ran, on the two cores at 77 %. The engine knows the
layer that comes next, and that layer's start reads only tensors of the observation pass, so
the caller announces it (``AblationRunner.expect``); once the current layer's rows are under
way, the next layer's sessions are made on the calling thread and its start is computed on a
helper thread, in the second table buffer (``runtime/table_memory.py``). The next layer takes
it if it is what was announced (same masks, same boundary tensors, same schedule); anything
else drops it, and the layer computes its start itself, as it does when nothing was announced.

The start is the same arithmetic on the same sessions either way, so the rows and the
explanation are bit for bit those of a run without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from segattr_onnx.runtime.chunks import worker_pool
from segattr_onnx.runtime.table_memory import Tables

HELPER_THREAD = "segattr-ahead"

if TYPE_CHECKING:
    from segattr_onnx.runtime.chunks import OutputHead
    from segattr_onnx.runtime.linear_ablation import LinearSchedule


@dataclass
class LinearStart:
    """What a linear layer's rows need before the first chunk: the readers' Y(1) and B, the
    feeds every chunk shares, the source of the contributions, and (when made ahead) the first
    segment's formed tables, held until the layer releases them."""

    bases: list[dict[str, np.ndarray]]
    shared: dict[str, np.ndarray]
    source: np.ndarray
    tables: Tables | None = None


@dataclass(frozen=True, eq=False)
class Announced:
    """A layer the caller will run next, with what its rows will be run on."""

    layer: str
    form: str
    masks: np.ndarray
    boundary: dict[str, np.ndarray]
    memory_budget: int | None
    head: OutputHead | None = None  # what its rows run with (its tail session is made ahead)


@dataclass
class _Started:
    announced: Announced
    schedule: LinearSchedule
    future: Future[LinearStart] = field(repr=False)


class LayerAhead:
    """The one announced layer, and its start once begun."""

    def __init__(self) -> None:
        self._announced: Announced | None = None
        self._started: _Started | None = None
        self.begun = 0  # starts begun on the helper thread, for tests and benchmarks
        self.taken = 0  # of them, taken by their layer

    @property
    def pending(self) -> bool:
        """Whether a layer is announced, or a start begun and neither taken nor dropped."""
        return self._announced is not None or self._started is not None

    def announce(self, announced: Announced) -> None:
        """The layer after the one about to run (a start already begun stays: it is the
        start of the layer about to run)."""
        self._announced = announced

    def take_announced(self) -> Announced | None:
        announced, self._announced = self._announced, None
        return announced

    def begin(
        self, announced: Announced, schedule: LinearSchedule, job: Callable[[], LinearStart]
    ) -> None:
        """Compute ``job()`` on the helper thread."""
        self.drop()
        self._started = _Started(announced, schedule, _helper().submit(job))
        self.begun += 1

    def take(
        self,
        key: tuple[str, str],
        masks: np.ndarray,
        boundary: dict[str, np.ndarray],
        schedule: LinearSchedule,
    ) -> LinearStart | None:
        """The start made for this layer, if it was made for exactly these rows; else None
        (and whatever was made is dropped)."""
        started, self._started = self._started, None
        if started is None:
            return None
        announced = started.announced
        matches = (
            (announced.layer, announced.form) == key
            and started.schedule.group == schedule.group
            and started.schedule.segments == schedule.segments
            and announced.masks.shape == np.shape(masks)
            and np.array_equal(announced.masks, masks)
            and set(announced.boundary) == set(boundary)
            and all(boundary[name] is value for name, value in announced.boundary.items())
        )
        if not matches:
            _discard(started.future)
            return None
        try:
            start = started.future.result()
        except Exception:  # the job freed what it took; the layer meets the error again
            return None
        except BaseException:  # interrupted while waiting: freed when the job ends
            _discard(started.future)
            raise
        self.taken += 1
        return start

    def drop(self) -> None:
        """Forget the announced layer and a start no layer took (its table is freed when
        the helper is done with it: nothing here waits)."""
        self._announced = None
        started, self._started = self._started, None
        if started is not None:
            _discard(started.future)


def _discard(future: Future[LinearStart]) -> None:
    """Free a start's table once its job has ended (at once if it has)."""

    def release(done: Future[LinearStart]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # a failed job released what it took
        start = done.result()
        if start.tables is not None:
            start.tables.release()

    future.add_done_callback(release)


def _helper() -> ThreadPoolExecutor:
    """The process's one helper thread (made on first use; forgotten in a forked child, where
    a start it was making never ends: its table buffer stays held, and tables take the other)."""
    return worker_pool(HELPER_THREAD, 1)


def on_helper_thread() -> bool:
    return threading.current_thread().name.startswith(HELPER_THREAD)

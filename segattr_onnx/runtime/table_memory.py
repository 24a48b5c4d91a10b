"""The memory row tables are formed in, kept from one layer to the next and one call to the next.

A linear layer's rows are read from tables of formed rows (``runtime/linear_ablation.py``), up
to hundreds of MB each. Fresh pages are zeroed by the kernel at 1.3-4 GB/s on the machines
here, and a fresh table per layer cost 0.2 s of a KWC explanation of the benchmark U-Net, so
the memory is kept: grown, never shrunk, while it is kept.

There are two buffers: while one layer's rows read one, the next layer's tables are formed in
the other (``runtime/layer_ahead.py``). Each buffer is held by one table at a time; when both
are held (a caller interleaving loops), a table gets memory of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

BUFFERS = 2


class Tables:
    """Views of ``shapes`` in memory held until ``release`` (or the end of a ``with`` block).

    Released by whichever thread is done with them: a table formed on a helper thread is
    read, then released, by the thread that runs the layer's rows.
    """

    def __init__(
        self, views: list[np.ndarray], nbytes: int, on_release: Callable[[], None]
    ) -> None:
        self.views = views
        self.nbytes = nbytes
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()

    def __enter__(self) -> list[np.ndarray]:
        return self.views

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class TableMemory:
    """``BUFFERS`` kept buffers, each handed to one table at a time."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray | None] = [None] * BUFFERS
        self._locks = [threading.Lock() for _ in range(BUFFERS)]
        self._count_lock = threading.Lock()
        self.in_use_bytes = 0  # of tables taken and not yet released
        self._own_bytes = 0  # of those, in memory of their own

    def take(self, shapes: Sequence[tuple[int, int]], dtype: np.dtype) -> Tables:
        """Arrays of ``shapes``, (rows, values) each, one after the other in a free buffer:
        the smallest that fits, else the largest grown to fit; in memory of their own when
        every buffer is held."""
        itemsize = np.dtype(dtype).itemsize
        sizes = [rows * values * itemsize for rows, values in shapes]
        total = sum(sizes)
        free = [slot for slot, lock in enumerate(self._locks) if lock.acquire(blocking=False)]
        chosen = self._choose(free, total)
        for slot in free:
            if slot != chosen:
                self._locks[slot].release()
        memory = None
        if chosen is not None:
            try:
                memory = self._buffers[chosen]
                if memory is None or memory.nbytes < total:
                    self._buffers[chosen] = None  # the smaller one goes before the larger comes
                    memory = self._buffers[chosen] = np.empty(total, np.uint8)
            except BaseException:
                self._locks[chosen].release()
                raise
        else:
            memory = np.empty(total, np.uint8)
        own = total if chosen is None else 0
        with self._count_lock:
            self.in_use_bytes += total
            self._own_bytes += own

        def release() -> None:
            with self._count_lock:
                self.in_use_bytes -= total
                self._own_bytes -= own
            if chosen is not None:
                self._locks[chosen].release()

        return Tables(_views(memory, shapes, sizes, dtype), total, release)

    def bytes_after(self, total: int) -> int:
        """The table memory held, kept buffers and tables in memory of their own, once a
        table of ``total`` bytes is taken now."""
        free = [slot for slot, lock in enumerate(self._locks) if not lock.locked()]
        chosen = self._choose(free, total)
        held = self.kept_bytes + self._own_bytes
        if chosen is None:
            return held + total
        current = self._buffers[chosen]
        return held + max(total - (current.nbytes if current is not None else 0), 0)

    def _choose(self, free: Sequence[int], total: int) -> int | None:
        def size(slot: int) -> int:
            buffer = self._buffers[slot]
            return buffer.nbytes if buffer is not None else 0

        fitting = [slot for slot in free if size(slot) >= total]
        if fitting:
            return min(fitting, key=size)
        return max(free, key=size, default=None)

    @property
    def kept_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers if buffer is not None)

    def buffers(self) -> list[np.ndarray]:
        """The kept buffers (for tests)."""
        return [buffer for buffer in self._buffers if buffer is not None]

    def release(self, keep: int = 0) -> None:
        """Free kept buffers, the largest first, until at most ``keep`` bytes are kept (the next
        linear layer makes them again, once). Tables still in use keep their views."""
        while self.kept_bytes > keep:
            largest = max(
                (slot for slot, buffer in enumerate(self._buffers) if buffer is not None),
                key=lambda slot: self._buffers[slot].nbytes,  # type: ignore[union-attr]
            )
            self._buffers[largest] = None


def _views(
    memory: np.ndarray,
    shapes: Sequence[tuple[int, int]],
    sizes: Sequence[int],
    dtype: np.dtype,
) -> list[np.ndarray]:
    """Arrays of ``shapes`` (each ``sizes`` bytes) one after the other in ``memory``."""
    views, start = [], 0
    for (rows, values), size in zip(shapes, sizes, strict=True):
        views.append(memory[start : start + size].view(dtype).reshape(rows, values))
        start += size
    return views

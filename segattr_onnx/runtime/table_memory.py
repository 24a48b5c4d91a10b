"""The memory row tables are formed in, kept from one layer to the next and one call to the next.

A linear layer's rows are read from tables of formed rows (``runtime/linear_ablation.py``), up
to hundreds of MB each. Fresh pages are zeroed by the kernel at 1.3-4 GB/s on the machines
here, and a fresh table per layer cost 0.2 s of a KWC explanation of the benchmark U-Net, so
the memory is kept: grown, never shrunk, while it is kept.

There are two buffers: while one layer's rows read one, the next layer's tables are formed in
the other (``runtime/layer_ahead.py``). Each buffer is held by one table at a time; when both
are held (a caller interleaving loops), a table gets memory of its own.

Only the pages a table writes cost memory and zeroing, so a buffer is made at the size of the
largest table the planned work announced (``expect``), not the size of the table that happens to
come first: a buffer grown table by table is made again each time, and its pages zeroed again
(on the benchmark U-Net 696 MB zeroed per explanation instead of 420 MB).
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
        # The bytes of each buffer that tables have written: its pages in memory.
        self._written = [0] * BUFFERS
        self.in_use_bytes = 0  # of tables taken and not yet released
        self._own_bytes = 0  # of those, in memory of their own
        self._expected = 0  # the largest table announced since the last plan or release

    def expect(self, total: int) -> None:
        """Announce a table of ``total`` bytes: buffers made from now on are at least that
        large, so that it will not replace a buffer a smaller table had written."""
        with self._count_lock:
            self._expected = max(self._expected, total)

    @property
    def announced_bytes(self) -> int:
        """The largest table announced since the last plan or release."""
        return self._expected

    def forget_expected(self) -> None:
        """Drop what was announced (a new plan announces its own tables)."""
        with self._count_lock:
            self._expected = 0

    def take(self, shapes: Sequence[tuple[int, int]], dtype: np.dtype) -> Tables:
        """Arrays of ``shapes``, (rows, values) each, one after the other in a free buffer:
        the smallest that fits (of those, the one whose written pages hold most of them), else
        the largest made again to fit, at the largest announced size; in memory of their own
        when every buffer is held."""
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
                    self._written[chosen] = 0
                    memory = self._buffers[chosen] = _reserved(total, self._expected)
                self._written[chosen] = max(self._written[chosen], total)
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
        if current is None:
            return held + total
        written = self._written[chosen]
        if current.nbytes < total:  # made again: the old pages go
            return held - written + total
        return held + max(total - written, 0)

    def _choose(self, free: Sequence[int], total: int) -> int | None:
        def size(slot: int) -> int:
            buffer = self._buffers[slot]
            return buffer.nbytes if buffer is not None else 0

        def unwritten(slot: int) -> int:
            return max(total - self._written[slot], 0)

        fitting = [slot for slot in free if size(slot) >= total]
        if fitting:  # the smallest; of equal ones, the one whose pages hold most of it
            return min(fitting, key=lambda slot: (size(slot), unwritten(slot)))
        return max(free, key=size, default=None)

    @property
    def kept_bytes(self) -> int:
        """The kept buffers' memory: the pages their tables have written."""
        return sum(
            written
            for buffer, written in zip(self._buffers, self._written, strict=True)
            if buffer is not None
        )

    def buffers(self) -> list[np.ndarray]:
        """The kept buffers (for tests)."""
        return [buffer for buffer in self._buffers if buffer is not None]

    def release(self, keep: int = 0) -> None:
        """Free kept buffers, the one holding most memory first, until at most ``keep`` bytes
        are kept (the next linear layer makes them again, once). Tables still in use keep their
        views. What was announced is forgotten: the next plan announces its own tables."""
        self.forget_expected()
        held = [slot for slot, buffer in enumerate(self._buffers) if buffer is not None]
        for slot in sorted(held, key=lambda slot: self._written[slot], reverse=True):
            if keep > 0 and self.kept_bytes <= keep:
                break
            self._buffers[slot] = None
            self._written[slot] = 0


def _reserved(total: int, expected: int) -> np.ndarray:
    """A buffer for a table of ``total`` bytes, made at the ``expected`` size when larger (its
    pages cost nothing until written), or at ``total`` where the system will not reserve
    that much address space (a strict overcommit policy, an address-space limit)."""
    if expected > total:
        try:
            return np.empty(expected, np.uint8)
        except MemoryError:
            pass
    return np.empty(total, np.uint8)


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

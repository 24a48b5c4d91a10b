"""The whole process's memory, as a budget given by a user must count it.

A user who writes ``--memory-budget 2G`` means the process, not one batch of runs: the Python
interpreter, the model and its rewritten graphs, every ONNX Runtime session and the arena its
runs allocate from. So the room a batch of runs may take is what the budget leaves after the
memory the process already holds, read from the kernel (resident set size) at the moment the
batch is sized, rather than estimated.

ONNX Runtime's CPU arena (``sessions.CPU_MEMORY_ARENA``, one for every session) keeps the pages
of earlier runs for the next ones, and they count as held when a batch is sized; when a batch
would otherwise be down to one item, the arena's free pages are given back first
(``executor.chunk_size``, ``sessions.release_free_arena``).
"""

from __future__ import annotations

import os


class MemoryBudgetWarning(UserWarning):
    """The process alone holds more than the memory budget; batches run one at a time."""


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """The process's resident set size now (None where /proc is not there: not Linux)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int | None:
    """The process's peak resident set size so far (VmHWM), None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


UNESTIMATED_SHARE = 10  # 1/10 of the room


def room_for_runs(process_budget: int) -> int | None:
    """Bytes the next batch of runs may take under a whole-process budget (None: unknown).

    Negative when the process already holds more than the budget; the caller then runs one
    item at a time and says so.
    """
    held = resident_bytes()
    if held is None:
        return None
    room = process_budget - held
    # A tenth is kept back for what no estimate covers: the host copies of the tensors a loop
    # binds once, the allocator's fragmentation (a 100 MiB room was once passed by 7 MiB).
    return room - max(room, 0) // UNESTIMATED_SHARE


def format_bytes(size: int) -> str:
    """``1.5 GiB``, ``320 MiB``: sizes in messages, as ``--memory-budget`` reads them back."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(size) >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"

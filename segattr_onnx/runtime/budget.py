"""Memory budgets as users write them: ``4G``, ``512M``, ``1.5GiB``, bytes, or ``30%`` of free.

The budget bounds how many masks run through a session at once (``executor.chunk_size``). A
fixed size suits a shared server where the job was given N GB; a fraction of free memory suits
a workstation, and is what the default does. A budget is read once, where the user gives it
(command line, audit config), so a typo fails before minutes of work rather than after.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from segattr_onnx.errors import SegattrError
from segattr_onnx.runtime.chunks import available_memory_bytes
from segattr_onnx.text import setting

# IEC prefixes and bare letters count in powers of 1024 (as ``free -h`` and Docker do); the SI
# spellings kB, MB, GB, TB count in powers of 1000, as the standard says.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "ti": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z%]*)\s*$", re.IGNORECASE)
EXAMPLES = "4G, 512M, 1.5GiB, 2000000000 (bytes), 0.3 or 30% (of free memory)"


class MemoryBudgetError(SegattrError):
    """A memory budget that is not a size, or a fraction of free memory outside (0, 1]."""


@dataclass(frozen=True)
class MemoryBudget:
    """A budget in bytes, or a fraction of the memory free when it is resolved (one is set)."""

    size: int | None = None
    fraction: float | None = None

    def resolve(self) -> int:
        """The budget in bytes; a fraction reads free memory now (at least 1 byte)."""
        if self.size is not None:
            return self.size
        assert self.fraction is not None
        return max(1, int(available_memory_bytes() * self.fraction))

    def __str__(self) -> str:
        if self.size is not None:
            return f"{self.size} bytes"
        return f"{self.fraction:.0%} of free memory"


def parse_memory_budget(text: str | int | float, what: str | None = None) -> MemoryBudget:
    """Read ``4G``/``512M``/``1.5GiB``/bytes, or ``0.3``/``30%`` of free memory.

    A plain integer is bytes (so ``1`` is one byte, not all free memory); a plain number with a
    decimal point, or a percentage, is a fraction of free memory. ``what`` names the setting
    in the error message (default: the option, or ``memory_budget`` in Python).
    """
    what = what or setting("--memory-budget", "memory_budget")
    if isinstance(text, bool):  # a TOML `true` is an int to Python; it is no size
        raise MemoryBudgetError(f"{what} {text!r} is not a size; write e.g. {EXAMPLES}")
    if isinstance(text, int):
        return _checked_size(text, str(text), what)
    if isinstance(text, float):
        return _checked_fraction(text, str(text), what)
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in {*_UNITS, "%"}:
        raise MemoryBudgetError(f"{what} {text!r} is not a size; write e.g. {EXAMPLES}")
    number, unit = match.group(1), match.group(2).lower()
    if unit == "%":
        return _checked_fraction(float(number) / 100, text, what)
    if not unit and not number.isdigit():
        return _checked_fraction(float(number), text, what)
    return _checked_size(int(float(number) * _UNITS[unit]), text, what)


def _checked_size(size: int, text: str, what: str) -> MemoryBudget:
    if size < 1:
        raise MemoryBudgetError(f"{what} {text!r} is not a positive size; write e.g. {EXAMPLES}")
    return MemoryBudget(size=size)


def _checked_fraction(fraction: float, text: str, what: str) -> MemoryBudget:
    if not 0 < fraction <= 1:
        raise MemoryBudgetError(
            f"{what} {text!r} is a fraction of free memory outside (0, 1] (0.3 or 30% is "
            "30% of it); for a size give a unit, e.g. 2G"
        )
    return MemoryBudget(fraction=fraction)

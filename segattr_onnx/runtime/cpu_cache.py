"""The size of the CPU's last-level cache, which bounds a CPU batch.

On the CPU, ONNX Runtime runs a batch one operator at a time, so a batch whose activations
outgrow the last-level cache streams every tensor through main memory twice (written by one
operator, read back by the next). A batch that fits keeps them in cache: on the benchmark U-Net
at 256² on a 2-core EPYC with 32 MiB of L3, KWC took 18-23 % less time with batches of one to
two rows than with the 64 rows the memory budget allowed, and a quarter of the memory
(benchmarks/kwc.py: "linear / wide").

A server's last level is shared by all its cores, and a process on a few of them (a VM, a
container) gets a share of it: a 2-core Sapphire Rapids VM reports the socket's 105 MiB, and
KWC ran 15 % slower with batches sized to all of it than with batches sized to 24-48 MiB (the
same batches as on the 2-core EPYC, whose 32 MiB are its own). A batch therefore counts on at
most ``CACHE_PER_CPU`` for each core the process may use.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from segattr_onnx.runtime.cpu_streams import usable_cpus

# Where the size cannot be read (not Linux, a restricted /sys): a common per-socket L3.
FALLBACK_CACHE_BYTES = 8 << 20
# The most of the last level a batch counts on per usable core (see above).
CACHE_PER_CPU = 16 << 20
_SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@functools.cache
def last_level_cache_bytes() -> int:
    """Bytes of the largest data cache CPU 0 reports (sysfs, then sysconf), else a fallback."""
    sizes = [_sysfs_size(index) for index in _cache_indices()]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            sizes.append(int(os.sysconf(name)))
        except (ValueError, OSError, AttributeError):
            continue
    usable = [size for size in sizes if size and size > 0]
    return max(usable) if usable else FALLBACK_CACHE_BYTES


def _cache_indices() -> list[Path]:
    try:
        return sorted(_SYSFS_CACHES.glob("index*"))
    except OSError:
        return []


def _sysfs_size(index: Path) -> int | None:
    """One sysfs cache entry's size ("32768K"), None for an instruction cache or bad text."""
    try:
        if (index / "type").read_text(encoding="ascii").strip() == "Instruction":
            return None
        text = (index / "size").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    unit = _UNITS.get(text[-1:].upper(), 1)
    digits = text[:-1] if text[-1:].upper() in _UNITS else text
    return int(digits) * unit if digits.isdigit() and len(digits) < 12 else None


def batch_cache_bytes(device: str) -> int | None:
    """The cache a batch should fit on ``device``: the CPU's last level, at most this process's
    cores' share of it; none on a GPU (whose kernels want the widest batch the memory budget
    holds)."""
    if device != "cpu":
        return None
    return min(last_level_cache_bytes(), CACHE_PER_CPU * usable_cpus())

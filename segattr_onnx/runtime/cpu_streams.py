"""How many chunks run at once on the CPU, and how many threads each chunk's session gets.

ONNX Runtime parallelises an operator over its intra-op threads, but not every operator: on
the benchmark U-Net, InstanceNormalization, ConvTranspose's column scatter, Gather and the
layout reorders run mostly on one thread, about half of a KWC run's kernel time. With small,
cache-sized batches (``cpu_cache.py``) a second core then waits through half of every run.
Two chunks in flight, each on a session with half the cores, keep both busy: on a 2-core EPYC,
KWC on the benchmark U-Net at 256² took 9 % less time than one chunk at a time on both cores,
with bit-identical maps (each chunk's arithmetic does not depend on the threads it ran on).

Sessions that run once per layer (observation, prefix, a linear tail's readers and
contributions) keep every core. Under a user's whole-process memory budget chunks run one at a
time (``AblationRunner.streams_for``). A caller that caps ONNX Runtime's threads
(``intra_op_threads``, e.g. a Ray worker given one CPU) gets one stream: its cap is the whole
share of the machine it may use. CUDA sessions run one chunk at a time.
"""

from __future__ import annotations

import os

# Chunks in flight on the CPU. Two is what was measured (2 cores); each stream's session gets
# the cores divided between the streams.
CPU_STREAMS = 2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container or ``taskset`` sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def chunk_streams(device: str, intra_op_threads: int | None) -> int:
    """Chunks of one loop run at once: ``CPU_STREAMS`` on a CPU with that many cores and no
    thread cap from the caller, else 1."""
    if device != "cpu" or intra_op_threads is not None:
        return 1
    return max(1, min(CPU_STREAMS, usable_cpus()))


def stream_threads(streams: int) -> int | None:
    """Intra-op threads of a session whose chunks run ``streams`` at a time (None: ONNX
    Runtime's default, for a single stream)."""
    if streams <= 1:
        return None
    return max(1, usable_cpus() // streams)

"""A process that ran many suffix sessions must not keep the sum of their peaks.

ORT's CPU arena keeps the most memory any run needed; KWC builds one suffix session per layer,
so with one arena per session a process ends up holding the sum of all their peaks. Sessions
share one arena instead, which holds the largest peak only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from segattr_onnx.runtime.sessions import create_session
from tests.conftest import fixture

_EXPLAIN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import segattr_onnx.runtime.sessions as sessions
    from segattr_onnx import Explainer
    import segattr_onnx.runtime.ablation as ablation

    ablation.batch_cache_bytes = lambda device: None  # batches sized by the budget alone

    sessions.CPU_MEMORY_ARENA = sys.argv[2]

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    explainer = Explainer(sys.argv[1], provider="cpu", memory_budget=1 << 30)
    x = np.random.default_rng(0).standard_normal((1, 1, 256, 256)).astype(np.float32)
    explainer.analysis(x.shape)
    before = rss()
    explanation = explainer.explain(x, "kwc", "decoder")
    runs = [r for r in explanation.runs if r.purpose == "ablation"]
    print(json.dumps([before, rss(), len(runs), max(r.batch_size for r in runs)]))
    """
)


def test_sessions_share_one_cpu_arena() -> None:
    session = create_session(fixture("unet2d_torchscript").load_with_weights(), provider="cpu")
    options = session.get_session_options()
    assert options.enable_cpu_mem_arena is True
    assert options.get_session_config_entry("session.use_env_allocators") == "1"
    off = create_session(
        fixture("unet2d_torchscript").load_with_weights(), provider="cpu", cpu_memory_arena="off"
    )
    assert off.get_session_options().enable_cpu_mem_arena is False


def _retained_bytes(arena: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _EXPLAIN, str(fixture("unet2d_torchscript").path), arena],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after, layers, batch = json.loads(done.stdout)
    assert layers >= 6 and batch >= 8  # many suffix sessions, each run with a big chunk
    return after - before


def test_a_shared_arena_keeps_far_less_than_one_arena_per_session() -> None:
    # Measured: per-session arenas kept 806 MB here, one shared arena 252 MB (no arena: 164 MB).
    per_session, shared = _retained_bytes("per-session"), _retained_bytes("shared")
    assert per_session > 2 * shared, (per_session >> 20, shared >> 20)
    assert shared < 450 << 20, shared >> 20

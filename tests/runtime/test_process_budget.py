"""A user's ``memory_budget`` bounds the whole process's peak, measured, not estimated.

Each explanation runs in a fresh interpreter so that its peak resident memory (VmHWM) is its
own: the interpreter, the model, its rewritten graphs and sessions, and ONNX Runtime's arena.
Without the budget, KWC on the 2D fixture at 256² peaks at 230-380 MB by the CPU (batches
sized from a quarter of free memory, and here not bounded by the CPU's cache); under a budget
it must stay below it plus the process's footprint before the run (the issue's bar), with the
same map.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import fixture

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

_EXPLAIN = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    from segattr_onnx import Explainer
    from segattr_onnx.runtime.memory import peak_resident_bytes, resident_bytes
    import segattr_onnx.runtime.ablation as ablation

    ablation.batch_cache_bytes = lambda device: None  # batches sized by the budget alone

    held = resident_bytes()
    budget = held + int(sys.argv[2]) if sys.argv[2] != "none" else None
    explainer = Explainer(sys.argv[1], provider="cpu", memory_budget=budget)
    x = np.random.default_rng(0).standard_normal((1, 1, 256, 256)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = explainer.explain(x, "kwc", "decoder")
    np.save(sys.argv[3], explanation.map)
    print(json.dumps({
        "held": held,
        "budget": budget,
        "peak": peak_resident_bytes(),
        "runs": explanation.session_runs - sum(r.layer_runs for r in explanation.runs),
        "passes": explanation.forward_passes,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    }))
    """
)
MIB = 1 << 20


def _explain(tmp_path, extra: str) -> tuple[dict, np.ndarray]:
    out = tmp_path / f"map-{extra}.npy"
    done = subprocess.run(
        [sys.executable, "-c", _EXPLAIN, str(fixture("unet2d_torchscript").path), extra, str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout), np.load(out)


def test_the_peak_stays_within_a_whole_process_budget_at_two_budgets(tmp_path) -> None:
    free, free_map = _explain(tmp_path, "none")
    # What the free run took beyond the bar a budget of nothing would set (its peak less twice
    # what the interpreter held); it depends on the CPU's kernels (some 250 MiB where this was
    # first measured, 100 MiB on an AVX2-only EPYC). Budgets of half and 0.8 of it leave room
    # for the model and a few batches, and must bind.
    room = free["peak"] - 2 * free["held"]
    assert room > 80 * MIB, room >> 20
    for extra in (room // 2, room * 4 // 5):
        bounded, bounded_map = _explain(tmp_path, str(extra))
        # The bar: the budget plus what the process held before (its footprint). The
        # mechanism aims at the budget itself; the peak varies by some 30 MiB from run to run
        # (when freed memory goes back), so the test does not pin it closer than that.
        assert bounded["peak"] <= bounded["budget"] + bounded["held"], (
            bounded["peak"] >> 20,
            bounded["budget"] >> 20,
        )
        assert bounded["runs"] > free["runs"]  # the budget did split the batches
        assert bounded["passes"] == free["passes"]
        assert not [w for w in bounded["warnings"] if "MemoryBudgetWarning" in w]
        np.testing.assert_allclose(bounded_map, free_map, rtol=1e-5, atol=1e-6)
    # The test means something: without a budget this explanation takes more than either.
    assert free["peak"] > bounded["budget"] + bounded["held"], free["peak"] >> 20


def test_a_budget_below_the_models_footprint_is_reported_and_runs_one_at_a_time(
    tmp_path,
) -> None:
    result, _ = _explain(tmp_path, str(1 * MIB))
    warned = [w for w in result["warnings"] if w.startswith("MemoryBudgetWarning")]
    assert len(warned) == 1 and "already holds" in warned[0] and "MiB" in warned[0]
    assert result["runs"] == result["passes"]


def test_an_input_whose_one_pass_cannot_fit_is_refused_before_anything_runs(tmp_path) -> None:
    from click.testing import CliRunner

    from segattr_onnx.cli import main
    from segattr_onnx.runtime.memory import resident_bytes

    # The fixture takes any size; one pass at 4096² needs about 2 GB of activations.
    np.save(tmp_path / "huge.npy", np.zeros((1, 1, 4096, 4096), np.float32))
    before = resident_bytes()
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(fixture("unet2d_torchscript").path),
            str(tmp_path / "huge.npy"),
            "--out",
            str(tmp_path / "map.npy"),
            "--memory-budget",
            "600M",
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "one pass of the model" in errors[0] and "GiB" in errors[0]
    assert "--memory-budget" in errors[0]
    # Refused on the estimate: nothing near a pass's size was allocated (the input is 64 MiB).
    assert resident_bytes() - before < 400 * MIB
    assert not (tmp_path / "map.npy").exists()

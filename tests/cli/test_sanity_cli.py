"""``segattr sanity``: the library's cascade on the command line, its table and JSON, and its
exit codes (0 done or passed, 1 the check failed, 2 refused or not judgeable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer
from segattr_onnx.cli import main
from segattr_onnx.graph import randomise
from segattr_onnx.sanity import sanity_check
from tests.conftest import fixture
from tests.test_sanity import EdgesOnly, registered

MODEL = fixture("unet2d_torchscript")


@pytest.fixture
def case(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, MODEL.input(0)[0])  # without the batch axis, as a user saves an image
    return path


def _sanity(case: Path, *options: str):
    command = ["sanity", str(MODEL.path), str(case), "--provider", "cpu", "--quiet", *options]
    return CliRunner().invoke(main, command)


def test_json_is_the_librarys_cascade_and_the_check_passes(case: Path) -> None:
    result = _sanity(case, "--method", "gradcam", "--seed", "2", "--json",
                     "--check", "sanity_spearman <= 0.5")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = sanity_check(Explainer(MODEL.path, provider="cpu"), MODEL.input(0), "gradcam",
                            seed=2).to_dict()  # fmt: skip
    assert [s["spearman"] for s in data["steps"]] == pytest.approx(
        [s["spearman"] for s in expected["steps"]], abs=1e-9
    )
    assert data["cascade"] == expected["cascade"] and data["seed"] == 2
    (verdict,) = data["checks"]
    assert verdict["passed"] is True
    assert verdict["value"] == pytest.approx(expected["final_spearman"], abs=1e-9)


def test_the_table_has_one_row_per_step_and_the_verdict(case: Path) -> None:
    result = _sanity(case, "--method", "kwc", "--steps", "3", "--check", "sanity_spearman < 1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["step", "randomised", "layer"]
    )
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert [row[:3] for row in rows] == [
        ["1", "1/13", "/head/Conv"],
        ["2", "2/13", "/up2/blocks/blocks.1/conv/Conv"],
        ["3", "3/13", "/up2/blocks/blocks.0/conv/Conv"],
    ]
    assert all(-1 <= float(row[3]) <= 1 and -1 <= float(row[4]) <= 1 for row in rows)
    assert lines[-1] == "check sanity_spearman < 1: pass"


def test_a_method_that_ignores_the_model_fails_the_check_with_exit_1(case: Path) -> None:
    with registered(EdgesOnly) as name:
        result = _sanity(case, "--method", name, "--steps", "4",
                         "--check", "sanity_spearman <= 0.5")  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1] == (
        "check sanity_spearman <= 0.5: FAIL: sanity_spearman must be at most 0.5 "
        "(sanity_spearman <= 0.5); got 1"
    )


def test_every_check_of_a_band_is_judged_and_one_failure_exits_1(case: Path) -> None:
    """Two checks around the library's final figure, one of them just missing it: the first
    passes, the second fails, and the command exits 1."""
    final = sanity_check(Explainer(MODEL.path, provider="cpu"), MODEL.input(0), "kwc",
                         steps=3).final_spearman  # fmt: skip
    assert final is not None
    band = ["--check", f"sanity_spearman <= {final + 0.01:.4f}",
            "--check", f"sanity_spearman >= {final + 0.005:.4f}"]  # fmt: skip
    result = _sanity(case, "--method", "kwc", "--steps", "3", *band)
    assert result.exit_code == 1, result.output
    verdicts = result.stdout.splitlines()[-2:]
    assert (
        verdicts[0].endswith(": pass")
        and ": FAIL: sanity_spearman must be at least" in (verdicts[1])
    )


def test_without_a_check_a_failing_method_is_only_reported(case: Path) -> None:
    with registered(EdgesOnly) as name:
        result = _sanity(case, "--method", name, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "final spearman 1.0000 after randomising 2 of 13 kernel layers" in result.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--check", "image_preserved <= 0.4"], "judges image_preserved"),
        (["--check", "sanity_spearman = 0.4"], "is not 'sanity_spearman OP number'"),
        (["--steps", "14"], "at most 13"),
        (["--method", "nope"], "method 'nope' is unknown"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_options_exit_2_with_one_line(case: Path, options: list[str], message: str) -> None:
    result = _sanity(case, *options)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_a_final_step_the_randomisation_breaks_cannot_be_judged(
    case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(randomise, "_draw", lambda values, rng: np.full_like(values, np.nan))
    judged = _sanity(case, "--method", "gradcam", "--steps", "2", "--check",
                     "sanity_spearman <= 0.5")  # fmt: skip
    assert judged.exit_code == 2, judged.output
    (line,) = judged.stderr.strip().splitlines()
    assert line.startswith("error: the sanity check cannot be judged: with its last 2 kernel")
    assert "give fewer steps (at most 1)" in line
    reported = _sanity(case, "--method", "gradcam", "--steps", "2")
    assert reported.exit_code == 0, reported.output
    assert "final spearman none (the last step broke)" in reported.stdout

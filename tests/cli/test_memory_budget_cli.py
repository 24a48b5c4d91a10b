"""``--memory-budget`` on every command that runs the model, and ``memory_budget`` in audits.

The budget decides how many masks share one ONNX Runtime run: a budget below the process must run
every mask on its own, a roomy one must batch them, and the maps must not change.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import cli
from segattr_onnx.audit import AuditConfig
from segattr_onnx.cli import main
from segattr_onnx.explainer import Explainer
from segattr_onnx.runtime.budget import MemoryBudget
from tests.cli.test_audit import _config
from tests.conftest import fixture

MODEL = fixture("unet2d_torchscript")


@pytest.fixture
def case(tmp_path: Path) -> Path:
    path = tmp_path / "case.npy"
    np.save(path, MODEL.input(0))  # 1x1x32x32
    return path


def _explain(case: Path, out: Path, *args: str):
    command = ["explain", str(MODEL.path), str(case), "--out", str(out), "--provider", "cpu"]
    return CliRunner().invoke(main, [*command, "--quiet", "--json", "--force", *args])


def test_a_budget_below_the_processs_footprint_runs_one_mask_at_a_time(
    case: Path, tmp_path: Path
) -> None:
    # 1 MiB: above one pass at 32² (about 0.2 MiB), below what any Python process holds.
    tight = _explain(case, tmp_path / "tight.npy", "--memory-budget", "1M")
    roomy = _explain(case, tmp_path / "roomy.npy", "--memory-budget", "2G")
    assert tight.exit_code == 0 and roomy.exit_code == 0, tight.output + roomy.output
    tight_summary, roomy_summary = json.loads(tight.stdout), json.loads(roomy.stdout)
    assert tight_summary["forward_passes"] == roomy_summary["forward_passes"] > 1
    chunked = tight_summary["session_runs"] - tight_summary["layer_runs"]
    assert chunked == tight_summary["forward_passes"]
    roomy_chunks = roomy_summary["session_runs"] - roomy_summary["layer_runs"]
    assert roomy_chunks < roomy_summary["forward_passes"] // 4
    np.testing.assert_allclose(
        np.load(tmp_path / "tight.npy"), np.load(tmp_path / "roomy.npy"), atol=1e-5
    )


def test_a_fraction_of_free_memory_is_a_budget_too(case: Path, tmp_path: Path) -> None:
    result = _explain(case, tmp_path / "map.npy", "--memory-budget", "30%")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["session_runs"] < summary["forward_passes"]


class _BudgetSpy(Explainer):
    """The Explainer, recording the budget each command gives it."""

    budgets: ClassVar[list[int | None]] = []

    def __init__(self, *args, memory_budget: int | None = None, **kwargs) -> None:
        type(self).budgets.append(memory_budget)
        super().__init__(*args, memory_budget=memory_budget, **kwargs)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> type[_BudgetSpy]:
    monkeypatch.setattr(_BudgetSpy, "budgets", [])
    monkeypatch.setattr(cli, "Explainer", _BudgetSpy)
    # The module, not the ``audit`` function the package exports under the same name.
    monkeypatch.setattr(importlib.import_module("segattr_onnx.audit"), "Explainer", _BudgetSpy)
    return _BudgetSpy


def test_score_passes_its_budget_to_the_explainer(
    case: Path, tmp_path: Path, spy: type[_BudgetSpy]
) -> None:
    attribution = tmp_path / "map.npy"
    np.save(attribution, np.random.default_rng(0).random((32, 32)).astype(np.float32))
    args = ["score", str(MODEL.path), str(case), "--map", str(attribution), "--provider", "cpu"]
    result = CliRunner().invoke(main, [*args, "--quiet", "--steps", "0", "--memory-budget", "512M"])
    assert result.exit_code == 0, result.output
    assert spy.budgets == [512 << 20]
    default = CliRunner().invoke(main, [*args, "--quiet", "--steps", "0"])
    assert default.exit_code == 0 and spy.budgets[-1] is None  # the explainer's own default


def test_audit_takes_the_budget_from_its_config_or_the_command_line(
    tmp_path: Path, spy: type[_BudgetSpy]
) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    config.write_text('memory_budget = "1.5GiB"\n' + config.read_text())
    assert AuditConfig.load(config).memory_budget == MemoryBudget(size=3 << 29)
    result = CliRunner().invoke(main, ["audit", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    again = ["audit", str(config), "--quiet", "--force", "--memory-budget", "3M"]
    overridden = CliRunner().invoke(main, again)
    assert overridden.exit_code == 0, overridden.output
    assert spy.budgets == [3 << 29, 3 << 20]


@pytest.mark.parametrize("value", ["lots", "0", "150%", "1.5", "-2G"])
@pytest.mark.parametrize("command", ["explain", "score", "audit"])
def test_bad_budgets_exit_2_with_one_line(
    command: str, value: str, case: Path, tmp_path: Path, spy: type[_BudgetSpy]
) -> None:
    out = tmp_path / "map.npy"
    if command == "explain":
        args = [str(MODEL.path), str(case), "--out", str(out)]
    elif command == "score":
        np.save(out, np.zeros((32, 32), np.float32))
        args = [str(MODEL.path), str(case), "--map", str(out)]
    else:
        args = [str(_config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",)))]
    result = CliRunner().invoke(main, [command, *args, "--quiet", "--memory-budget", value])
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: --memory-budget")
    assert repr(value) in errors[0] and "Traceback" not in result.output
    assert spy.budgets == []  # refused before the model is loaded
    assert command == "score" or not out.exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('memory_budget = "lots"', "'memory_budget' in the audit config 'lots' is not a size"),
        ("memory_budget = 1.5", "outside (0, 1]"),
        ("memory_budget = true", "must be a size"),
        ("memory_budget = [4]", "must be a size"),
    ],
)
def test_bad_config_budgets_exit_2_with_one_line(tmp_path: Path, line: str, message: str) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    config.write_text(line + "\n" + config.read_text())
    result = CliRunner().invoke(main, ["audit", str(config), "--quiet"])
    assert result.exit_code == 2, result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "results").exists()

"""``segattr explain``: the map file, the JSON summary, and refusals with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.cli import main
from tests.conftest import fixture


def _invoke(*args: str):
    return CliRunner().invoke(main, ["explain", *args, "--provider", "cpu", "--quiet"])


@pytest.fixture
def case(tmp_path: Path) -> Path:
    path = tmp_path / "case.npy"
    np.save(path, fixture("unet2d_nhwc").input(0)[0])  # no batch axis, channels-last
    return path


def test_map_file_and_json_summary_match_the_python_api(case: Path, tmp_path: Path) -> None:
    model = fixture("unet2d_nhwc").path
    out = tmp_path / "map.npy"
    result = _invoke(str(model), str(case), "--out", str(out), "--json", "--variant", "p1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    expected = Explainer(model, provider="cpu").explain(np.load(case), "kwc", variant="p1")
    saved = np.load(out)
    assert saved.shape == (32, 32) and saved.dtype == np.float32
    assert saved.min() >= 0.0 and saved.max() <= 1.0
    np.testing.assert_array_equal(saved, expected.map)
    assert summary["method"] == "kwc" and summary["provider"] == "cpu"
    assert summary["layers"] == expected.layer_names
    assert summary["forward_passes"] == expected.forward_passes
    assert summary["seconds"] > 0


def test_method_class_region_and_layers_reach_the_engine(tmp_path: Path) -> None:
    spec = fixture("unet3d")
    case = tmp_path / "case.npz"
    np.savez(case, image=spec.input(2))
    out = tmp_path / "map.npy"
    args = ["--method", "scorecam", "--class-index", "2", "--layers", "last"]
    result = _invoke(str(spec.path), str(case), "--out", str(out), *args, "--json")
    assert result.exit_code == 0, result.output
    expected = Explainer(spec.path, provider="cpu").explain(
        spec.input(2), "scorecam", "last", Target(class_index=2)
    )
    np.testing.assert_array_equal(np.load(out), expected.map)
    assert json.loads(result.stdout)["target"]["class_index"] == 2


def test_an_existing_output_is_kept_unless_forced(case: Path, tmp_path: Path) -> None:
    model = str(fixture("unet2d_nhwc").path)
    out = tmp_path / "map.npy"
    out.write_bytes(b"precious")
    refused = _invoke(model, str(case), "--out", str(out))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert out.read_bytes() == b"precious"
    forced = _invoke(model, str(case), "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert np.load(out).shape == (32, 32)


def test_the_input_is_never_overwritten_even_with_force(tmp_path: Path) -> None:
    case = tmp_path / "case.npy"
    np.save(case, fixture("unet2d_nhwc").input(0))
    before = case.read_bytes()
    result = _invoke(str(fixture("unet2d_nhwc").path), str(case), "--out", str(case), "--force")
    assert result.exit_code == 2 and "one of the inputs" in result.stderr
    assert case.read_bytes() == before


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: np.save(p / "x.npy", np.zeros((3, 32, 32, 1), np.float32)), [], "batch of 3"),
        (lambda p: np.save(p / "x.npy", np.zeros((64, 64, 1), np.float32)), [], "does not take"),
        (
            lambda p: np.savez(p / "x.npz", a=np.zeros(1), b=np.zeros(1)),
            [],
            "--input-key",
        ),
        (lambda p: (p / "x.npy").write_text("not numpy"), [], "cannot read"),
        (
            lambda p: np.save(p / "x.npy", np.zeros((32, 32, 1), np.float32)),
            ["--layers", "re:nothing-matches"],
            "segattr inspect",
        ),
        (
            lambda p: np.save(p / "x.npy", np.zeros((32, 32, 1), np.float32)),
            ["--method", "gradcam-unknown"],
            "unknown",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, make, args, message: str) -> None:
    make(tmp_path)
    source = next(tmp_path.glob("x.*"))
    out = tmp_path / "map.npy"
    result = _invoke(str(fixture("unet2d_nhwc").path), str(source), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output and not out.exists()


def test_the_installed_command_runs_as_a_subprocess(case: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.npy"
    command = [sys.executable, "-m", "segattr_onnx", "explain", str(fixture("unet2d_nhwc").path)]
    command += [str(case), "--out", str(out), "--provider", "cpu"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "forward passes" in completed.stdout and np.load(out).shape == (32, 32)

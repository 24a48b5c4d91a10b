"""``segattr explain``: the map file, the JSON summary, and refusals with exit code 2."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.cli import main
from segattr_onnx.files import save_array
from tests.builders import build
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


def _save_model(tmp_path: Path, **twists) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(build(**twists), path)
    return path


def test_output_problems_are_found_before_any_forward_pass(tmp_path: Path) -> None:
    case = tmp_path / "case.npy"
    np.save(case, np.zeros((1, 8, 8), np.float32))
    model = str(_save_model(tmp_path))
    for out, message in [
        (tmp_path / "missing" / "map.npy", "does not exist"),
        (tmp_path / "map.png", "has no writer"),
    ]:
        result = CliRunner().invoke(
            main, ["explain", model, str(case), "--out", str(out), "--provider", "cpu"]
        )
        assert result.exit_code == 2 and message in result.stderr
        assert "forward passes" not in result.output  # no progress bar was ever started


def test_region_files_are_protected_and_label_maps_need_a_label(tmp_path: Path) -> None:
    case, labels = tmp_path / "case.npy", tmp_path / "labels.npy"
    np.save(case, np.random.default_rng(0).standard_normal((1, 8, 8)).astype(np.float32))
    label_map = np.zeros((8, 8), np.int64)
    label_map[2:6, 2:6] = 3
    np.save(labels, label_map)
    before = labels.read_bytes()
    model = str(_save_model(tmp_path))
    base = ["explain", model, str(case), "--provider", "cpu", "--quiet"]
    clobber = CliRunner().invoke(
        main, [*base, "--region", str(labels), "--out", str(labels), "--force"]
    )
    assert clobber.exit_code == 2 and labels.read_bytes() == before
    unlabelled = CliRunner().invoke(
        main, [*base, "--region", str(labels), "--out", str(tmp_path / "a.npy")]
    )
    assert unlabelled.exit_code == 2 and "--region-label" in unlabelled.stderr
    out = tmp_path / "b.npy"
    labelled = CliRunner().invoke(
        main, [*base, "--region", str(labels), "--region-label", "3", "--out", str(out), "--json"]
    )
    assert labelled.exit_code == 0, labelled.output
    expected = Explainer(model, provider="cpu").explain(
        np.load(case), target=Target(region=label_map == 3)
    )
    np.testing.assert_array_equal(np.load(out), expected.map)


@pytest.mark.parametrize(
    ("make_input", "twists", "args", "message"),
    [
        (lambda: np.array([["a"] * 8] * 8), {}, [], "holds <U1 values"),
        (lambda: np.zeros((1, 8, 8), np.float32), {"batch": 2}, [], "fixed batch of 2"),
        (lambda: np.zeros((1, 8, 8), np.float32), {}, ["--seed", "-5"], "-5"),
        (lambda: np.full((1, 8, 8), 7.0, np.float32), {}, ["--class-axis", "9"], "class axis"),
    ],
)
def test_more_bad_inputs_exit_2_without_traceback(
    tmp_path: Path, make_input, twists, args, message
) -> None:
    case = tmp_path / "case.npy"
    np.save(case, make_input())
    model = str(_save_model(tmp_path, **twists))
    out = tmp_path / "map.npy"
    result = CliRunner().invoke(
        main, ["explain", model, str(case), "--out", str(out), "--provider", "cpu", *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_written_maps_get_the_permissions_of_a_plain_new_file(tmp_path: Path) -> None:
    reference = tmp_path / "plain.npy"
    np.save(reference, np.zeros(2))
    written = save_array(tmp_path / "map.npy", np.zeros(2))
    mode = stat.S_IMODE(os.stat(written).st_mode)
    assert mode == stat.S_IMODE(os.stat(reference).st_mode)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_gradient_methods_from_the_command_line(case: Path, tmp_path: Path, method: str) -> None:
    model = fixture("unet2d_nhwc").path
    out = tmp_path / "map.npy"
    result = _invoke(str(model), str(case), "--out", str(out), "--method", method, "--json")
    assert result.exit_code == 0, result.output
    expected = Explainer(model, provider="cpu").explain(np.load(case), method)
    np.testing.assert_array_equal(np.load(out), expected.map)
    assert json.loads(result.stdout)["forward_passes"] == 1  # the backward graph observes too

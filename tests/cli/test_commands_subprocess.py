"""Every command, as a user runs it: a real subprocess on the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segattr_onnx.bundled import example_model_path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "segattr_onnx", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_each_command_end_to_end(tmp_path: Path) -> None:
    model = str(example_model_path())
    inspect = _run(
        "inspect", model, "--input-shape", "1x1x64x64", "--json", "--provider", "cpu", cwd=tmp_path
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["input"]["layout"] == "NCHW"

    synth = _run(
        "synth", "--dim", "2", "--seed", "90007", "--size", "64", "--out", "case.npz", cwd=tmp_path
    )
    assert synth.returncode == 0, synth.stderr
    assert (tmp_path / "case.npz").is_file()

    explain = _run(
        "explain",
        model,
        "case.npz",
        "--out",
        "map.npy",
        "--json",
        "--provider",
        "cpu",
        "--quiet",
        cwd=tmp_path,
    )
    assert explain.returncode == 0, explain.stderr
    assert np.load(tmp_path / "map.npy").shape == (64, 64)

    score = _run(
        "score",
        model,
        "case.npz",
        "--map",
        "map.npy",
        "--labels",
        "case.npz",
        "--json",
        "--provider",
        "cpu",
        "--quiet",
        cwd=tmp_path,
    )
    assert score.returncode == 0, score.stderr
    assert "attribution_quality" in json.loads(score.stdout)

    plugins = _run("plugins", cwd=tmp_path)
    assert plugins.returncode == 0 and "methods: kwc" in plugins.stdout

    (tmp_path / "audit.toml").write_text(
        f'model = "{model}"\nmethods = ["gradcam"]\nprovider = "cpu"\n'
        'checks = ["image_preserved <= 1"]\ncases = ["case.npz"]\n'
    )
    audit = _run("audit", "audit.toml", "--quiet", cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    assert (tmp_path / "segattr-audit" / "junit.xml").is_file()

    bad = _run("explain", model, "missing.npy", "--out", "x.npy", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["explain", ".", "x.npy", "--out", "o.npy"],  # a folder where a file is expected
        ["explain", "m.onnx", "x.npy", "--out", "o.npy", "--variant", "p9"],
        ["synth", "--seed", "-1", "--out", "x.npz"],
        ["score", "m.onnx", "x.npy", "--map", "m.npy", "--steps", "1000"],
        ["inspect", "m.onnx", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_clicks_own_refusals_are_one_error_line_and_exit_2(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Usage:" not in done.stdout + done.stderr

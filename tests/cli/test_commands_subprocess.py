"""Every command, as a user runs it: a real subprocess on the bundled model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

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

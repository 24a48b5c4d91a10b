"""No output of a run replaces one of its inputs, and no output is written through a link.

``--force`` replaces an earlier output; it must never replace the labels, the region, the
model card, the model's external weights or any other file the same run reads, whichever
output option names it and through whatever symbolic link.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from segattr_onnx.cli import main
from tests.conftest import fixture

MODEL = fixture("unet2d_nhwc")


@pytest.fixture
def run_files(tmp_path: Path) -> dict[str, Path]:
    np.save(tmp_path / "case.npy", MODEL.input(0)[0])
    labels = np.zeros((32, 32), np.int64)
    labels[8:20, 8:20] = 3
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "region.npy", labels == 3)
    model = tmp_path / "model.onnx"
    shutil.copy(MODEL.path, model)
    (tmp_path / "card.toml").write_text("[target]\nclass_index = 0\n")
    return {
        "case": tmp_path / "case.npy",
        "labels": tmp_path / "labels.npy",
        "region": tmp_path / "region.npy",
        "card": tmp_path / "card.toml",
        "model": model,
    }


def _explain(files: dict[str, Path], option: str, out: Path):
    args = [
        "explain",
        str(files["model"]),
        str(files["case"]),
        "--out",
        str(out) if option == "--out" else str(files["case"].parent / "map.npy"),
        "--region",
        str(files["region"]),
        "--card",
        str(files["card"]),
        "--score",
        "--labels",
        str(files["labels"]),
        "--provider",
        "cpu",
        "--quiet",
        "--force",
    ]
    if option != "--out":
        args += [option, str(out)]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("name", ["labels", "region", "card", "case", "model"])
@pytest.mark.parametrize("option", ["--out", "--overlay", "--report"])
def test_no_output_option_replaces_an_input_even_with_force(
    run_files: dict[str, Path], tmp_path: Path, name: str, option: str
) -> None:
    target = run_files[name]
    suffix = {"--out": ".npy", "--overlay": ".png", "--report": ".html"}[option]
    link = tmp_path / f"link{suffix}"
    link.symlink_to(target)  # the right suffix, and the input behind it
    before = target.read_bytes()
    for path in (link, target) if target.suffix == suffix else (link,):
        result = _explain(run_files, option, path)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "one of the inputs" in errors[0], result.output
    assert target.read_bytes() == before


def test_external_weights_are_an_input_too(tmp_path: Path) -> None:
    model = onnx.load(str(MODEL.path))
    onnx.save(
        model,
        tmp_path / "model.onnx",
        save_as_external_data=True,
        location="weights.npy",  # named like an output on purpose
        size_threshold=0,
    )
    np.save(tmp_path / "case.npy", MODEL.input(0)[0])
    before = (tmp_path / "weights.npy").read_bytes()
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(tmp_path / "model.onnx"),
            str(tmp_path / "case.npy"),
            "--out",
            str(tmp_path / "weights.npy"),
            "--force",
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 2 and "one of the inputs" in result.output
    assert (tmp_path / "weights.npy").read_bytes() == before


def test_an_output_that_is_a_link_elsewhere_replaces_the_link_not_its_target(
    run_files: dict[str, Path], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "precious.npy"
    np.save(victim, np.arange(5))
    before = victim.read_bytes()
    link = tmp_path / "map.npy"
    link.symlink_to(victim)
    result = _explain(run_files, "--out", link)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == before
    assert not link.is_symlink() and np.load(link).shape == (32, 32)

"""Inputs are refused from their headers when they could not fit: the machine, or the budget.

A NIfTI's header, a .npy's header or a DICOM series' slice size says how much memory the image
will take once read; a gzip-compressed NIfTI of zeros inflates a thousandfold. Under
``--memory-budget`` an input larger than the budget is refused before it is inflated, with one
error line, and the process never holds it.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel
import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx.cli import main
from segattr_onnx.runtime.memory import peak_resident_bytes, resident_bytes
from tests.conftest import fixture

MIB = 1 << 20


def _nifti_bomb(path: Path, shape: tuple[int, ...], stored_zeros: int) -> None:
    header = nibabel.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).header.copy()
    header.set_data_shape(shape)
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(header.binaryblock + b"\0" * 4)
        chunk = b"\0" * (16 * MIB)
        for _ in range(stored_zeros // len(chunk)):
            stream.write(chunk)


def _explain(model: Path, image: Path, out: Path, *extra: str):
    command = ["explain", str(model), str(image), "--out", str(out), "--provider", "cpu"]
    return CliRunner().invoke(main, [*command, "--quiet", *extra])


def _one_error(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_a_nifti_claiming_more_than_the_machine_is_refused_from_its_header(tmp_path) -> None:
    _nifti_bomb(tmp_path / "huge.nii.gz", (20000, 20000, 2000), 0)
    error = _one_error(
        _explain(fixture("unet3d").path, tmp_path / "huge.nii.gz", tmp_path / "m.npy")
    )
    assert "header claims" in error and "more than this machine can hold" in error


@pytest.mark.skipif(peak_resident_bytes() is None, reason="reads /proc/self/status")
def test_a_compressed_nifti_bigger_than_the_budget_is_never_inflated(tmp_path) -> None:
    # 256 MiB of voxels stored as a few hundred kilobytes of gzip.
    _nifti_bomb(tmp_path / "bomb.nii.gz", (1024, 1024, 64), 256 * MIB)
    assert (tmp_path / "bomb.nii.gz").stat().st_size < 2 * MIB
    before = resident_bytes()
    result = _explain(
        fixture("unet3d").path,
        tmp_path / "bomb.nii.gz",
        tmp_path / "m.npy",
        "--memory-budget",
        "100M",
    )
    error = _one_error(result)
    assert "more than the memory budget" in error
    assert resident_bytes() - before < 64 * MIB


def test_an_npy_bigger_than_the_budget_is_refused_from_its_header(tmp_path) -> None:
    path = tmp_path / "big.npy"
    with path.open("wb") as stream:  # a valid header and the bytes it claims, sparse on disk
        np.lib.format.write_array_header_1_0(
            stream, {"descr": "<f4", "fortran_order": False, "shape": (1, 1, 8192, 8192)}
        )
        stream.truncate(stream.tell() + 8192 * 8192 * 4)
    error = _one_error(
        _explain(
            fixture("unet2d_torchscript").path,
            path,
            tmp_path / "m.npy",
            "--memory-budget",
            "100M",
        )
    )
    assert "big.npy" in error and "more than the memory budget" in error

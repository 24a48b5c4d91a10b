"""Folders as INPUT: a DICOM series through ``explain``, ``score`` and ``audit``, and every kind
of broken medical input refused with one ``error:`` line and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner, Result
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from segattr_onnx import Explainer
from segattr_onnx.audit import audit
from segattr_onnx.cli import main
from segattr_onnx.files import read_image
from segattr_onnx.plugins import registry
from tests.conftest import fixture

MODEL_2D = fixture("unet2d_torchscript")  # takes (1, 1, 32, 32)
MODEL_3D = fixture("unet3d")  # takes (1, 1, 16, 16, 16)


def _slice(
    path: Path,
    pixels: np.ndarray,
    series_uid: str,
    position: float | None,
    orientation: list[float] | None = (1, 0, 0, 0, 1, 0),
) -> None:
    """One CT slice; ``position`` (mm along z) or ``orientation`` None leaves the tag out."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = series_uid
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelSpacing = [0.7, 0.8]
    dataset.SliceThickness = 2.0
    if orientation is not None:
        dataset.ImageOrientationPatient = list(orientation)
    if position is not None:
        dataset.ImagePositionPatient = [-5.0, 3.0, float(position)]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1000
    dataset.PixelData = (pixels + 1000).astype(np.int16).tobytes()
    dataset.save_as(str(path), enforce_file_format=True)


def _series(folder: Path, slices: int = 1, size: int = 32, seed: int = 0) -> np.ndarray:
    """A series of ``slices`` slices of ``size`` x ``size`` in ``folder``; the volume written."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(seed).integers(-300, 300, (slices, size, size))
    volume = volume.astype(np.float32)
    uid = generate_uid()
    for k in range(slices):
        _slice(folder / f"s{k:03d}.dcm", volume[k], uid, position=100.0 + 2.0 * k)
    return volume


def _explain(model: Path, source: Path, out: Path) -> Result:
    return CliRunner().invoke(
        main,
        ["explain", str(model), str(source), "--out", str(out), "--provider", "cpu", "--quiet"],
    )


def _one_error_line(result: Result) -> str:
    """The run was refused cleanly: exit 2, no Usage block, no traceback, and stderr is exactly
    one ``error:`` line (no warnings around it)."""
    assert result.exit_code == 2, result.output
    assert "Usage:" not in result.output and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- a valid series works everywhere a file does ------------------------------------------------


def test_a_series_folder_is_explained_onto_its_own_grid(tmp_path: Path) -> None:
    volume = _series(tmp_path / "series", slices=16, size=16)
    out = tmp_path / "map.nii.gz"
    result = _explain(MODEL_3D.path, tmp_path / "series", out)
    assert result.exit_code == 0, result.output
    written = nibabel.load(str(out))
    np.testing.assert_allclose(written.affine, read_image(tmp_path / "series").meta["affine"])
    expected = Explainer(MODEL_3D.path, provider="cpu").explain(volume).map
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, rtol=1e-6)


def test_a_single_slice_series_is_a_one_slice_volume_that_2d_models_take(tmp_path: Path) -> None:
    volume = _series(tmp_path / "one")
    image = read_image(tmp_path / "one")
    assert image.array.shape == (1, 32, 32)  # (slice, row, column), as for every series
    assert image.meta["spacing"] == (2.0, 0.7, 0.8)  # one slice: its SliceThickness
    result = _explain(MODEL_2D.path, tmp_path / "one", tmp_path / "map.npy")
    assert result.exit_code == 0, result.output
    expected = Explainer(MODEL_2D.path, provider="cpu").explain(volume).map
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected, rtol=1e-6)
    # A NIfTI map of a slice keeps the slice axis, so it overlays the slice it explains.
    assert _explain(MODEL_2D.path, tmp_path / "one", tmp_path / "map.nii.gz").exit_code == 0
    written = nibabel.load(str(tmp_path / "map.nii.gz"))
    assert written.shape == (1, 32, 32)
    np.testing.assert_allclose(written.affine, image.meta["affine"])


def test_a_single_slice_without_patient_geometry_is_read_on_a_default_grid(tmp_path: Path) -> None:
    (tmp_path / "xray").mkdir()
    pixels = np.full((32, 32), 5.0, dtype=np.float32)
    _slice(tmp_path / "xray" / "a.dcm", pixels, generate_uid(), position=None, orientation=None)
    image = read_image(tmp_path / "xray")
    np.testing.assert_array_equal(image.array, pixels[None])
    assert np.isfinite(image.meta["affine"]).all()


def test_score_takes_a_series_folder(tmp_path: Path) -> None:
    volume = _series(tmp_path / "series")
    attribution = Explainer(MODEL_2D.path, provider="cpu").explain(volume).map
    np.save(tmp_path / "map.npy", attribution)
    result = CliRunner().invoke(
        main,
        [
            "score",
            str(MODEL_2D.path),
            str(tmp_path / "series"),
            "--map",
            str(tmp_path / "map.npy"),
            "--provider",
            "cpu",
            "--steps",
            "0",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["prediction_preserved"] <= 1


def _audit_config(tmp_path: Path, cases: str) -> Path:
    config = tmp_path / "audit.toml"
    config.write_text(
        "\n".join(
            [
                f'model = "{MODEL_2D.path}"',
                'methods = ["gradcam"]',
                'layers = "last"',
                'provider = "cpu"',
                'output = "results"',
                'checks = ["prediction_preserved >= 0"]',
                cases,
            ]
        )
    )
    return config


def test_audit_cases_are_series_folders_by_path_and_by_pattern(tmp_path: Path) -> None:
    _series(tmp_path / "series" / "patient1", seed=1)
    _series(tmp_path / "series" / "patient2", seed=2)
    _series(tmp_path / "single.ct", seed=3)  # a dot in a folder's name is not a suffix
    config = _audit_config(tmp_path, 'cases = ["series/*", "single.ct/"]')
    result = CliRunner().invoke(main, ["audit", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "3 of 3 checks passed" in result.stdout
    report = json.loads((tmp_path / "results" / "audit.json").read_text())
    assert sorted(r["case"] for r in report["results"]) == ["patient1", "patient2", "single.ct"]


def test_resuming_an_audit_rereads_a_series_whose_slices_changed(tmp_path: Path) -> None:
    _series(tmp_path / "series" / "patient1")
    config = _audit_config(tmp_path, '[[cases]]\ninput = "series/patient1"')
    audit(config)
    assert audit(config, resume=True).reused == 1
    _series(tmp_path / "series" / "patient1", seed=9)  # the same files, other pixels
    assert audit(config, resume=True).reused == 0


def test_a_folder_without_a_plugin_reader_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    _series(tmp_path / "series")
    monkeypatch.delitem(registry().readers, "/")
    line = _one_error_line(_explain(MODEL_2D.path, tmp_path / "series", tmp_path / "map.npy"))
    assert "is a folder" in line and "segattr-medical" in line
    config = _audit_config(tmp_path, 'cases = ["series"]')
    line = _one_error_line(CliRunner().invoke(main, ["audit", str(config), "--quiet"]))
    assert "is a folder" in line and "segattr-medical" in line


# --- broken input: one error line, exit 2 ------------------------------------------------------


def _mixed(folder: Path) -> None:
    _series(folder, slices=2)
    _slice(folder / "other.dcm", np.zeros((32, 32)), generate_uid(), position=300.0)


def _truncated(folder: Path) -> None:
    _series(folder, slices=3)
    data = (folder / "s001.dcm").read_bytes()
    (folder / "s001.dcm").write_bytes(data[: len(data) - 100])  # pixel data cut short


def _cut_in_header(folder: Path) -> None:
    _series(folder, slices=3)
    data = (folder / "s001.dcm").read_bytes()
    (folder / "s001.dcm").write_bytes(data[:300])  # no pixel data at all


def _garbage(folder: Path) -> None:
    _series(folder, slices=3)
    noise = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
    (folder / "s001.dcm").write_bytes(b"\0" * 128 + b"DICM" + noise)


def _no_orientation(folder: Path) -> None:
    _series(folder, slices=2)
    _slice(folder / "s002.dcm", np.zeros((32, 32)), _uid(folder), position=104.0, orientation=None)


def _no_position(folder: Path) -> None:
    _series(folder, slices=2)
    _slice(folder / "s002.dcm", np.zeros((32, 32)), _uid(folder), position=None)


def _sizes_differ(folder: Path) -> None:
    _series(folder, slices=2)
    _slice(folder / "s002.dcm", np.zeros((16, 16)), _uid(folder), position=104.0)


def _same_position(folder: Path) -> None:
    _series(folder, slices=2)
    _slice(folder / "s002.dcm", np.zeros((32, 32)), _uid(folder), position=102.0)


def _tilted(folder: Path) -> None:
    _series(folder, slices=2)
    tilted = [1, 0, 0, 0, 0.8, 0.6]  # a localizer's orientation, in the same series
    _slice(folder / "s002.dcm", np.zeros((32, 32)), _uid(folder), 104.0, orientation=tilted)


def _compressed(folder: Path) -> None:
    _series(folder, slices=3)
    dataset = pydicom.dcmread(str(folder / "s001.dcm"))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])  # a broken codestream
    dataset.save_as(str(folder / "s001.dcm"), enforce_file_format=True)


def _no_dicom(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    np.save(folder / "array.npy", np.zeros((32, 32), np.float32))


def _empty(folder: Path) -> None:
    folder.mkdir()


def _uid(folder: Path) -> str:
    return str(pydicom.dcmread(str(folder / "s000.dcm")).SeriesInstanceUID)


@pytest.mark.parametrize(
    ("make", "phrases"),
    [
        (_mixed, ["2 DICOM series", "its own folder"]),
        (_truncated, ["s001.dcm", "damaged", "re-export"]),
        (_cut_in_header, ["s001.dcm", "damaged", "no pixel data"]),
        (_garbage, ["s001.dcm", "damaged"]),
        (_no_orientation, ["s002.dcm", "ImageOrientationPatient", "re-export"]),
        (_no_position, ["s002.dcm", "ImagePositionPatient", "re-export"]),
        (_sizes_differ, ["different sizes", "32x32", "16x16"]),
        (_same_position, ["same position", "s002.dcm"]),
        (_tilted, ["different orientations", "s002.dcm"]),
        (_compressed, ["s001.dcm", "JPEG 2000", "cannot be decoded", "decompress"]),
        (_no_dicom, ["no DICOM", "one series"]),
        (_empty, ["no DICOM", "one series"]),
    ],
    ids=lambda value: getattr(value, "__name__", "")[1:] or None,
)
def test_a_broken_series_folder_exits_2_with_one_line(
    tmp_path: Path, make, phrases: list[str]
) -> None:
    make(tmp_path / "series")
    line = _one_error_line(_explain(MODEL_2D.path, tmp_path / "series", tmp_path / "map.npy"))
    for phrase in phrases:
        assert phrase in line
    assert not (tmp_path / "map.npy").exists()


def test_a_broken_series_stops_an_audit_with_one_line(tmp_path: Path) -> None:
    _series(tmp_path / "series" / "good")
    _mixed(tmp_path / "series" / "mixed")
    config = _audit_config(tmp_path, 'cases = ["series/*"]')
    line = _one_error_line(CliRunner().invoke(main, ["audit", str(config), "--quiet"]))
    assert "2 DICOM series" in line
    assert json.loads((tmp_path / "results" / "audit.json").read_text())["passed"] is False


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ('"series/p1"', 'output = "series/p1/results"', "into its own input"),
        ('{ input = "series/p1", labels = "same" }', "", "give the labels' path"),
    ],
)
def test_audit_refuses_what_a_folder_case_cannot_be(
    tmp_path: Path, case: str, extra: str, message: str
) -> None:
    _series(tmp_path / "series" / "p1")
    config = _audit_config(tmp_path, f"cases = [{case}]")
    config.write_text(config.read_text().replace('output = "results"', extra))
    line = _one_error_line(CliRunner().invoke(main, ["audit", str(config), "--quiet"]))
    assert message in line
    assert not (tmp_path / "series" / "p1" / "results").exists()


def test_a_nifti_whose_affine_holds_nan_exits_2_with_one_line(tmp_path: Path) -> None:
    header = nibabel.Nifti1Header()
    header["srow_x"], header["srow_y"] = [np.nan, 0, 0, 0], [0, 1, 0, 0]
    header["srow_z"], header["sform_code"] = [0, 0, 1, 0], 1
    volume = MODEL_3D.input(0)[0, 0]
    nibabel.save(nibabel.Nifti1Image(volume, None, header=header), str(tmp_path / "scan.nii.gz"))
    for out in ("map.npy", "map.nii.gz"):
        line = _one_error_line(_explain(MODEL_3D.path, tmp_path / "scan.nii.gz", tmp_path / out))
        assert "affine" in line and "NaN" in line and "header" in line


def test_symlink_loops_neither_hang_nor_break_a_series(tmp_path: Path) -> None:
    volume = _series(tmp_path / "series")
    os.symlink(tmp_path / "series", tmp_path / "series" / "self")  # a folder loop inside
    os.symlink(tmp_path / "series" / "knot", tmp_path / "series" / "knot")  # a link to itself
    result = _explain(MODEL_2D.path, tmp_path / "series", tmp_path / "map.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_image(tmp_path / "series").array, volume)
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # INPUT itself a loop
    line = _one_error_line(_explain(MODEL_2D.path, tmp_path / "loop", tmp_path / "map2.npy"))
    assert "symbolic link" in line and "leads nowhere" in line

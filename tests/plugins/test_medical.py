"""The segattr-medical plugin: NIfTI in and out with the same affine, DICOM series in order."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from segattr_onnx import Explainer
from segattr_onnx.cli import main
from segattr_onnx.files import read_image
from segattr_onnx.plugins import registry
from tests.conftest import fixture

AFFINE = np.array(
    [
        [0.0, -0.8, 0.0, 12.5],
        [1.2, 0.0, 0.0, -40.0],
        [0.0, 0.0, 2.5, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_the_plugin_is_listed_with_what_it_adds() -> None:
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0
    assert "medical" in result.stdout and ".nii.gz" in result.stdout
    assert registry().writer_for(Path("map.nii.gz")) is not None


def test_nifti_in_gives_a_nifti_map_on_the_same_grid(tmp_path: Path) -> None:
    volume = fixture("unet3d").input(0)[0, 0]  # (16, 16, 16), a bare volume
    scan = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, AFFINE), str(scan))
    out = tmp_path / "map.nii.gz"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(fixture("unet3d").path),
            str(scan),
            "--out",
            str(out),
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    written = nibabel.load(str(out))
    np.testing.assert_allclose(written.affine, AFFINE)
    expected = Explainer(fixture("unet3d").path, provider="cpu").explain(volume).map
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, rtol=1e-6)


def _write_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """One DICOM file per slice, written in a shuffled order with shuffled file names."""
    series_uid = generate_uid()
    order = np.random.default_rng(0).permutation(len(volume))
    for file_number, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = FileDataset(
            str(folder / f"f{file_number}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128
        )
        dataset.SOPClassUID = meta.MediaStorageSOPClassUID
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        dataset.SeriesInstanceUID = series_uid
        dataset.Modality = "CT"
        dataset.Rows, dataset.Columns = volume.shape[1:]
        dataset.PixelSpacing = [spacing[1], spacing[2]]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [-5.0, 3.0, 100.0 + spacing[0] * float(k)]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1000
        dataset.PixelData = (volume[k] + 1000).astype(np.int16).tobytes()
        dataset.save_as(str(folder / f"f{file_number}.dcm"), enforce_file_format=True)


def test_predict_writes_a_nifti_of_every_channel_on_the_inputs_grid(tmp_path: Path) -> None:
    from segattr_onnx.prediction import predict
    from segattr_onnx.sliding_window import SlidingWindow

    fx = fixture("unet3d")
    volume = np.random.default_rng(4).standard_normal((21, 30, 17)).astype(np.float32)
    scan = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, AFFINE), str(scan))
    out = tmp_path / "pred.nii.gz"
    command = ["predict", str(fx.path), str(scan), "--out", str(out), "--patch", "16x16x16"]
    result = CliRunner().invoke(main, [*command, "--provider", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    written = nibabel.load(str(out))
    np.testing.assert_allclose(written.affine, AFFINE)
    expected = predict(Explainer(fx.path, provider="cpu"), volume, SlidingWindow((16, 16, 16)))
    # channels on the NIfTI's last axis: (X, Y, Z, C)
    np.testing.assert_allclose(
        np.asarray(written.dataobj), np.moveaxis(expected.values, 0, -1), rtol=0, atol=1e-6
    )


def test_a_dicom_series_is_read_in_slice_order_with_its_spacing(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).integers(-500, 500, (12, 10, 8)).astype(np.float32)
    _write_series(tmp_path, volume, spacing=(2.5, 0.7, 0.8))
    image = read_image(tmp_path)
    np.testing.assert_array_equal(image.array, volume)
    assert image.meta["spacing"] == (2.5, 0.7, 0.8)
    affine = image.meta["affine"]
    # RAS: the slice axis steps 2.5 mm in +z; rows 0.7 mm and columns 0.8 mm, x and y flipped.
    np.testing.assert_allclose(affine[:3, 0], [0, 0, 2.5])
    np.testing.assert_allclose(affine[:3, 1], [0, -0.7, 0])
    np.testing.assert_allclose(affine[:3, 2], [-0.8, 0, 0])
    np.testing.assert_allclose(affine[:3, 3], [5.0, -3.0, 100.0])


def test_nrrd_is_read_with_its_spacing_and_geometry(tmp_path: Path) -> None:
    import nrrd

    volume = np.random.default_rng(2).standard_normal((6, 5, 4)).astype(np.float32)
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 0.6, 2.0]),
        "space origin": [10.0, 20.0, 30.0],
    }
    nrrd.write(str(tmp_path / "scan.nrrd"), volume, header)
    image = read_image(tmp_path / "scan.nrrd")
    np.testing.assert_array_equal(image.array, volume)
    assert image.meta["spacing"] == pytest.approx((0.5, 0.6, 2.0))
    np.testing.assert_allclose(image.meta["affine"][:3, 3], [-10.0, -20.0, 30.0])  # LPS → RAS


def test_a_card_resamples_a_nifti_to_its_spacing(tmp_path: Path) -> None:
    from segattr_onnx.card import ModelCard

    volume = np.random.default_rng(3).standard_normal((8, 10, 6)).astype(np.float32)
    scan = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 1.0, 3.0, 1.0])), str(scan))
    image = read_image(scan)
    card_path = tmp_path / "m.card.toml"
    card_path.write_text("[input]\nspacing = [1.0, 1.0, 1.5]\n")
    prepared = ModelCard.load(card_path).prepare(image.array, image.meta["spacing"])
    assert prepared.shape == (16, 10, 12)

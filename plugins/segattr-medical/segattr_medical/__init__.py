"""NIfTI and DICOM for segattr-onnx: read volumes with their geometry, write maps back on it.

Registered through the ``segattr_onnx.plugins`` entry point; segattr-onnx itself never imports
nibabel or pydicom.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segattr_onnx.errors import InputDataError
from segattr_onnx.plugins import ImageData, PluginRegistry

NIFTI_SUFFIXES = [".nii", ".nii.gz"]
NRRD_SUFFIXES = [".nrrd"]


def register(registry: PluginRegistry) -> None:
    registry.add_reader(NIFTI_SUFFIXES, read_nifti)
    registry.add_reader(NRRD_SUFFIXES, read_nrrd)
    registry.add_reader(["/"], read_dicom_series)
    registry.add_writer(NIFTI_SUFFIXES, write_nifti)


def read_nrrd(path: Path) -> ImageData:
    """An NRRD volume with its spacing (from 'space directions') and origin."""
    import nrrd

    data, header = nrrd.read(str(path))
    meta: dict = {}
    directions = header.get("space directions")
    if directions is not None:
        vectors = np.array([d for d in directions if d is not None], dtype=np.float64)
        meta["spacing"] = tuple(float(np.linalg.norm(v)) for v in vectors)
        affine = np.eye(4)
        affine[:3, : len(vectors)] = vectors.T
        if header.get("space origin") is not None:
            affine[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
        if str(header.get("space", "")).startswith("left-posterior"):
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS → RAS, as NIfTI expects
        meta["affine"] = affine
    return ImageData(np.asarray(data, dtype=np.float32), meta, path)


def read_nifti(path: Path) -> ImageData:
    """The volume in its voxel order (i, j, k), float32, with its affine and header."""
    import nibabel

    image = nibabel.load(str(path))
    array = np.asarray(image.dataobj, dtype=np.float32)
    spacing = tuple(float(z) for z in image.header.get_zooms()[: array.ndim])
    meta = {"affine": image.affine, "header": image.header, "spacing": spacing}
    return ImageData(array, meta, path)


def write_nifti(path: Path, array: np.ndarray, like: ImageData | None) -> None:
    """A float32 NIfTI map on the input's grid (its affine), or identity for non-NIfTI input."""
    import nibabel

    affine = like.meta.get("affine") if like is not None else None
    if affine is None:
        affine = np.eye(4)
        spacing = like.meta.get("spacing") if like is not None else None
        if spacing is not None:
            affine[:3, :3] = np.diag(spacing)
        origin = like.meta.get("origin") if like is not None else None
        if origin is not None:
            affine[:3, 3] = origin
    image = nibabel.Nifti1Image(np.asarray(array, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(path))


def read_dicom_series(folder: Path) -> ImageData:
    """The slices of one series stacked along their normal, (slice, row, column), with the
    voxel spacing (slice distance, row spacing, column spacing) and an affine."""
    import pydicom

    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(str(file))
        except Exception:  # pydicom's own types: not a DICOM file, skip it
            continue
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise InputDataError(f"folder {str(folder)!r} holds no DICOM image slices")
    series = {s.get("SeriesInstanceUID") for s in slices}
    if len(series) > 1:
        raise InputDataError(
            f"folder {str(folder)!r} holds {len(series)} DICOM series; give one series a folder"
        )
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    positions = [float(np.dot(normal, np.array(s.ImagePositionPatient, float))) for s in slices]
    order = np.argsort(positions)
    slices = [slices[i] for i in order]
    positions = [positions[i] for i in order]
    volume = np.stack([_pixels(s) for s in slices]).astype(np.float32)
    pixel = [float(v) for v in slices[0].PixelSpacing]  # (row spacing, column spacing)
    distance = (
        float(np.median(np.diff(positions)))
        if len(slices) > 1
        else float(getattr(slices[0], "SliceThickness", 1.0))
    )
    affine = np.eye(4)
    # Voxel (k, r, c) → patient: origin + k·distance·normal + r·pixel_r·column + c·pixel_c·row.
    affine[:3, 0] = normal * distance
    affine[:3, 1] = column * pixel[0]
    affine[:3, 2] = row * pixel[1]
    affine[:3, 3] = np.array(slices[0].ImagePositionPatient, dtype=np.float64)
    # DICOM patient coordinates are LPS, NIfTI's RAS: flip x and y so maps overlay in viewers.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    meta = {"spacing": (distance, pixel[0], pixel[1]), "affine": affine}
    return ImageData(volume, meta, folder)


def _pixels(dataset) -> np.ndarray:
    values = dataset.pixel_array.astype(np.float32)
    slope = float(getattr(dataset, "RescaleSlope", 1.0))
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
    return values * slope + intercept

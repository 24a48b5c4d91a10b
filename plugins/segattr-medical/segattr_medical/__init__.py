"""NIfTI and DICOM for segattr-onnx: read volumes with their geometry, write maps back on it.

Registered through the ``segattr_onnx.plugins`` entry point; segattr-onnx itself never imports
nibabel or pydicom.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segattr_onnx.errors import InputDataError
from segattr_onnx.files import check_claimed_bytes
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
    with np.errstate(invalid="ignore"):
        affine = image.affine
    if affine is None or not np.isfinite(affine).all():
        raise InputDataError(
            f"NIfTI {str(path)!r} has an affine holding NaN or infinity, so its voxels have no "
            "place in space; fix the file's header (its sform/qform, e.g. nibabel's set_sform "
            "or fslorient) or export the image again"
        )
    # The header's size, checked before the (possibly compressed) data is inflated.
    check_claimed_bytes(f"NIfTI {path.name}", _float32_bytes(image.header.get_data_shape()))
    array = np.asarray(image.dataobj, dtype=np.float32)
    spacing = tuple(float(z) for z in image.header.get_zooms()[: array.ndim])
    if not all(np.isfinite(z) and z > 0 for z in spacing[:3]):
        raise InputDataError(
            f"NIfTI {str(path)!r} has voxel sizes {spacing} in its header (pixdim), not "
            "positive numbers; fix the file's header or export the image again"
        )
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
    array = np.asarray(array, dtype=np.float32)
    if like is not None and like.meta.get("affine") is not None:
        # A 2D map of a one-slice volume (a 1-slice DICOM series): keep the slice axis, so
        # each array axis meets its own column of the input's affine.
        shape = np.shape(like.array)
        if (
            len(shape) > array.ndim
            and shape[-array.ndim :] == array.shape
            and int(np.prod(shape)) == array.size
        ):
            array = array.reshape(shape)
    image = nibabel.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(path))


def _float32_bytes(shape) -> int:
    """What a volume of ``shape`` takes as float32 (Python ints: no overflow)."""
    count = 1
    for size in shape:
        count *= max(int(size), 0)
    return count * 4


DICM_OFFSET = 128  # a DICOM file: a 128-byte preamble, then "DICM"
_GEOMETRY = ("ImageOrientationPatient", "ImagePositionPatient")
_SAME_POSITION_MM = 1e-3


def read_dicom_series(folder: Path) -> ImageData:
    """The slices of one series stacked along their normal, (slice, row, column), with the
    voxel spacing (slice distance, row spacing, column spacing) and an affine.

    Every file directly in the folder whose bytes 128-131 are "DICM" is read; other files
    (notes, non-DICOM exports) and subfolders are left alone. A one-slice series is a
    ``(1, rows, columns)`` volume, which a 2D one-channel model takes as its channel axis; its
    slice distance is its SliceThickness, and a lone slice without patient geometry (a
    radiograph, a secondary capture) is placed on the identity grid at the origin. Anything
    that would make the volume wrong (a damaged file, two series, slices of other sizes or
    without position or orientation, two slices at one position) is an ``InputDataError``.
    """
    slices = _read_slices(folder)
    _check_one_series(folder, slices)
    _check_one_size(folder, slices)
    if len(slices) == 1:
        file, dataset = slices[0]
        orientation = _numbers(folder, file, dataset, _GEOMETRY[0], 6, [1, 0, 0, 0, 1, 0])
        origin = _numbers(folder, file, dataset, _GEOMETRY[1], 3, [0, 0, 0])
        row, column, normal = _axes(folder, file, orientation)
        thickness = _float(dataset.get("SliceThickness"))
        distance = thickness if thickness is not None and thickness > 0 else 1.0
        pixel = _pixel_spacing(folder, file, dataset, required=False)
    else:
        orientations = [
            _numbers(folder, file, dataset, _GEOMETRY[0], 6) for file, dataset in slices
        ]
        for (file, _), other in zip(slices, orientations, strict=True):
            if not np.allclose(other, orientations[0], atol=1e-4):
                raise InputDataError(
                    f"slices {slices[0][0].name} and {file.name} of {str(folder)!r} lie in "
                    "different orientations (ImageOrientationPatient); a series' slices are "
                    "parallel: move the other ones (a localizer?) out of the folder"
                )
        row, column, normal = _axes(folder, slices[0][0], orientations[0])
        corners = [_numbers(folder, file, dataset, _GEOMETRY[1], 3) for file, dataset in slices]
        positions = [float(np.dot(normal, corner)) for corner in corners]
        order = np.argsort(positions, kind="stable")
        slices = [slices[i] for i in order]
        positions = [positions[i] for i in order]
        origin = corners[order[0]]
        steps = np.diff(positions)
        if steps.min() < _SAME_POSITION_MM:
            i = int(np.argmin(steps))
            raise InputDataError(
                f"slices {slices[i][0].name} and {slices[i + 1][0].name} of {str(folder)!r} "
                f"lie at the same position ({positions[i]:g} mm along the slice normal): the "
                "folder holds two acquisitions or duplicate files; keep one copy of each slice"
            )
        distance = float(np.median(steps))
        pixel = _pixel_spacing(folder, slices[0][0], slices[0][1], required=True)
    rows, columns = int(slices[0][1].get("Rows", 0)), int(slices[0][1].get("Columns", 0))
    check_claimed_bytes(f"DICOM series {folder.name}", _float32_bytes((len(slices), rows, columns)))
    volume = np.stack([_pixels(folder, file, dataset) for file, dataset in slices])
    affine = np.eye(4)
    # Voxel (k, r, c) → patient: origin + k·distance·normal + r·pixel_r·column + c·pixel_c·row.
    affine[:3, 0] = normal * distance
    affine[:3, 1] = column * pixel[0]
    affine[:3, 2] = row * pixel[1]
    affine[:3, 3] = origin
    # DICOM patient coordinates are LPS, NIfTI's RAS: flip x and y so maps overlay in viewers.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    meta = {"spacing": (distance, pixel[0], pixel[1]), "affine": affine}
    return ImageData(volume.astype(np.float32), meta, folder)


def _read_slices(folder: Path) -> list[tuple[Path, Any]]:
    """(file, dataset) of every DICOM image in ``folder``, by file name."""
    import pydicom

    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())  # loops are not files
    except OSError as exc:
        raise InputDataError(f"cannot list folder {str(folder)!r}: {exc.strerror or exc}") from exc
    slices = []
    for file in files:
        try:
            with file.open("rb") as stream:
                head = stream.read(DICM_OFFSET + 4)
        except OSError as exc:
            raise InputDataError(f"cannot read {str(file)!r}: {exc.strerror or exc}") from exc
        if head[DICM_OFFSET:] != b"DICM":
            continue  # not a DICOM file
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about every odd element
                dataset = pydicom.dcmread(str(file))
                has_pixels = "PixelData" in dataset
                image = has_pixels or _is_image(dataset)
        except Exception as exc:  # pydicom's own types, on a file that says it is DICOM
            raise _damaged(folder, file, f"{type(exc).__name__}: {exc}") from exc
        if has_pixels:
            slices.append((file, dataset))
        elif image:
            raise _damaged(folder, file, "no pixel data: the file ends early or is garbled")
        # Otherwise a DICOMDIR, a report, a presentation state: no slice, left alone.
    if not slices:
        raise InputDataError(
            f"folder {str(folder)!r} holds no DICOM image (a file with 'DICM' at byte 128 and "
            "pixel data); give the folder that holds the slices of one series"
        )
    return slices


def _is_image(dataset) -> bool:
    """Whether a DICOM file without pixel data should have had some: an image storage class,
    or no class at all (a file cut short or garbled before its header ended)."""
    from pydicom.uid import UID

    meta = getattr(dataset, "file_meta", None)
    uid = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    return not uid or "Image Storage" in UID(str(uid)).name


def _damaged(folder: Path, file: Path, reason: str) -> InputDataError:
    return InputDataError(
        f"{file.name} in {str(folder)!r} is a damaged DICOM file ({reason}); re-export the "
        "series (leaving the slice out would explain a volume with a hole)"
    )


def _check_one_series(folder: Path, slices: list[tuple[Path, Any]]) -> None:
    series: dict[str, list[Path]] = {}
    for file, dataset in slices:
        series.setdefault(str(dataset.get("SeriesInstanceUID", "")), []).append(file)
    if len(series) > 1:
        described = "; ".join(
            f"{uid or 'no SeriesInstanceUID'}: {_count(files)}, e.g. {files[0].name}"
            for uid, files in series.items()
        )
        raise InputDataError(
            f"folder {str(folder)!r} holds {len(series)} DICOM series ({described}); put each "
            "series in its own folder and give one folder"
        )


def _check_one_size(folder: Path, slices: list[tuple[Path, Any]]) -> None:
    sizes: dict[tuple[int, int], list[Path]] = {}
    for file, dataset in slices:
        try:
            size = (int(dataset.Rows), int(dataset.Columns))
        except (AttributeError, TypeError, ValueError) as exc:
            raise _damaged(folder, file, "no valid Rows and Columns") from exc
        sizes.setdefault(size, []).append(file)
    if len(sizes) > 1:
        described = ", ".join(
            f"{r}x{c} ({_count(files)}, e.g. {files[0].name})" for (r, c), files in sizes.items()
        )
        raise InputDataError(
            f"the slices in {str(folder)!r} have different sizes (Rows x Columns: {described}); "
            "a series' slices share one size: move the odd ones (a localizer?) out of the "
            "folder, or re-export the series"
        )


def _count(files: list[Path]) -> str:
    return f"{len(files)} slice{'s' if len(files) != 1 else ''}"


def _numbers(
    folder: Path, file: Path, dataset, tag: str, count: int, default: list[float] | None = None
) -> np.ndarray:
    value = dataset.get(tag)
    if value is None or value == "":
        if default is not None:
            return np.array(default, dtype=np.float64)
        raise InputDataError(
            f"slice {file.name} of {str(folder)!r} has no {tag}, so the slices cannot be put in "
            "order in space; re-export the series with its patient geometry"
        )
    numbers = _float_list(value)
    if numbers is None or len(numbers) != count or not np.isfinite(numbers).all():
        raise InputDataError(
            f"slice {file.name} of {str(folder)!r} has a malformed {tag} ({value!r}, not "
            f"{count} numbers); re-export the series with its patient geometry"
        )
    return numbers


def _axes(folder: Path, file: Path, orientation: np.ndarray) -> tuple[np.ndarray, ...]:
    """The row and column direction cosines and the slice normal, each of length 1."""
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    lengths = [np.linalg.norm(v) for v in (row, column, normal)]
    if min(lengths) < 1e-3:
        raise InputDataError(
            f"slice {file.name} of {str(folder)!r} has an ImageOrientationPatient whose row and "
            "column directions are zero or parallel; re-export the series with its geometry"
        )
    row, column, normal = (v / n for v, n in zip((row, column, normal), lengths, strict=True))
    return row, column, normal


def _pixel_spacing(folder: Path, file: Path, dataset, required: bool) -> tuple[float, float]:
    """(row spacing, column spacing) in mm."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = dataset.get(tag)
        if value is not None and value != "":
            numbers = _float_list(value)
            if numbers is None or len(numbers) != 2 or not (numbers > 0).all():
                raise InputDataError(
                    f"slice {file.name} of {str(folder)!r} has a malformed {tag} ({value!r}); "
                    "re-export the series with its geometry"
                )
            return float(numbers[0]), float(numbers[1])
    if not required:
        return 1.0, 1.0
    raise InputDataError(
        f"slice {file.name} of {str(folder)!r} has no PixelSpacing, so the volume has no size "
        "in mm; re-export the series with its geometry"
    )


def _float_list(value) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _pixels(folder: Path, file: Path, dataset) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = dataset.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom's and its decoders' own types
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise InputDataError(
                f"{file.name} in {str(folder)!r}: its {syntax.name} pixel data cannot be "
                f"decoded ({exc}); install pydicom's decoders (pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg), decompress the series (gdcmconv --raw) "
                "or, if the file is damaged, re-export the series"
            ) from exc
        raise _damaged(folder, file, f"its pixel data cannot be decoded: {exc}") from exc
    if values.ndim != 2:
        raise InputDataError(
            f"{file.name} in {str(folder)!r} holds {values.shape} pixels, not one slice (a "
            "multi-frame or colour image); give a series of one single-frame slice per file"
        )
    slope = _float(dataset.get("RescaleSlope", 1.0))
    intercept = _float(dataset.get("RescaleIntercept", 0.0))
    return values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)

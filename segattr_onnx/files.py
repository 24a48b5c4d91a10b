"""Reading user arrays and writing maps safely: nothing is overwritten or modified in place."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from segattr_onnx.errors import InputDataError, OutputFileError


def load_array(path: str | os.PathLike[str], key: str | None = None) -> np.ndarray:
    """One array from a ``.npy`` or ``.npz`` file (pickles refused: they can run code)."""
    source = Path(path)
    if not source.is_file():
        raise InputDataError(f"input file {str(source)!r} does not exist")
    try:
        loaded = np.load(source, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InputDataError(
            f"cannot read {str(source)!r} as .npy/.npz ({exc}); save the input with numpy.save"
        ) from exc
    if isinstance(loaded, np.ndarray):
        if key is not None:
            raise InputDataError(f"{source.name} is a .npy file; --input-key is for .npz files")
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is None:
            if len(names) != 1:
                raise InputDataError(
                    f"{source.name} holds {len(names)} arrays ({', '.join(names) or 'none'}); "
                    "choose one with --input-key"
                )
            key = names[0]
        if key not in names:
            raise InputDataError(
                f"{source.name} has no array {key!r}; it holds: {', '.join(names)}"
            )
        try:
            return loaded[key]
        except ValueError as exc:
            raise InputDataError(f"cannot read array {key!r} of {source.name}: {exc}") from exc


def save_array(
    path: str | os.PathLike[str],
    array: np.ndarray,
    force: bool = False,
    protected: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Write a ``.npy`` atomically; refuse to replace an existing file unless ``force``, and
    never replace one of ``protected`` (the user's model and input) even then."""
    target = Path(path)
    if target.suffix != ".npy":
        raise OutputFileError(f"output {str(target)!r} must end in .npy")
    for other in protected:
        if Path(other).exists() and target.exists() and target.samefile(other):
            raise OutputFileError(
                f"output {str(target)!r} is one of the inputs; choose another --out path"
            )
    if target.exists() and not force:
        raise OutputFileError(
            f"output {str(target)!r} already exists; pass --force to replace it or choose "
            "another path"
        )
    if not target.parent.is_dir():
        raise OutputFileError(f"folder {str(target.parent)!r} of the output does not exist")
    handle, temporary = tempfile.mkstemp(prefix=".segattr-", suffix=".npy", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target

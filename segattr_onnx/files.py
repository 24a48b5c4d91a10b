"""Reading user arrays and writing maps safely: nothing is overwritten or modified in place."""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
import zipfile
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from segattr_onnx.errors import InputDataError, OutputFileError, SegattrError
from segattr_onnx.plugins import ImageData, registry
from segattr_onnx.text import setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


TOML_BYTE_LIMIT = 1 << 20  # configs and cards are a few lines; a device or a huge file is not


def load_toml(path: str | os.PathLike[str], what: str, error: type[SegattrError]) -> dict:
    """A TOML file's contents, or ``error`` saying the ``what`` is missing or malformed."""
    source = Path(path)
    if source.exists() and not source.is_file():
        raise error(f"{what} {str(source)!r} is not a regular file")
    if source.is_file() and source.stat().st_size > TOML_BYTE_LIMIT:
        raise error(f"{what} {str(source)!r} is larger than {TOML_BYTE_LIMIT:,} bytes")
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{what} {str(source)!r} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{what} {str(source)!r} is not valid TOML: {exc}") from exc


def reject_unknown_keys(
    table: dict,
    known: Collection[str],
    where: str,
    error: type[SegattrError],
    elsewhere: Mapping[str, str] | None = None,
) -> None:
    """Refuse a key ``where`` does not take, naming the closest known key, or the place the key
    belongs when it is known ``elsewhere``: a typo must never silently fall back to a default."""
    for key in table:
        if key in known:
            continue
        if elsewhere and key in elsewhere:
            raise error(f"{key!r} does not belong in {where}; it goes in {elsewhere[key]}")
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else f"{where} takes {', '.join(sorted(known)) or 'no keys'}"
        )
        raise error(f"unknown key {key!r} in {where}; {hint}")


def load_array(
    path: str | os.PathLike[str],
    key: str | None = None,
    key_option: str | None = None,
    preferred: str | None = None,
) -> np.ndarray:
    """One array from a ``.npy`` or ``.npz`` file (pickles refused: they can run code).

    In an ``.npz`` of several arrays, ``preferred`` names the one to take when present (the
    ``image`` and ``labels`` of a ``segattr synth`` case).
    """
    key_option = key_option or setting("--input-key", "key=")
    source = Path(path)
    if not source.is_file():
        raise InputDataError(f"input file {str(source)!r} does not exist")
    _check_array_sizes(source)
    try:
        loaded = np.load(source, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InputDataError(
            f"cannot read {str(source)!r} as .npy/.npz ({exc}); save the input with numpy.save"
        ) from exc
    if isinstance(loaded, np.ndarray):
        if key is not None:
            raise InputDataError(f"{source.name} is a .npy file; {key_option} is for .npz files")
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is None and preferred in names and len(names) > 1:
            key = preferred
        if key is None:
            if len(names) != 1:
                raise InputDataError(
                    f"{source.name} holds {len(names)} arrays ({', '.join(names) or 'none'}); "
                    f"choose one with {key_option}"
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


# The memory budget of the run reading inputs, when the user gave one (``input_budget``).
_INPUT_BUDGET: ContextVar[int | None] = ContextVar("segattr_input_budget", default=None)


def array_byte_limit() -> int:
    """The largest array a file may hold: half the machine's memory, or the run's memory
    budget when smaller. Headers are read, and checked against this and against the bytes
    really stored, before anything is allocated."""
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: a fixed 8 GiB
        limit = 8 << 30
    budget = _INPUT_BUDGET.get()
    return limit if budget is None else min(limit, budget)


@contextmanager
def input_budget(budget: int | None) -> Iterator[None]:
    """Within this block, inputs larger than ``budget`` bytes are refused as they are read."""
    token = _INPUT_BUDGET.set(budget)
    try:
        yield
    finally:
        _INPUT_BUDGET.reset(token)


def check_claimed_bytes(what: str, claimed: int) -> None:
    """Refuse an input whose header claims more bytes than ``array_byte_limit`` allows; for
    readers (plugins included) to call before they allocate the array."""
    limit = array_byte_limit()
    if claimed > limit:
        budget = _INPUT_BUDGET.get()
        bound = (
            f"the memory budget ({budget:,} bytes)"
            if budget is not None and budget == limit
            else f"this machine can hold ({limit:,} bytes)"
        )
        raise InputDataError(
            f"{what}: its header claims an array of {claimed:,} bytes, more than {bound}; "
            "refusing to read it"
        )


def _check_array_sizes(source: Path) -> None:
    """Refuse a .npy whose header claims more (or other) bytes than the file stores, or more
    than ``array_byte_limit``, and an .npz member that would inflate past it (a zip bomb)."""
    limit = array_byte_limit()
    try:
        if zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as archive:
                for info in archive.infolist():
                    if info.file_size > limit:
                        check_claimed_bytes(
                            f"{source.name}: array {info.filename!r}", info.file_size
                        )
                    if info.filename.endswith(".npy"):
                        with archive.open(info) as stream:
                            _check_npy_header(
                                stream, info.file_size, f"{source.name}:{info.filename}"
                            )
            return
        with source.open("rb") as stream:
            _check_npy_header(stream, source.stat().st_size, source.name)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputDataError(
            f"cannot read {str(source)!r} as .npy/.npz ({exc}); save the input with numpy.save"
        ) from exc


def _check_npy_header(stream, stored: int, what: str) -> None:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    payload = stored - stream.tell()
    check_claimed_bytes(what, claimed)
    if not dtype.hasobject and claimed != payload:
        raise InputDataError(
            f"{what}: its header claims {claimed:,} bytes of data but the file stores "
            f"{payload:,}; the file is truncated or forged"
        )


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_inputs(target: Path, protected: tuple[str | os.PathLike[str], ...], what: str) -> None:
    """No output may be an input of the same run: the same file (through any link), or a file
    inside an input folder (a DICOM series)."""
    for other in map(Path, protected):
        if not other.exists():
            continue
        if other.is_dir():
            if target.parent.resolve().is_relative_to(other.resolve()):
                raise OutputFileError(
                    f"{what}{str(target)!r} is inside the input folder {str(other)!r}; "
                    "choose a path outside it"
                )
        elif target.exists() and target.samefile(other):
            raise OutputFileError(
                f"{what}{str(target)!r} is one of the inputs; choose another path"
            )


def check_output_path(
    path: str | os.PathLike[str],
    force: bool = False,
    protected: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Refuse an output path before any work: wrong suffix, missing folder, an existing file
    without ``force``, or one of the user's own files (``protected``) even with it."""
    target = Path(path)
    if target.suffix != ".npy" and registry().writer_for(target) is None:
        known = ", ".join([".npy", *sorted(s for s in registry().writers if s != "/")])
        raise OutputFileError(
            f"output {str(target)!r} has no writer; use one of {known} (plugins add formats)"
        )
    _refuse_inputs(target, protected, "output ")
    if target.exists() and not force:
        raise OutputFileError(
            f"output {str(target)!r} already exists; pass {setting('--force', 'force=True')} to "
            "replace it or choose another path"
        )
    if not target.parent.is_dir():
        raise OutputFileError(f"folder {str(target.parent)!r} of the output does not exist")
    if not os.access(target.parent, os.W_OK):
        raise OutputFileError(f"folder {str(target.parent)!r} of the output is not writable")
    return target


def check_new_file(
    path: str | os.PathLike[str],
    suffixes: tuple[str, ...],
    force: bool = False,
    protected: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """The same refusals as ``check_output_path`` for a picture or report of given suffixes."""
    target = Path(path)
    if not any(target.name.lower().endswith(suffix) for suffix in suffixes):
        raise OutputFileError(f"{str(target)!r} must end in {' or '.join(suffixes)}")
    _refuse_inputs(target, protected, "")
    if target.exists() and not force:
        raise OutputFileError(
            f"{str(target)!r} already exists; pass {setting('--force', 'force=True')} to replace it"
        )
    if not target.parent.is_dir():
        raise OutputFileError(f"folder {str(target.parent)!r} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise OutputFileError(f"folder {str(target.parent)!r} is not writable")
    return target


def publish_file(staged: Path, target: Path, force: bool) -> None:
    """Move a fully written ``staged`` file (same folder tree, same file system) to ``target``
    with the permissions of a plain new file: replacing what is there only with ``force``,
    else exclusively (a hard link fails when the name was taken meanwhile, where a rename
    would silently replace it)."""
    os.chmod(staged, 0o666 & ~_current_umask())
    if force:
        os.replace(staged, target)
        return
    try:
        os.link(staged, target)
    except FileExistsError as exc:
        raise OutputFileError(
            f"{str(target)!r} appeared while the run was writing it; nothing was replaced"
        ) from exc
    os.unlink(staged)


def write_bytes(path: Path, data: bytes) -> None:
    """Atomic write: a temporary file in the same folder, then a rename."""
    handle, temporary = tempfile.mkstemp(prefix=".segattr-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_array(
    path: str | os.PathLike[str],
    array: np.ndarray,
    force: bool = False,
    protected: tuple[str | os.PathLike[str], ...] = (),
    like: ImageData | None = None,
) -> Path:
    """Write a map atomically (temporary file, then rename), after ``check_output_path``.

    ``.npy`` is written here; other suffixes by the plugin writer registered for them, which
    gets ``like`` (the input as read) to copy its geometry, e.g. a NIfTI affine.
    """
    target = check_output_path(path, force, protected)
    suffix = "".join(target.suffixes) if target.suffix != ".npy" else ".npy"
    try:
        handle, temporary = tempfile.mkstemp(prefix=".segattr-", suffix=suffix, dir=target.parent)
    except OSError as exc:
        raise OutputFileError(f"cannot write in {str(target.parent)!r}: {exc.strerror}") from exc
    try:
        if suffix == ".npy":
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
        else:
            os.close(handle)
            writer = registry().writer_for(target)
            assert writer is not None
            writer(Path(temporary), array, like)
        # mkstemp makes the file private (0600); give it the permissions of a plain new file.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise OutputFileError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def folder_without_reader(folder: Path) -> str:
    """What to say when a folder is given and no installed plugin reads folders."""
    return (
        f"{str(folder)!r} is a folder, and no installed plugin reads folders; a DICOM series "
        "needs the segattr-medical plugin (pip install ./plugins/segattr-medical), any other "
        "input is a file"
    )


def read_image(
    path: str | os.PathLike[str], key: str | None = None, preferred: str | None = None
) -> ImageData:
    """An input image: a plugin's reader for its format (or a folder), else .npy/.npz."""
    source = Path(path)
    if source.is_symlink() and not source.exists():
        raise InputDataError(
            f"{str(source)!r} is a symbolic link that leads nowhere (a loop, or its target is "
            "gone); give the file or folder itself"
        )
    reader = registry().reader_for(source) if source.exists() else None
    if reader is not None:
        try:
            return reader(source)
        except SegattrError:
            raise
        except Exception as exc:  # third-party readers raise their own types
            reason = str(exc).strip() or type(exc).__name__
            raise InputDataError(f"cannot read {str(source)!r}: {reason}") from exc
    if source.is_dir():
        raise InputDataError(folder_without_reader(source))
    return ImageData(load_array(source, key, preferred=preferred), {}, source)

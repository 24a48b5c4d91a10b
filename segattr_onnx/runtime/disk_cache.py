"""A per-user folder of byte blobs (ONNX Runtime's optimised graphs), verified before each use.

Rewriting a model and letting ONNX Runtime optimise it costs the same work on every call; the
result depends only on what it was computed from, so it is kept on disk under a key made of
all of that (``cache_key``) and loaded on the next call.

A cache folder is hostile territory: another user or a vendor tool may plant a file in it, a
disk may corrupt one, a folder may be left writable by others. Nothing read from it is trusted:

- the folder (and its ``entries`` folder) must be a real directory, ours, not group or world
  writable; otherwise the cache is not used at all (``open_default``) or refused (the class);
- each entry carries an HMAC-SHA256 of its key and payload under a 32-byte secret that only
  the user can read (``root/secret``), so a planted, corrupted or renamed entry fails;
- entries are opened without following links, checked to be regular files we own and no
  larger than the bound before a byte is read, so a length field is never trusted;
- an entry that fails is removed (when it is a file or link we own) and counted as rejected;
  the caller rebuilds it, exactly as on a miss.

Entries are written to a temporary file and renamed into place, so a reader (or a second
writer of the same key) only ever sees a whole entry, and the folder is kept under its bound
by removing the least recently used entries (oldest modification time; a hit refreshes it).
Problems writing (disk full, permissions) never fail the run: they warn once and the run goes
on without storing. POSIX only (ownership and ``O_NOFOLLOW``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from segattr_onnx.errors import OutputFileError

DEFAULT_MAX_BYTES = 512 << 20
ENV_DIR = "SEGATTR_CACHE_DIR"
ENV_MAX = "SEGATTR_CACHE_MAX_BYTES"

MAGIC = b"SEGATTR-CACHE\x01"
MAC_BYTES = 32
LENGTH_BYTES = 8
HEADER_BYTES = len(MAGIC) + MAC_BYTES + LENGTH_BYTES
SECRET_BYTES = 32
BLOCK_BYTES = 1 << 20  # files are hashed a block at a time: a model's weights can be GBs
STALE_TEMP_SECONDS = 3600  # a temporary file this old belongs to a writer that died
TEMP_PREFIX = ".tmp-"
ENTRY_SUFFIX = ".bin"

_KEY = re.compile(r"[0-9a-f]{64}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# A FIFO planted where a file is expected would block a plain open; regular files ignore this.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_FIX = f"fix its owner/permissions or set {ENV_DIR}"


class CacheWarning(UserWarning):
    """The cache cannot be used or written: the run goes on without it."""


@dataclass
class CacheStats:
    """What one ``DiskCache`` did, for logs and tests."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0  # entries found but failing verification (removed when ours)
    evicted: int = 0
    stored: int = 0


def _uid() -> int:
    """The user the cache belongs to (a function, so tests can play another user)."""
    return os.getuid()


# --- keys -------------------------------------------------------------------------------------


def _encode(part: str | bytes | int | tuple) -> bytes:
    """A typed, length-prefixed encoding: no two different parts (or sequences of parts) share
    one, so ``("ab", "c")`` and ``("a", "bc")``, or ``"1"``, ``b"1"`` and ``1``, differ."""
    if isinstance(part, bool):  # a bool is an int to Python, but True is not the key 1
        tag, body = b"o", b"1" if part else b"0"
    elif isinstance(part, int):
        tag, body = b"i", str(part).encode("ascii")
    elif isinstance(part, str):
        tag, body = b"s", part.encode("utf-8", "surrogatepass")
    elif isinstance(part, (bytes, bytearray, memoryview)):
        tag, body = b"b", bytes(part)
    elif isinstance(part, tuple):
        tag, body = b"t", len(part).to_bytes(8, "little") + b"".join(_encode(p) for p in part)
    else:
        raise TypeError(f"cache key parts are str, bytes, int or tuple, not {type(part).__name__}")
    return tag + len(body).to_bytes(8, "little") + body


def cache_key(*parts: str | bytes | int | tuple) -> str:
    """The sha256 hex digest of an unambiguous encoding of ``parts``: the name of an entry,
    which changes whenever anything the entry was computed from changes."""
    return hashlib.sha256(b"segattr-cache-key\0" + _encode(parts)).hexdigest()


def is_cache_key(text: str) -> bool:
    """Whether ``text`` is a ``cache_key`` (64 lowercase hex characters): what an entry that
    names another entry must hold before it is followed."""
    return _KEY.fullmatch(text) is not None


def default_cache_dir() -> Path:
    """``$SEGATTR_CACHE_DIR``, else ``$XDG_CACHE_HOME/segattr-onnx``, else
    ``~/.cache/segattr-onnx`` (the XDG base-directory convention; a relative
    ``XDG_CACHE_HOME`` is ignored, as that convention says)."""
    override = os.environ.get(ENV_DIR, "").strip()
    if override:
        return Path(os.path.abspath(Path(override).expanduser()))
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "segattr-onnx"
    return Path.home() / ".cache" / "segattr-onnx"


def _checked_max_bytes(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OutputFileError(
            f"{what} {value!r} is not a number of bytes >= 0; give e.g. {DEFAULT_MAX_BYTES} "
            "(0 stores nothing)"
        )
    return value


def default_max_bytes() -> int:
    """``$SEGATTR_CACHE_MAX_BYTES`` (a whole number of bytes), else ``DEFAULT_MAX_BYTES``; a
    bad value fails at once rather than silently caching without a bound."""
    text = os.environ.get(ENV_MAX, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value: object = int(text)
    except ValueError:
        value = text
    return _checked_max_bytes(value, ENV_MAX)


# --- checks on what is in the folder ----------------------------------------------------------


def _folder_problem(path: Path) -> str | None:
    """What makes ``path`` unsafe to keep entries in, or None: it must be a directory itself
    (not a link to one), ours, and writable by no one else."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != _uid():
        return f"is owned by user {info.st_uid}, not by you ({_uid()})"
    if info.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _make_folder(path: Path, parents: bool = True) -> str | None:
    """Create ``path`` (mode 0700, parents as needed) unless it exists, then check it."""
    if not os.path.lexists(path):
        try:
            path.mkdir(mode=0o700, parents=parents, exist_ok=True)
        except OSError as exc:
            return f"cannot be created ({exc.strerror or exc})"
    return _folder_problem(path)


def _secret_problem(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != _uid():
        return f"is owned by user {info.st_uid}, not by you ({_uid()})"
    if info.st_mode & 0o077:
        return f"is readable or writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if info.st_size != SECRET_BYTES:
        return f"holds {info.st_size} bytes, not {SECRET_BYTES}"
    return None


def _create_secret(path: Path) -> None:
    """Publish 32 random bytes at ``path`` unless a secret is there already. The bytes are
    written to an exclusive temporary file and linked into place, so a second process never
    reads a half-written secret; where links are not supported it is created exclusively."""
    temp = path.with_name(TEMP_PREFIX + secrets.token_hex(8))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(SECRET_BYTES))
        os.link(temp, path)
    except FileExistsError:
        pass  # another process published its secret first: use that one
    except OSError:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(SECRET_BYTES))
    finally:
        _unlink_quietly(temp)


def _read_secret(path: Path) -> bytes | str:
    """The secret's bytes, or what is wrong with the file holding them."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            return "is a symbolic link"
        return f"cannot be read ({exc.strerror or exc})"
    with os.fdopen(fd, "rb") as handle:
        problem = _secret_problem(os.fstat(handle.fileno()))
        if problem is not None:
            return problem
        secret = handle.read(SECRET_BYTES + 1)
    if len(secret) != SECRET_BYTES:
        return f"holds {len(secret)} bytes, not {SECRET_BYTES}"
    return secret


def _unlink_quietly(path: str | os.PathLike[str]) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _mac(secret: bytes, key: str, payload: bytes | memoryview) -> bytes:
    """HMAC-SHA256 of ``key + b"\\0" + payload``: the key is inside, so an entry copied under
    another key's name fails as surely as an altered one."""
    digest = hmac.new(secret, key.encode("ascii"), hashlib.sha256)
    digest.update(b"\0")
    digest.update(payload)
    return digest.digest()


# --- the cache --------------------------------------------------------------------------------


class DiskCache:
    """Verified payloads by key in ``root``, at most ``max_bytes`` of entries on disk.

    The folder, its ``entries`` folder and its secret are checked once, here; an unsafe folder
    raises ``OutputFileError`` (``open_default`` turns that into a warning and no cache).
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = _checked_max_bytes(max_bytes, "the cache bound")
        self.root = Path(root)
        self.stats = CacheStats()
        self._warned = False
        self._entries = self.root / "entries"
        self._secret = self._open_folder()

    def _unsafe(self, what: Path, problem: str) -> OutputFileError:
        where = "" if what == self.root else f": {str(what)!r}"
        return OutputFileError(f"unsafe cache folder {str(self.root)!r}{where} {problem}; {_FIX}")

    def _open_folder(self) -> bytes:
        for folder in (self.root, self._entries):
            problem = _make_folder(folder)
            if problem is not None:
                raise self._unsafe(folder, problem)
        path = self.root / "secret"
        if not os.path.lexists(path):
            try:
                _create_secret(path)
            except OSError as exc:
                raise self._unsafe(path, f"cannot be created ({exc.strerror or exc})") from exc
        secret = _read_secret(path)
        if isinstance(secret, str):
            raise self._unsafe(path, secret)
        return secret

    @classmethod
    def open_default(cls) -> DiskCache | None:
        """The user's cache (``SEGATTR_CACHE_DIR`` and ``SEGATTR_CACHE_MAX_BYTES`` honoured), or
        None with a ``CacheWarning`` when its folder is unsafe or cannot be created: a run
        never fails for want of a cache. A bad ``SEGATTR_CACHE_MAX_BYTES`` raises, though."""
        max_bytes = default_max_bytes()
        try:
            root = default_cache_dir()
        except (RuntimeError, KeyError) as exc:  # no home folder to put it in
            warnings.warn(f"no cache folder ({exc}); set {ENV_DIR}", CacheWarning, stacklevel=2)
            return None
        try:
            return cls(root, max_bytes)
        except OutputFileError as exc:
            warnings.warn(str(exc), CacheWarning, stacklevel=2)
            return None

    # --- reading ------------------------------------------------------------------------------

    def _entry_path(self, key: str) -> Path:
        """Where ``key``'s entry lives; only a ``cache_key`` is accepted, so no key can name a
        path outside the folder."""
        if not isinstance(key, str) or _KEY.fullmatch(key) is None:
            raise ValueError(f"a cache key is 64 lowercase hex characters, not {key!r}")
        return self._entries / key[:2] / (key + ENTRY_SUFFIX)

    def _reject(self, path: Path) -> None:
        """Count a bad entry and remove it when it is a file (or link) of ours; a link is
        removed itself, never what it points to."""
        self.stats.rejected += 1
        try:
            info = os.lstat(path)
        except OSError:
            return
        kind = stat.S_IFMT(info.st_mode)
        if kind in (stat.S_IFREG, stat.S_IFLNK) and info.st_uid == _uid():
            _unlink_quietly(path)

    def load(self, key: str) -> bytes | None:
        """The payload stored under ``key``, verified; None when absent. An entry that fails
        verification (bad magic, truncated, wrong MAC, another key recorded inside, not a
        regular file, a link, not ours) is removed when it is ours, counted in
        ``stats.rejected``, and None is returned so the caller rebuilds it. An entry larger
        than the bound is not read (a miss; eviction removes it). A hit refreshes the entry's
        modification time, which eviction orders by."""
        path = self._entry_path(key)
        if _folder_problem(path.parent) is not None:
            if os.path.lexists(path.parent):  # a link, a file or someone else's folder
                self.stats.rejected += 1
            else:
                self.stats.misses += 1
            return None
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError:  # a link (O_NOFOLLOW), or unreadable
            self._reject(path)
            return None
        try:
            info = os.fstat(fd)  # of what was opened: no swap after a check can fool it
            if not stat.S_ISREG(info.st_mode) or info.st_uid != _uid():
                self._reject(path)
                return None
            if info.st_size > self.max_bytes + HEADER_BYTES:
                self.stats.misses += 1
                return None
            with os.fdopen(fd, "rb", closefd=False) as handle:
                payload = self._verified(handle, key, info.st_size)
            if payload is None:
                self._reject(path)
                return None
            # A read-only folder still serves hits; only the eviction order suffers.
            with contextlib.suppress(OSError):
                os.utime(fd if os.utime in os.supports_fd else path)
        finally:
            os.close(fd)
        self.stats.hits += 1
        return payload

    def _verified(self, handle: BinaryIO, key: str, size: int) -> bytes | None:
        """The payload of an open entry of ``size`` bytes, or None when it does not verify.
        Only ``size`` (from fstat, already bounded) decides how much is read."""
        header = handle.read(HEADER_BYTES)
        if len(header) != HEADER_BYTES or not header.startswith(MAGIC):
            return None
        mac = header[len(MAGIC) : len(MAGIC) + MAC_BYTES]
        length = int.from_bytes(header[len(MAGIC) + MAC_BYTES :], "little")
        if length != size - HEADER_BYTES:
            return None
        payload = handle.read(length)
        if len(payload) != length or handle.read(1):  # changed while being read
            return None
        if not hmac.compare_digest(mac, _mac(self._secret, key, payload)):
            return None
        return payload

    # --- writing ------------------------------------------------------------------------------

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, CacheWarning, stacklevel=3)

    def store(self, key: str, payload: bytes) -> bool:
        """Write ``payload`` under ``key`` atomically (an exclusive 0600 temporary file in the
        entry's folder, renamed over the entry), then remove least recently used entries
        until the entries fit in ``max_bytes``. An entry (payload plus its 54-byte header)
        larger than the bound is not stored. Disk-full and permission problems warn once
        and return False: the run goes on without the cache. True when the entry is in."""
        path = self._entry_path(key)
        if len(payload) + HEADER_BYTES > self.max_bytes:
            return False
        header = MAGIC + _mac(self._secret, key, payload) + len(payload).to_bytes(8, "little")
        temp = path.with_name(TEMP_PREFIX + secrets.token_hex(8))
        try:
            # Not the parents: a folder deleted under a running command is not made again
            # here (with the umask's mode and no secret) but on the next command.
            problem = _make_folder(path.parent, parents=False)
            if problem is not None:
                self._warn_once(
                    f"not caching in {str(self.root)!r}: {str(path.parent)!r} {problem}; {_FIX}"
                )
                return False
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(header)
                    handle.write(payload)
                os.replace(temp, path)
            except BaseException:
                _unlink_quietly(temp)
                raise
        except OSError as exc:
            self._warn_once(
                f"cannot write to the cache {str(self.root)!r} ({exc.strerror or exc}); "
                "going on without storing"
            )
            return False
        self.stats.stored += 1
        return self._evict(keep=path)

    # --- the bound ----------------------------------------------------------------------------

    def _scan(self) -> tuple[list[tuple[int, str, int]], int]:
        """The entries as (mtime_ns, path, size), and the bytes of fresh temporary files
        (which count towards the bound while a writer is busy). Stale temporary files are
        removed; anything else (links, other names, folders) is ignored."""
        entries: list[tuple[int, str, int]] = []
        temp_bytes = 0
        stale = time.time_ns() - STALE_TEMP_SECONDS * 10**9
        try:
            shards = [d for d in os.scandir(self._entries) if d.is_dir(follow_symlinks=False)]
        except OSError:
            return entries, temp_bytes
        for shard in shards:
            try:
                items = list(os.scandir(shard.path))
            except OSError:
                continue
            for item in items:
                try:
                    if not item.is_file(follow_symlinks=False):
                        continue
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                if item.name.startswith(TEMP_PREFIX):
                    if info.st_mtime_ns < stale and info.st_uid == _uid():
                        _unlink_quietly(item.path)
                    else:
                        temp_bytes += info.st_size
                elif (
                    item.name.endswith(ENTRY_SUFFIX)
                    and _KEY.fullmatch(item.name[: -len(ENTRY_SUFFIX)]) is not None
                ):
                    entries.append((info.st_mtime_ns, item.path, info.st_size))
        return entries, temp_bytes

    def _evict(self, keep: Path | None = None) -> bool:
        """Remove entries, oldest modification time first and ``keep`` last, until the total
        fits in ``max_bytes``; whether ``keep`` is still there."""
        entries, total = self._scan()
        total += sum(size for _, _, size in entries)
        kept = str(keep) if keep is not None else None
        entries.sort(key=lambda e: (e[1] == kept, e[0], e[1]))
        survived = True
        for _, name, size in entries:
            if total <= self.max_bytes:
                break
            if _unlink_quietly(name):
                self.stats.evicted += 1
                survived = survived and name != kept
            total -= size  # gone, whether by us or by another process
        return survived

    def size_bytes(self) -> int:
        """The bytes of entries and in-progress temporary files: what the bound limits."""
        entries, temp_bytes = self._scan()
        return temp_bytes + sum(size for _, _, size in entries)

    def clear(self) -> int:
        """Remove every entry; how many were removed. (Temporary files of a writer still busy
        are left to it; deleting the whole folder is always safe too.)"""
        entries, _ = self._scan()
        return sum(_unlink_quietly(name) for _, name, _ in entries)

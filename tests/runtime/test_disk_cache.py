"""The on-disk cache of optimised graphs: entries come back byte for byte, anything planted,
corrupted, renamed or linked is refused and removed, the folder stays under its bound with the
least recently used entries evicted first, and an unsafe folder is not used.

Entries are built here from the format's definition (magic, HMAC-SHA256 of key + NUL + payload
under the folder's secret, little-endian length, payload) and from an LRU simulated in the test,
not from the module's own helpers."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import shutil
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segattr_onnx.errors import SegattrError
from segattr_onnx.runtime import disk_cache
from segattr_onnx.runtime.disk_cache import (
    DEFAULT_MAX_BYTES,
    ENV_DIR,
    ENV_MAX,
    CacheStats,
    CacheWarning,
    DiskCache,
    cache_key,
    default_cache_dir,
)
from tests.conftest import fixture

MAGIC = b"SEGATTR-CACHE\x01"
HEADER = len(MAGIC) + 32 + 8


@pytest.fixture(autouse=True)
def _no_real_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the user's real cache, whatever it calls."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.delenv(ENV_MAX, raising=False)


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _entry(root: Path, key: str) -> Path:
    return root / "entries" / key[:2] / f"{key}.bin"


def _secret(root: Path) -> bytes:
    return (root / "secret").read_bytes()


def _entry_bytes(secret: bytes, key: str, payload: bytes, length: int | None = None) -> bytes:
    """An entry as the format defines it, written independently of the module."""
    mac = hmac.new(secret, key.encode() + b"\0" + payload, hashlib.sha256).digest()
    size = len(payload) if length is None else length
    return MAGIC + mac + size.to_bytes(8, "little") + payload


def _shard(root: Path, key: str) -> Path:
    """The folder of ``key``'s entry, made as the cache makes it (private)."""
    shard = _entry(root, key).parent
    shard.mkdir(mode=0o700, parents=True, exist_ok=True)
    return shard


def _entry_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "entries").rglob("*") if p.is_file())


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_and_a_second_cache_on_the_same_folder(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root)
    payload = np.random.default_rng(0).bytes(5000)
    key = cache_key("model", 3)
    assert cache.load(key) is None
    assert cache.store(key, payload) is True
    assert cache.load(key) == payload
    assert cache.stats == CacheStats(hits=1, misses=1, stored=1)
    # the file is the format, under the folder's secret, and private to the user
    assert _entry(root, key).read_bytes() == _entry_bytes(_secret(root), key, payload)
    assert _entry(root, key).stat().st_mode & 0o777 == 0o600
    assert (root / "secret").stat().st_mode & 0o777 == 0o600
    assert root.stat().st_mode & 0o077 == 0
    secret = _secret(root)
    again = DiskCache(root)
    assert again.load(key) == payload
    assert again.stats == CacheStats(hits=1)
    assert _secret(root) == secret  # the second cache used the secret, did not replace it


def test_an_onnx_runtime_optimised_model_comes_back_and_runs_the_same(tmp_path: Path) -> None:
    """The use it is for: ORT's optimised model, keyed by the model's bytes."""
    model = fixture("unet2d_torchscript")
    serialised = model.path.read_bytes()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    first = ort.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    key = cache_key(hashlib.sha256(serialised).digest(), ort.__version__, "cpu")
    cache = DiskCache(tmp_path / "cache")
    assert cache.store(key, (tmp_path / "optimised.onnx").read_bytes())
    loaded = DiskCache(tmp_path / "cache").load(key)
    assert loaded is not None
    reading = ort.SessionOptions()
    reading.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    second = ort.InferenceSession(loaded, reading, providers=["CPUExecutionProvider"])
    x = model.input(seed=1)
    expected = first.run(None, {model.spec["input_name"]: x})[0]
    np.testing.assert_array_equal(second.run(None, {model.spec["input_name"]: x})[0], expected)


def test_a_hit_refreshes_the_entry_time(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key = _key("a")
    cache.store(key, b"x" * 100)
    os.utime(_entry(tmp_path, key), (1_000_000, 1_000_000))
    assert cache.load(key) == b"x" * 100
    assert _entry(tmp_path, key).stat().st_mtime > 1_000_000 + 3600


@pytest.mark.parametrize("key", ["../" * 21 + "etc", "A" * 64, "a" * 63, "a" * 65, "g" * 64, 7])
def test_a_key_that_is_not_a_cache_key_is_a_programming_error(tmp_path: Path, key) -> None:
    cache = DiskCache(tmp_path)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.load(key)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        cache.store(key, b"x")
    assert _entry_files(tmp_path) == []


def test_concurrent_writers_of_one_key_leave_a_valid_entry(tmp_path: Path) -> None:
    key = _key("shared")
    payload = np.random.default_rng(1).bytes(200_000)
    caches = [DiskCache(tmp_path) for _ in range(8)]
    start = threading.Barrier(len(caches))
    results: list[bool] = []

    def write(cache: DiskCache) -> None:
        start.wait()
        results.append(cache.store(key, payload))

    threads = [threading.Thread(target=write, args=(c,)) for c in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * len(caches)
    assert _entry_files(tmp_path) == [_entry(tmp_path, key)]  # no temporary file left
    assert DiskCache(tmp_path).load(key) == payload


# --- entries that must be refused ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 13, 14, 45, 46, 53, HEADER, HEADER + 1234, -1])
def test_a_corrupted_byte_anywhere_is_rejected_removed_and_rebuilt(
    tmp_path: Path, offset: int
) -> None:
    cache = DiskCache(tmp_path)
    key, payload = _key("a"), np.random.default_rng(2).bytes(3000)
    cache.store(key, payload)
    path = _entry(tmp_path, key)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    assert cache.load(key) is None
    assert cache.stats.rejected == 1 and cache.stats.hits == 0
    assert not path.exists()
    assert cache.store(key, payload) and cache.load(key) == payload


def test_an_entry_made_with_another_secret_is_rejected(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key, payload = _key("planted"), b"not what ORT wrote" * 50
    _shard(tmp_path, key)
    path = _entry(tmp_path, key)
    path.write_bytes(_entry_bytes(os.urandom(32), key, payload))
    assert cache.load(key) is None
    assert cache.stats.rejected == 1 and not path.exists()
    # the same bytes under the right secret are accepted: the MAC is what failed
    path.write_bytes(_entry_bytes(_secret(tmp_path), key, payload))
    assert cache.load(key) == payload


def test_a_valid_entry_copied_under_another_key_is_rejected(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    good, other = _key("good"), _key("other")
    cache.store(good, b"payload of good" * 10)
    _shard(tmp_path, other)
    shutil.copyfile(_entry(tmp_path, good), _entry(tmp_path, other))
    assert cache.load(other) is None
    assert cache.stats.rejected == 1 and not _entry(tmp_path, other).exists()
    assert cache.load(good) == b"payload of good" * 10


def _same_secret_elsewhere(tmp_path: Path) -> DiskCache:
    """A second cache sharing the first one's secret: only following a link into it could
    turn a miss of the first into a hit."""
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    shutil.copyfile(tmp_path / "cache" / "secret", tmp_path / "elsewhere" / "secret")
    (tmp_path / "elsewhere" / "secret").chmod(0o600)
    return DiskCache(tmp_path / "elsewhere")


def test_a_link_at_an_entry_path_is_rejected_and_its_target_untouched(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache")
    key = _key("linked")
    elsewhere = _same_secret_elsewhere(tmp_path)
    elsewhere.store(key, b"payload" * 10)
    target = _entry(tmp_path / "elsewhere", key)
    before = target.read_bytes()
    _shard(tmp_path / "cache", key)
    link = _entry(tmp_path / "cache", key)
    link.symlink_to(target)
    assert cache.load(key) is None
    assert cache.stats.rejected == 1
    assert not os.path.lexists(link)  # the link itself is removed ...
    assert target.read_bytes() == before  # ... never what it points to
    assert elsewhere.load(key) == b"payload" * 10


def test_a_linked_shard_folder_is_not_followed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache")
    key = _key("shard")
    elsewhere = _same_secret_elsewhere(tmp_path)
    elsewhere.store(key, b"payload")
    shard = tmp_path / "cache" / "entries" / key[:2]
    shard.symlink_to(_entry(tmp_path / "elsewhere", key).parent)
    assert cache.load(key) is None and cache.stats.rejected == 1
    assert elsewhere.load(key) == b"payload"


def test_an_entry_of_another_user_is_rejected_but_not_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = DiskCache(tmp_path)
    key = _key("theirs")
    cache.store(key, b"payload")
    shard = _entry(tmp_path, key).parent
    # we are now another user, whose shard folder has been checked as theirs
    monkeypatch.setattr(disk_cache, "_uid", lambda: os.getuid() + 1)
    monkeypatch.setattr(disk_cache, "_folder_problem", lambda path: None)
    assert cache.load(key) is None
    assert cache.stats.rejected == 1
    assert _entry(tmp_path, key).exists() and shard.is_dir()


def test_a_directory_or_a_fifo_at_an_entry_path_is_rejected(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    folder_key, fifo_key = _key("dir"), _key("fifo")
    _shard(tmp_path, folder_key)
    _shard(tmp_path, fifo_key)
    _entry(tmp_path, folder_key).mkdir(mode=0o700)
    os.mkfifo(_entry(tmp_path, fifo_key), 0o600)
    assert cache.load(folder_key) is None and cache.load(fifo_key) is None  # no hang
    assert cache.stats.rejected == 2
    assert _entry(tmp_path, folder_key).is_dir()  # a folder is not ours to delete


@pytest.mark.parametrize("keep", [0, 20, HEADER - 1, HEADER + 10])
def test_a_truncated_entry_is_rejected(tmp_path: Path, keep: int) -> None:
    cache = DiskCache(tmp_path)
    key = _key("cut")
    cache.store(key, b"y" * 500)
    path = _entry(tmp_path, key)
    path.write_bytes(path.read_bytes()[:keep])
    assert cache.load(key) is None
    assert cache.stats.rejected == 1 and not path.exists()


@pytest.mark.parametrize("length", [10**12, 2**64 - 1, 0, 99])
def test_a_lying_length_field_is_rejected_without_allocating_it(
    tmp_path: Path, length: int
) -> None:
    cache = DiskCache(tmp_path)
    key, payload = _key("liar"), b"z" * 100
    _shard(tmp_path, key)
    path = _entry(tmp_path, key)
    path.write_bytes(_entry_bytes(_secret(tmp_path), key, payload, length=length))
    tracemalloc.start()
    try:
        assert cache.load(key) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert cache.stats.rejected == 1 and not path.exists()


def test_an_entry_larger_than_the_bound_is_not_read(tmp_path: Path) -> None:
    big = DiskCache(tmp_path, max_bytes=4 << 20)
    key, payload = _key("big"), np.random.default_rng(3).bytes(2 << 20)
    big.store(key, payload)
    small = DiskCache(tmp_path, max_bytes=1 << 10)
    tracemalloc.start()
    try:
        assert small.load(key) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(payload) // 4  # not read into memory
    assert big.load(key) == payload  # a bigger bound still has it


# --- the bound --------------------------------------------------------------------------------


def test_the_folder_stays_under_its_bound_evicting_the_least_recently_used(
    tmp_path: Path,
) -> None:
    """Against an LRU simulated here. Times are set explicitly (a fake clock in the past) so
    the order never depends on the file system's timestamp resolution."""
    bound = 10_000
    cache = DiskCache(tmp_path, max_bytes=bound)
    rng = np.random.default_rng(4)
    clock = iter(range(1_000_000, 2_000_000, 10))
    reference: dict[str, int] = {}  # key -> last use time of the simulated LRU
    payloads: dict[str, bytes] = {}
    size = 1000 + HEADER

    def files_size() -> int:
        return sum(p.stat().st_size for p in _entry_files(tmp_path))

    for step in range(30):
        key = _key(f"entry {step}")
        payloads[key] = rng.bytes(1000)
        assert cache.store(key, payloads[key])
        reference[key] = 10**12  # the new entry is the most recent
        while len(reference) * size > bound:
            del reference[min(reference, key=reference.__getitem__)]
        now = next(clock)
        os.utime(_entry(tmp_path, key), (now, now))
        reference[key] = now
        survivors = {p.name.removesuffix(".bin") for p in _entry_files(tmp_path)}
        assert survivors == set(reference)
        assert cache.size_bytes() == files_size() <= bound
        if step % 4 == 3:  # use the oldest survivor: it must now outlive the others
            oldest = min(reference, key=reference.__getitem__)
            before = _entry(tmp_path, oldest).stat().st_mtime
            assert cache.load(oldest) == payloads[oldest]
            assert _entry(tmp_path, oldest).stat().st_mtime > before  # the hit refreshed it
            now = next(clock)
            os.utime(_entry(tmp_path, oldest), (now, now))
            reference[oldest] = now
    assert cache.stats.evicted == 30 - len(reference)
    assert cache.stats.stored == 30


def test_an_oversized_payload_is_not_stored_and_a_zero_bound_stores_nothing(
    tmp_path: Path,
) -> None:
    cache = DiskCache(tmp_path, max_bytes=1000)
    assert cache.store(_key("fits"), b"a" * (1000 - HEADER))
    assert not cache.store(_key("too big"), b"a" * (1000 - HEADER + 1))
    assert not cache.store(_key("far too big"), b"a" * 5000)
    assert [p.name for p in _entry_files(tmp_path)] == [f"{_key('fits')}.bin"]
    assert cache.load(_key("fits")) == b"a" * (1000 - HEADER)
    none = DiskCache(tmp_path / "zero", max_bytes=0)
    assert not none.store(_key("empty"), b"")
    assert not none.store(_key("one"), b"1")
    assert _entry_files(tmp_path / "zero") == [] and none.size_bytes() == 0


def test_temporary_files_count_towards_the_bound_and_stale_ones_are_removed(
    tmp_path: Path,
) -> None:
    cache = DiskCache(tmp_path, max_bytes=5000)
    key = _key("k")
    shard = _shard(tmp_path, key)
    fresh, stale, other = shard / ".tmp-fresh", shard / ".tmp-stale", shard / "notes.txt"
    fresh.write_bytes(b"f" * 1500)
    stale.write_bytes(b"s" * 1500)
    other.write_bytes(b"o" * 9000)  # not an entry: neither counted nor touched
    two_hours_ago = os.stat(fresh).st_mtime - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cache.size_bytes() == 1500  # the stale one is gone on the first scan
    assert not stale.exists() and fresh.exists() and other.exists()
    first, second = _key("first"), _key("second")
    assert cache.store(first, b"1" * 2000)
    os.utime(_entry(tmp_path, first), (1_000_000, 1_000_000))
    assert cache.store(second, b"2" * 2000)  # 1500 + 2 x 2054 > 5000: the first goes
    assert not _entry(tmp_path, first).exists() and cache.load(second) == b"2" * 2000
    assert cache.size_bytes() == 1500 + 2000 + HEADER <= 5000


def test_clear_removes_every_entry(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    keys = [_key(str(i)) for i in range(12)]
    for key in keys:
        cache.store(key, key.encode())
    (tmp_path / "entries" / "zz").mkdir()
    (tmp_path / "entries" / "zz" / "keep.txt").write_text("not an entry")
    assert cache.clear() == len(keys)
    assert [p.name for p in _entry_files(tmp_path)] == ["keep.txt"]
    assert all(cache.load(key) is None for key in keys)
    assert cache.size_bytes() == 0


# --- problems writing ---------------------------------------------------------------------------


def test_a_failing_disk_warns_once_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = DiskCache(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_cache.os, "replace", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.store(_key("a"), b"a" * 100) is False
        assert cache.store(_key("b"), b"b" * 100) is False
    assert [type(w.message) for w in caught] == [CacheWarning]
    assert "No space left" in str(caught[0].message)
    assert _entry_files(tmp_path) == [] and cache.stats.stored == 0


def test_a_file_where_a_shard_folder_belongs_warns_once(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key = _key("x")
    (tmp_path / "entries" / key[:2]).write_bytes(b"in the way")
    with pytest.warns(CacheWarning) as caught:
        assert cache.store(key, b"payload") is False
        assert cache.store(key, b"payload") is False
    assert len(caught) == 1
    assert cache.load(key) is None


def test_deleting_the_folder_under_a_running_cache_is_safe(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root)
    key = _key("a")
    cache.store(key, b"before")
    old_secret = _secret(root)
    shutil.rmtree(root)
    assert cache.load(key) is None and cache.stats.rejected == 0  # simply gone
    with pytest.warns(CacheWarning, match="No such file"):
        assert cache.store(key, b"after") is False
    assert not root.exists()  # not made again half-way, without a secret
    fresh = DiskCache(root)
    assert _secret(root) != old_secret
    assert fresh.store(key, b"after") and fresh.load(key) == b"after"


# --- unsafe folders ----------------------------------------------------------------------------


def _make_world_writable(root: Path) -> None:
    root.chmod(0o777)


def _make_a_link(root: Path) -> None:
    real = root.with_name("real")
    DiskCache(real)
    shutil.rmtree(root)
    root.symlink_to(real, target_is_directory=True)


def _open_secret(root: Path) -> None:
    (root / "secret").chmod(0o644)


def _short_secret(root: Path) -> None:
    (root / "secret").write_bytes(b"short")


def _linked_secret(root: Path) -> None:
    other = root.with_name("other_secret")
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    (root / "secret").unlink()
    (root / "secret").symlink_to(other)


def _writable_entries(root: Path) -> None:
    (root / "entries").chmod(0o775)


def _root_is_a_file(root: Path) -> None:
    shutil.rmtree(root)
    root.write_bytes(b"")


UNSAFE = {
    "world-writable": (_make_world_writable, "writable by other users"),
    "a link": (_make_a_link, "symbolic link"),
    "secret 644": (_open_secret, "readable or writable by other users"),
    "short secret": (_short_secret, "holds 5 bytes"),
    "linked secret": (_linked_secret, "symbolic link"),
    "entries 775": (_writable_entries, "writable by other users"),
    "a file": (_root_is_a_file, "not a directory"),
}


@pytest.mark.parametrize("damage", UNSAFE, ids=list(UNSAFE))
def test_an_unsafe_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    make_unsafe, problem = UNSAFE[damage]
    root = tmp_path / "cache"
    DiskCache(root).store(_key("a"), b"a")
    make_unsafe(root)
    with pytest.raises(SegattrError, match=problem) as raised:
        DiskCache(root)
    assert "\n" not in str(raised.value) and ENV_DIR in str(raised.value)
    monkeypatch.setenv(ENV_DIR, str(root))
    with pytest.warns(CacheWarning, match=problem):
        assert DiskCache.open_default() is None


def test_a_folder_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    DiskCache(tmp_path)
    monkeypatch.setattr(disk_cache, "_uid", lambda: os.getuid() + 1)
    with pytest.raises(SegattrError, match="owned by user"):
        DiskCache(tmp_path)


def test_a_new_folder_is_private_and_gets_a_random_secret(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "b" / "one", tmp_path / "two"
    DiskCache(one)
    DiskCache(two)
    for root in (one, two):
        assert root.stat().st_mode & 0o777 == 0o700
        assert (root / "entries").stat().st_mode & 0o777 == 0o700
        assert len(_secret(root)) == 32
    assert _secret(one) != _secret(two)
    assert sorted(p.name for p in one.iterdir()) == ["entries", "secret"]  # no temp left


# --- keys ---------------------------------------------------------------------------------------


def test_cache_key_is_unambiguous() -> None:
    distinct = [
        ("ab", "c"),
        ("a", "bc"),
        ("as", "b"),  # the same characters, tags included, if parts were not length-prefixed
        ("a", "sb"),
        ("abc",),
        (("ab", "c"),),
        ("1",),
        (b"1",),
        (1,),
        (True,),
        (("1",),),
        ("",),
        (b"",),
        (),
        ((),),
        ("", ""),
    ]
    keys = [cache_key(*parts) for parts in distinct]
    assert len(set(keys)) == len(distinct)
    assert all(len(k) == 64 and k == k.lower() and int(k, 16) >= 0 for k in keys)
    assert cache_key("ab", "c") == cache_key("ab", "c")


# Few distinct characters, tag-like ones among them, so that parts often run into each other.
_TEXT = st.text(alphabet="sbito01\x00", max_size=4)
_parts = st.recursive(
    _TEXT | _TEXT.map(str.encode) | st.integers(-30, 300) | st.booleans(),
    lambda inner: st.tuples(inner, inner) | st.tuples(inner),
    max_leaves=6,
)


def _typed(value):
    """The parts as a value whose equality also compares types (so 1, True, "1" differ)."""
    if isinstance(value, tuple):
        return ("tuple", tuple(_typed(v) for v in value))
    return (type(value).__name__, value)


@settings(max_examples=300, deadline=None)
@given(st.lists(_parts, max_size=3), st.lists(_parts, max_size=3))
def test_cache_keys_are_equal_exactly_when_the_parts_are(a: list, b: list) -> None:
    assert (cache_key(*a) == cache_key(*b)) == (_typed(tuple(a)) == _typed(tuple(b)))


def _split(text: str, cuts: set[int]) -> tuple[str, ...]:
    bounds = [0, *sorted(cuts), len(text)]
    return tuple(text[i:j] for i, j in itertools.pairwise(bounds))


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="sab\x00", min_size=1, max_size=8),
    st.sets(st.integers(0, 8), max_size=4),
    st.sets(st.integers(0, 8), max_size=4),
)
def test_the_same_characters_cut_into_other_parts_give_another_key(
    text: str, one: set[int], two: set[int]
) -> None:
    one = {c for c in one if c <= len(text)}
    two = {c for c in two if c <= len(text)}
    assert (cache_key(*_split(text, one)) == cache_key(*_split(text, two))) == (one == two)


def test_the_default_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "segattr-onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "segattr-onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "segattr-onnx"
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(ENV_MAX, "12345")
    cache = DiskCache.open_default()
    assert cache is not None and cache.root == tmp_path / "mine" and cache.max_bytes == 12345
    assert (tmp_path / "mine" / "secret").is_file()
    monkeypatch.delenv(ENV_MAX)
    assert DiskCache.open_default().max_bytes == DEFAULT_MAX_BYTES == 512 << 20


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "4G"])
def test_a_bad_bound_in_the_environment_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "mine"))
    monkeypatch.setenv(ENV_MAX, value)
    with pytest.raises(SegattrError, match=ENV_MAX) as raised:
        DiskCache.open_default()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("value", [-1, 1.5, "100", True, None])
def test_a_bad_bound_is_refused(tmp_path: Path, value) -> None:
    with pytest.raises(SegattrError, match="bytes >= 0"):
        DiskCache(tmp_path, max_bytes=value)

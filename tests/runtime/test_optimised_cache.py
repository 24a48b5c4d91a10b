"""ONNX Runtime's optimised graphs cached between CLI calls: the same maps from a cold and a
warm cache, and a cache entry that was corrupted, planted or swapped is caught and rebuilt,
never run. The cache's own verification and bound are tested in test_disk_cache.py."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from segattr_onnx.cli import main
from segattr_onnx.runtime import sessions
from segattr_onnx.runtime.disk_cache import HEADER_BYTES, MAGIC, DiskCache, _mac
from segattr_onnx.runtime.optimised_cache import (
    active_disk_cache,
    graph_settings,
    use_disk_cache,
)
from segattr_onnx.runtime.sessions import create_session
from tests.conftest import fixture

MODEL = fixture("unet2d_torchscript")


@pytest.fixture
def case(tmp_path: Path) -> Path:
    path = tmp_path / "case.npy"
    np.save(path, MODEL.input(0))
    return path


def _explain(cache: Path, case: Path, out: Path, *extra: str):
    args = ["--cache-dir", str(cache), *extra, "explain", str(MODEL.path), str(case)]
    result = CliRunner().invoke(
        main, [*args, "--out", str(out), "--provider", "cpu", "--quiet", "--json"]
    )
    assert result.exit_code == 0, result.output
    return np.load(out)


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "entries").glob("*/*.bin"))


def test_a_second_call_runs_from_the_cache_and_draws_the_same_map(
    case: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    uncached = _explain(cache, case, tmp_path / "none.npy", "--no-cache")
    assert not cache.exists()  # --no-cache neither reads nor writes
    cold = _explain(cache, case, tmp_path / "cold.npy")
    stored = _entries(cache)
    assert stored  # one optimised graph per session the explanation built
    inodes = {p: p.stat().st_ino for p in stored}
    for path in stored:  # long ago: a hit refreshes the time (least recently used goes first)
        os.utime(path, (1_000_000, 1_000_000))
    warm = _explain(cache, case, tmp_path / "warm.npy")
    assert _entries(cache) == stored  # nothing new
    # Every entry was read (its time refreshed) and none rewritten (a store makes a new inode).
    # (The batch check, proven from this model's graph, builds no whole-model session.)
    assert all(p.stat().st_mtime != 1_000_000 for p in stored)
    assert all(p.stat().st_ino == inodes[p] for p in stored)
    np.testing.assert_array_equal(cold, uncached)
    np.testing.assert_array_equal(warm, uncached)
    assert active_disk_cache() is None  # the CLI gives the process's setting back


def _zero_model() -> bytes:
    """A valid ONNX graph with the U-Net's input and output names, drawing zeros: what an
    attacker would plant to make every map flat (a session from it would run)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "zero"], ["logits"])],
        "planted",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@pytest.mark.parametrize("attack", ["flip a byte", "planted with another secret", "swapped"])
def test_a_tampered_entry_is_detected_and_rebuilt(attack: str, case: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    reference = _explain(cache, case, tmp_path / "cold.npy")
    entries = _entries(cache)
    originals = {p: p.read_bytes() for p in entries}
    for number, path in enumerate(entries):
        data = bytearray(originals[path])
        if attack == "flip a byte":
            data[HEADER_BYTES + len(data[HEADER_BYTES:]) // 2] ^= 0x01
        elif attack == "planted with another secret":
            payload = _zero_model()
            mac = _mac(b"\x00" * 32, path.stem, payload)
            data = bytearray(MAGIC + mac + struct.pack("<Q", len(payload)) + payload)
        else:  # a valid entry of this very cache, under another key's name
            data = bytearray(originals[entries[(number + 1) % len(entries)]])
        path.write_bytes(bytes(data))
    tampered = {p: p.read_bytes() for p in entries}
    again = _explain(cache, case, tmp_path / "again.npy")
    np.testing.assert_array_equal(again, reference)
    # Every bad entry was thrown away and stored again from a fresh optimisation.
    assert _entries(cache) == entries
    assert all(p.read_bytes() != tampered[p] for p in entries)
    verifier = DiskCache(cache)
    assert all(verifier.load(p.stem) not in (None, _zero_model()) for p in entries)


def test_the_cache_never_grows_past_its_bound(
    case: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    unbounded = tmp_path / "unbounded"
    _explain(unbounded, case, tmp_path / "all.npy")
    sizes = sorted(p.stat().st_size for p in _entries(unbounded))
    bound = sum(sizes) // 2  # room for about half of the entries
    monkeypatch.setenv("SEGATTR_CACHE_MAX_BYTES", str(bound))
    first = _explain(cache, case, tmp_path / "first.npy")
    second = _explain(cache, case, tmp_path / "second.npy")
    total = sum(p.stat().st_size for p in _entries(cache))
    assert 0 < total <= bound
    np.testing.assert_array_equal(first, second)


def test_a_library_user_opts_in_and_the_session_computes_the_same(tmp_path: Path) -> None:
    model = onnx.load(str(MODEL.path))
    x = MODEL.input(0)
    plain = create_session(model, "cpu").run(None, {"image": x})[0]
    cache = DiskCache(tmp_path / "cache")
    previous = use_disk_cache(cache)
    try:
        first = create_session(model, "cpu").run(None, {"image": x})[0]
        second = create_session(model, "cpu").run(None, {"image": x})[0]
    finally:
        use_disk_cache(previous)
    assert (cache.stats.misses, cache.stats.stored, cache.stats.hits) == (1, 1, 1)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)


def test_the_cache_command_reports_and_clears(case: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _explain(cache, case, tmp_path / "map.npy")
    count = len(_entries(cache))
    info = CliRunner().invoke(main, ["--cache-dir", str(cache), "cache", "info"])
    assert info.exit_code == 0 and str(cache) in info.output
    cleared = CliRunner().invoke(main, ["--cache-dir", str(cache), "cache", "clear"])
    assert cleared.exit_code == 0 and f"removed {count} entries" in cleared.output
    assert count > 0 and _entries(cache) == []
    assert (cache / "secret").is_file()  # the folder itself stays, with its secret


@pytest.mark.parametrize(
    ("environment", "arguments", "message"),
    [
        ({"SEGATTR_CACHE_MAX_BYTES": "abc"}, [], "SEGATTR_CACHE_MAX_BYTES"),
        ({}, ["--cache-dir", "{open}"], "unsafe cache folder"),
    ],
)
def test_cache_problems_the_user_asked_for_exit_2_in_one_line(
    environment: dict, arguments: list[str], message: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant entries here
    arguments = [a.replace("{open}", str(shared)) for a in arguments]
    result = CliRunner().invoke(main, [*arguments, "cache", "info"], env=environment)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_a_session_setting_that_changes_the_graph_is_part_of_the_key(tmp_path: Path) -> None:
    """An optimised graph made with Q/DQ fusion on must never serve a session that turned it
    off: their graphs compute different arithmetic (sessions.QDQ_AS_SPECIFIED)."""
    qdq = fixture("unet2d_qdq")
    model = qdq.load_with_weights()
    x = qdq.input(0)
    name = model.graph.input[0].name
    cache = DiskCache(tmp_path / "cache")
    previous = use_disk_cache(cache)
    try:
        create_session(model, "cpu").run(None, {name: x})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sessions, "QDQ_AS_SPECIFIED", ("session.disable_quant_qdq", "0"))
            fused = create_session(model, "cpu")
            fused.run(None, {name: x})
    finally:
        use_disk_cache(previous)
    assert (cache.stats.misses, cache.stats.stored, cache.stats.hits) == (2, 2, 0)
    options = fused.get_session_options()
    assert graph_settings(options) == (("session.disable_quant_qdq", "0"),)

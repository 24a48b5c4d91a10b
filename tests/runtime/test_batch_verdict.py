"""The batch-consistency verdict kept in the disk cache: a second process on the same model
and size skips the check's passes, and an entry that was planted or corrupted is never
believed: the check runs again."""

from __future__ import annotations

import dataclasses
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from segattr_onnx import Explainer
from segattr_onnx.runtime import batch_check
from segattr_onnx.runtime.batch_check import checked_verdict, verdict_key
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from segattr_onnx.runtime.disk_cache import MAGIC, DiskCache, _mac
from segattr_onnx.runtime.optimised_cache import use_disk_cache
from segattr_onnx.runtime.sessions import SessionCache
from tests.builders import build

CASE = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)


@pytest.fixture
def disk_cache(tmp_path: Path):
    cache = DiskCache(tmp_path / "cache")
    previous = use_disk_cache(cache)
    yield cache
    use_disk_cache(previous)


def _analysis(model, shape=(1, 1, 8, 8)):
    return Explainer(model, provider="cpu").analysis(shape)


@pytest.mark.parametrize("softmax, verdict", [("per-case", True), ("hard-coded", False)])
def test_a_second_check_takes_the_stored_verdict(disk_cache, counted, softmax, verdict) -> None:
    analysis = _analysis(build(token_softmax=softmax))
    key = verdict_key(analysis, SessionCache("cpu"), 0)
    assert checked_verdict(analysis, SessionCache("cpu"), 0) is verdict
    assert counted == [verdict] and disk_cache.load(key) is not None
    assert checked_verdict(analysis, SessionCache("cpu"), 0) is verdict  # a new process's sessions
    assert counted == [verdict]


def test_a_cached_mixing_verdict_still_runs_one_case_at_a_time(disk_cache, counted) -> None:
    model = build(token_softmax="hard-coded")
    results = []
    for _ in range(2):
        with pytest.warns(BatchFallbackWarning, match="changes with the batch"):
            results.append(Explainer(model, provider="cpu").explain(CASE, method="kwc"))
    assert counted == [False]  # the second explainer ran no check of its own
    np.testing.assert_array_equal(results[1].map, results[0].map)
    assert all(run.batch_size <= 1 for result in results for run in result.runs)


@pytest.mark.parametrize("attack", ["planted with another secret", "flip a byte"])
def test_a_forged_verdict_is_not_believed(disk_cache, counted, attack) -> None:
    """A planted "keeps cases apart" for a model that mixes them would silently mix every
    batch: it must fail verification and the check must run."""
    analysis = _analysis(build(token_softmax="hard-coded"))
    key = verdict_key(analysis, SessionCache("cpu"), 0)
    path = disk_cache._entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"keeps cases apart"
    if attack == "flip a byte":
        disk_cache.store(key, b"mixes cases")
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        mac = _mac(b"\x00" * 32, key, payload)
        path.write_bytes(MAGIC + mac + struct.pack("<Q", len(payload)) + payload)
    assert checked_verdict(analysis, SessionCache("cpu"), 0) is False
    assert counted == [False] and disk_cache.stats.rejected == 1
    assert DiskCache(disk_cache.root).load(key) == b"mixes cases"  # stored again, correctly


def _resized(analysis, shape):
    return dataclasses.replace(analysis, input=dataclasses.replace(analysis.input, shape=shape))


def test_the_key_follows_what_the_verdict_depends_on(tmp_path: Path, monkeypatch) -> None:
    analysis = _analysis(build())
    sessions = SessionCache("cpu")
    key = verdict_key(analysis, sessions, 0)
    assert key == verdict_key(_analysis(build()), SessionCache("cpu"), 0)
    others = {
        verdict_key(analysis, sessions, 1),
        verdict_key(_resized(analysis, (1, 1, 16, 16)), sessions, 0),
        verdict_key(_analysis(build(seed=1)), sessions, 0),  # other weights
    }
    assert key not in others and len(others) == 3
    # Not kept where the key cannot cover the weights, nor for a GPU's arithmetic.
    assert verdict_key(analysis, SessionCache("cpu", external_data_dir=tmp_path), 0) is None
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(batch_check, "requested_providers", lambda provider: cuda)
    assert verdict_key(analysis, SessionCache("cuda"), 0) is None


def test_without_a_disk_cache_the_check_always_runs(counted) -> None:
    analysis = _analysis(build(token_softmax="per-case"))  # a Reshape: not proven from the graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checked_verdict(analysis, SessionCache("cpu"), 0) is True
        assert checked_verdict(analysis, SessionCache("cpu"), 0) is True
    assert counted == [True, True]

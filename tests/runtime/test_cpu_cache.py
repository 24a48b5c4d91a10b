"""CPU batches sized to the last-level cache: its size, the bound kept, the result unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from segattr_onnx import Explainer
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.runtime import cpu_cache
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import chunk_size
from tests.conftest import fixture


@pytest.fixture
def fresh_cache_size():
    cpu_cache.last_level_cache_bytes.cache_clear()
    yield
    cpu_cache.last_level_cache_bytes.cache_clear()


def _sysfs(tmp_path, entries: list[tuple[str, str]]):
    for index, (kind, size) in enumerate(entries):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(size + "\n")
    return tmp_path


def test_the_largest_data_cache_in_sysfs_is_read(tmp_path, monkeypatch, fresh_cache_size) -> None:
    caches = [("Data", "32K"), ("Instruction", "64M"), ("Unified", "512K"), ("Unified", "32768K")]
    monkeypatch.setattr(cpu_cache, "_SYSFS_CACHES", _sysfs(tmp_path, caches))
    monkeypatch.setattr(cpu_cache.os, "sysconf", lambda name: 0)
    # The instruction cache is larger here, and is not where activations live.
    assert cpu_cache.last_level_cache_bytes() == 32768 << 10


def test_unreadable_sizes_fall_back(tmp_path, monkeypatch, fresh_cache_size) -> None:
    caches = [("Unified", "lots"), ("Unified", "9" * 20 + "K"), ("Data", "")]
    monkeypatch.setattr(cpu_cache, "_SYSFS_CACHES", _sysfs(tmp_path, caches))

    def no_sysconf(name):
        raise ValueError(name)

    monkeypatch.setattr(cpu_cache.os, "sysconf", no_sysconf)
    assert cpu_cache.last_level_cache_bytes() == cpu_cache.FALLBACK_CACHE_BYTES
    cpu_cache.last_level_cache_bytes.cache_clear()
    monkeypatch.setattr(cpu_cache, "_SYSFS_CACHES", tmp_path / "missing")
    monkeypatch.setattr(cpu_cache.os, "sysconf", lambda name: 6 << 20)
    assert cpu_cache.last_level_cache_bytes() == 6 << 20


def test_only_cpu_batches_are_bounded_by_the_cache(monkeypatch) -> None:
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 32 << 20)
    monkeypatch.setattr(cpu_cache, "usable_cpus", lambda: 4)
    assert cpu_cache.batch_cache_bytes("cpu") == 32 << 20  # within the cores' share
    assert cpu_cache.batch_cache_bytes("cuda") is None


def test_a_shared_last_level_counts_only_this_process_cores_share(monkeypatch) -> None:
    monkeypatch.setattr(cpu_cache, "last_level_cache_bytes", lambda: 105 << 20)
    monkeypatch.setattr(cpu_cache, "usable_cpus", lambda: 2)
    assert cpu_cache.batch_cache_bytes("cpu") == 2 * cpu_cache.CACHE_PER_CPU
    monkeypatch.setattr(cpu_cache, "usable_cpus", lambda: 64)
    assert cpu_cache.batch_cache_bytes("cpu") == 105 << 20


def test_chunk_size_keeps_a_batch_within_the_cache() -> None:
    roomy = 10**9
    assert chunk_size(100, 1000, roomy, False, cache_bytes=4500) == 4
    assert chunk_size(100, 1000, roomy, False, cache_bytes=999) == 1  # one item never fits
    assert chunk_size(3, 1000, roomy, False, cache_bytes=10**6) == 3
    assert chunk_size(100, 1000, 2500, False, cache_bytes=10**6) == 2  # the budget binds first
    assert chunk_size(100, 1000, roomy, False) == 100


def _masks(c: int) -> np.ndarray:
    return np.concatenate([1 - np.eye(c), np.eye(c)])


@pytest.mark.parametrize("linear", [True, False])
def test_cpu_ablations_run_in_cache_sized_batches_with_the_same_result(linear) -> None:
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    layer = analysis.layer(analysis.post_bottleneck[0])
    masks = _masks(layer.kernels)

    def outputs(cache_bytes):
        runner = AblationRunner(analysis, provider="cpu")
        assert runner.cache_bytes == cpu_cache.batch_cache_bytes("cpu")
        runner.cache_bytes = cache_bytes
        runner.streams = 1  # the cache alone: two streams would share it (test_cpu_streams.py)
        runner.use_linearity = linear
        ablated = runner.ablated(layer.name)
        per_item = ablated.linear_bytes_per_item if linear else ablated.suffix_bytes_per_item
        chunks = list(runner.ablate(fx.input(), layer.name, masks))
        return per_item, chunks

    per_item, wide = outputs(None)
    assert [c.stop - c.start for c in wide] == [len(masks)]
    _, narrow = outputs(3 * per_item + 1)
    assert [c.stop - c.start for c in narrow][:-1] == [3] * (len(masks) // 3)
    assert sum(c.stop - c.start for c in narrow) == len(masks)
    np.testing.assert_allclose(
        np.concatenate([c.outputs["logits"] for c in narrow]),
        np.concatenate([c.outputs["logits"] for c in wide]),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("method", ["scorecam", "integrated_gradients"])
def test_masked_and_gradient_runs_keep_to_the_cache_too(method) -> None:
    """Score-CAM's masked inputs and the input-gradient rows are batched by the same rule."""
    fx = fixture("unet2d_torchscript")
    x = fx.input(seed=1)

    def explain(narrow: bool):
        explainer = Explainer(fx.path, provider="cpu")
        engine = explainer._for_shape(x.shape).engine
        engine.ablation.cache_bytes = 1 if narrow else None  # 1 byte: one item per run
        explanation = explainer.explain(x, method, "last")
        return explanation, [r.batch_size for r in explanation.runs if r.batch_size]

    wide, wide_batches = explain(False)
    narrow, narrow_batches = explain(True)
    assert max(wide_batches) > 1 and set(narrow_batches) == {1}
    assert narrow.session_runs > wide.session_runs
    np.testing.assert_allclose(narrow.map, wide.map, rtol=1e-5, atol=1e-6)

"""The chunk loop: memory-bounded batches, batch-1 loops, shared inputs bound once."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from segattr_onnx.errors import ProviderError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.runtime import chunks
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import ChunkedRunner, chunk_size
from segattr_onnx.runtime.memory import resident_bytes
from segattr_onnx.runtime.providers import CpuFallbackWarning, cuda_works, probe_device
from segattr_onnx.runtime.sessions import SessionCache, create_session
from segattr_onnx.text import command_line_messages
from tests.conftest import fixture


def test_chunk_size_follows_the_budget() -> None:
    assert chunk_size(100, bytes_per_item=1000, memory_budget=10_000, fixed_batch=False) == 10
    assert chunk_size(5, bytes_per_item=1000, memory_budget=10_000, fixed_batch=False) == 5
    assert chunk_size(100, bytes_per_item=50_000, memory_budget=10_000, fixed_batch=False) == 1
    assert chunk_size(100, bytes_per_item=10, memory_budget=10_000, fixed_batch=True) == 1


def test_a_whole_process_budget_leaves_batches_what_the_process_does_not_hold(
    monkeypatch,
) -> None:
    held = {"now": 700}
    monkeypatch.setattr(
        "segattr_onnx.runtime.memory.resident_bytes", lambda: held["now"], raising=True
    )
    releases = []

    def release() -> bool:
        releases.append(held["now"])
        held["now"] = 300  # the arena gave its free pages back
        return True

    monkeypatch.setattr("segattr_onnx.runtime.sessions.release_free_arena", release)
    cost = math.ceil(10 * chunks.PROCESS_SLACK)
    # 1000 - 700 held leaves 300 bytes, a tenth kept back: 270, 13 items of 20.
    assert chunk_size(100, 10, 1000, False, whole_process=True) == 270 // cost
    assert releases == []
    # Without whole_process the budget is the room itself (GPU memory, or no process bound).
    assert chunk_size(100, 10, 1000, False) == 100
    # Held memory near the budget: the arena is released before settling for one item.
    held["now"] = 990
    assert chunk_size(100, 10, 1000, False, whole_process=True) == 630 // cost
    assert releases == [990]


def _masks(c: int) -> np.ndarray:
    return np.concatenate([1 - np.eye(c), np.eye(c)])


def test_fixed_batch_model_runs_one_mask_per_pass() -> None:
    fx = fixture("unet2d_fixed_batch")
    analysis = analyse_model(fx.path)
    runner = AblationRunner(analysis, provider="cpu")
    layer = analysis.layer(analysis.post_bottleneck[0])
    chunks = list(runner.ablate(fx.input(), layer.name, _masks(layer.kernels)))
    assert [c.stop - c.start for c in chunks] == [1] * (2 * layer.kernels)
    assert runner.planned_passes(layer.name, 2 * layer.kernels) == 1 + 2 * layer.kernels


def _held() -> int:
    return resident_bytes() or 0


@pytest.mark.parametrize("linear", [False, True])
def test_dynamic_batch_model_runs_masks_in_batches_within_the_budget(monkeypatch, linear) -> None:
    """Through the whole suffix and through the linear tail, each with its own item size."""
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    layer = analysis.layer(analysis.post_bottleneck[0])
    masks = _masks(layer.kernels)
    # A budget that bounds the whole process: a gigabyte above what the test process holds
    # (which depends on what the tests before this one imported).
    roomy = AblationRunner(analysis, provider="cpu", memory_budget=_held() + (1 << 30))
    roomy.cache_bytes = None  # the budget alone, whatever this machine's cache (test_cpu_cache)
    roomy.use_linearity = linear
    assert [c.stop - c.start for c in roomy.ablate(fx.input(), layer.name, masks)] == [len(masks)]
    ablated = roomy.ablated(layer.name)
    assert (roomy.linear_schedule(ablated, masks) is not None) == linear
    per_item = ablated.linear_bytes_per_item if linear else ablated.suffix_bytes_per_item
    tight = AblationRunner(analysis, provider="cpu", memory_budget=_held() + (1 << 30))
    tight.cache_bytes = None
    tight.use_linearity = linear
    # The budget bounds the process: batches get what it does not hold (here 3 items' worth).
    room = 3 * math.ceil(per_item * chunks.PROCESS_SLACK) + 1
    monkeypatch.setattr(chunks, "room_for_runs", lambda budget: room)
    sizes = [c.stop - c.start for c in tight.ablate(fx.input(), layer.name, masks)]
    assert max(sizes) == 3 and sum(sizes) == len(masks)
    a = np.concatenate([c.outputs["logits"] for c in roomy.ablate(fx.input(), layer.name, masks)])
    b = np.concatenate([c.outputs["logits"] for c in tight.ablate(fx.input(), layer.name, masks)])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_run_batched_equals_one_by_one_runs() -> None:
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    session = create_session(analysis.model.proto, provider="cpu")
    runner = ChunkedRunner(session)
    images = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    batched = runner.run_batched({}, {"image": images}, ["logits"], batch_size=2)["logits"]
    assert runner.runs == 3
    for i in range(5):
        single = runner.run({"image": images[i : i + 1]}, ["logits"])["logits"]
        np.testing.assert_allclose(batched[i : i + 1], single, rtol=1e-5, atol=1e-6)


def test_sessions_are_built_once_per_variant() -> None:
    fx = fixture("unet2d_torchscript")
    analysis = analyse_model(fx.path, fx.test_shape)
    cache = SessionCache("cpu")
    runner = AblationRunner(analysis, sessions=cache)
    runner.use_linearity = True  # both paths: the linear tail first, then the whole suffix
    layer = analysis.post_bottleneck[2]
    c = analysis.layer(layer).kernels
    list(runner.ablate(fx.input(), layer, _masks(c)))
    built = len(cache)
    for _ in range(2):
        list(runner.ablate(fx.input(), layer, _masks(c)))
    assert len(cache) == built
    ablated = runner.ablated(layer)
    schedule = runner.linear_schedule(ablated, _masks(c))
    assert schedule is not None
    # prefix, the readers, one grouped convolution per reader, the tail, and its hoisted part
    # (a skip half this layer's rows never reach) when it has one
    assert built == 3 + len(schedule.plan.reads) + int(bool(schedule.plan.frontier))
    runner.use_linearity = False
    list(runner.ablate(fx.input(), layer, _masks(c)))
    # the whole suffix, and its own hoisted part
    assert len(cache) == built + 1 + int(ablated.suffix_hoisted is not None)


@pytest.mark.skipif(cuda_works(), reason="CUDA works on this machine")
def test_cuda_request_fails_clearly_and_auto_falls_back_with_a_warning(monkeypatch) -> None:
    with pytest.raises(ProviderError, match='use provider="cpu"') as in_python:
        probe_device("cuda")
    assert "--provider" not in str(in_python.value)
    with command_line_messages(), pytest.raises(ProviderError, match="use --provider cpu"):
        probe_device("cuda")
    monkeypatch.setattr("segattr_onnx.runtime.providers._fallback_reported", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert probe_device("auto") == "cpu"
        assert probe_device("auto") == "cpu"  # said once per process, not per call
    fallbacks = [w for w in caught if issubclass(w.category, CpuFallbackWarning)]
    assert len(fallbacks) == 1 and 'provider="cpu"' in str(fallbacks[0].message)
    with pytest.raises(ProviderError):
        probe_device("tpu")

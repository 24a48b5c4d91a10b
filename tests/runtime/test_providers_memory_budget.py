"""default_memory_budget("cuda"): a quarter of the GPU's free memory as nvidia-smi reports it.

A fake ``nvidia-smi`` script first on PATH stands in for the driver; it logs its arguments so the
tests can see which GPU was asked about and how often.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from segattr_onnx.runtime import chunks
from segattr_onnx.runtime.chunks import DEFAULT_BUDGET_FRACTION, default_memory_budget

FALLBACK = 2 << 30


@pytest.fixture(autouse=True)
def fresh_reading() -> None:
    """The reading is cached per process; every test starts (and leaves) without one."""
    chunks._free_gpu_memory_bytes.cache_clear()
    yield
    chunks._free_gpu_memory_bytes.cache_clear()


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a fake nvidia-smi running ``body``; returns the file its calls are logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(body: str) -> Path:
        script = bin_dir / "nvidia-smi"
        script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{body}\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return log

    return install


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_the_budget_is_a_quarter_of_the_free_gpu_memory(fake_smi) -> None:
    log = fake_smi("echo 40960")  # MiB, as --format=csv,noheader,nounits prints it
    assert default_memory_budget("cuda") == int(40960 * (1 << 20) * DEFAULT_BUDGET_FRACTION)
    (call,) = _calls(log)
    assert "--query-gpu=memory.free" in call and "--format=csv,noheader,nounits" in call
    assert "--id=0" in call.split()


def test_the_first_visible_gpu_is_the_one_asked_about(
    fake_smi, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_smi("echo 1000")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert default_memory_budget("cuda") == int(1000 * (1 << 20) * DEFAULT_BUDGET_FRACTION)
    assert "--id=3" in _calls(log)[0].split()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f6c0b7e-1d2a")
    default_memory_budget("cuda")
    assert "--id=GPU-8f6c0b7e-1d2a" in _calls(log)[1].split()


def test_the_reading_is_taken_once_per_process(fake_smi) -> None:
    """Later readings would count this process's own ONNX Runtime arena as used memory."""
    log = fake_smi("echo 2048")
    first = default_memory_budget("cuda")
    assert [default_memory_budget("cuda") for _ in range(3)] == [first] * 3
    assert len(_calls(log)) == 1


@pytest.mark.parametrize(
    "body",
    [
        "echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9",
        "echo '[N/A]'",  # what some MIG setups print for memory.free
        "echo 0",
        "true",  # nothing printed
    ],
)
def test_an_unusable_answer_falls_back_to_2_gib(fake_smi, body: str) -> None:
    fake_smi(body)
    assert default_memory_budget("cuda") == FALLBACK


def test_a_missing_nvidia_smi_falls_back_to_2_gib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert default_memory_budget("cuda") == FALLBACK


def test_a_hung_nvidia_smi_is_abandoned(fake_smi, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi("exec sleep 20")
    monkeypatch.setattr(chunks, "NVIDIA_SMI_TIMEOUT_S", 0.3)
    started = time.perf_counter()
    assert default_memory_budget("cuda") == FALLBACK
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("visible", ["", "-1"])
def test_no_visible_gpu_falls_back_without_asking(
    fake_smi, monkeypatch: pytest.MonkeyPatch, visible: str
) -> None:
    log = fake_smi("echo 40960")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert default_memory_budget("cuda") == FALLBACK
    assert _calls(log) == []


def test_the_cpu_budget_still_comes_from_host_memory(
    fake_smi, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_smi("echo 40960")
    monkeypatch.setattr(chunks, "available_memory_bytes", lambda: 8 << 30)
    assert default_memory_budget() == default_memory_budget("cpu") == 2 << 30
    assert _calls(log) == []


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        default_memory_budget("tpu")

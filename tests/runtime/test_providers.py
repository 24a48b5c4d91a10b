"""The provider list sessions ask for: CUDA with full float32 precision unless TF32 is opted into.

These run without a GPU: ONNX Runtime's provider discovery and the CUDA probe are replaced, so
only the option building is under test. tests/gpu checks on a GPU that ONNX Runtime applies them.
"""

from __future__ import annotations

import pytest

from segattr_onnx.runtime import providers
from segattr_onnx.runtime.providers import (
    ALLOW_TF32_ENV,
    CPU,
    CUDA,
    cuda_provider_options,
    requested_providers,
)


@pytest.fixture
def cuda_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend onnxruntime-gpu found a working GPU."""
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers, "cuda_works", lambda: True)


@pytest.mark.parametrize("provider", ["cuda", "auto"])
def test_cuda_is_requested_with_tf32_off_by_default(
    provider: str, cuda_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_TF32_ENV, raising=False)
    requested = requested_providers(provider)
    assert requested == [
        (
            CUDA,
            {
                "use_tf32": "0",
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
            },
        ),
        CPU,
    ]


@pytest.mark.parametrize(
    ("value", "use_tf32"), [("1", "1"), (" 1\n", "1"), ("0", "0"), ("", "0"), ("yes", "0")]
)
def test_only_the_value_1_opts_into_tf32(
    value: str, use_tf32: str, cuda_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_TF32_ENV, value)
    (cuda, cpu) = requested_providers("cuda")
    assert cuda[0] == CUDA and cpu == CPU
    assert cuda[1]["use_tf32"] == use_tf32
    assert cuda[1]["cudnn_conv_algo_search"] == "HEURISTIC"  # unaffected by the opt-in


def test_the_environment_is_read_when_sessions_are_requested(
    cuda_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_TF32_ENV, raising=False)
    assert requested_providers("cuda")[0][1]["use_tf32"] == "0"
    monkeypatch.setenv(ALLOW_TF32_ENV, "1")
    assert requested_providers("cuda")[0][1]["use_tf32"] == "1"


def test_each_request_gets_its_own_options(
    cuda_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller editing one session's options must not change the next session's."""
    monkeypatch.delenv(ALLOW_TF32_ENV, raising=False)
    requested_providers("cuda")[0][1]["use_tf32"] = "1"
    assert requested_providers("cuda")[0][1]["use_tf32"] == "0"


def test_cpu_requests_carry_no_cuda_options(cuda_available: None) -> None:
    assert requested_providers("cpu") == [CPU]


def test_auto_without_a_working_gpu_asks_for_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers, "cuda_works", lambda: False)
    assert requested_providers("auto") == [CPU]


class _FakeSession:
    def __init__(self, first: str) -> None:
        self.first = first

    def get_providers(self) -> list[str]:
        return [self.first, CPU]


@pytest.mark.parametrize("allow_tf32", ["0", "1"])
def test_the_cuda_probe_uses_the_options_sessions_get(
    allow_tf32: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuda_works() must not pass with options that real sessions would then be refused."""
    monkeypatch.setenv(ALLOW_TF32_ENV, allow_tf32)
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    asked: list[list] = []

    def fake_session(model: bytes, options: object, providers: list) -> _FakeSession:
        asked.append(providers)
        return _FakeSession(CUDA)

    monkeypatch.setattr(providers.ort, "InferenceSession", fake_session)
    assert providers.cuda_works.__wrapped__() is True  # the uncached probe
    assert asked == [[(CUDA, cuda_provider_options()), CPU]]
    assert asked[0][0][1]["use_tf32"] == allow_tf32


@pytest.mark.parametrize("outcome", ["fallback", "raise"])
def test_the_cuda_probe_says_no_when_the_session_does_not_get_cuda(
    outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [CUDA, CPU])

    def fake_session(model: bytes, options: object, providers: list) -> _FakeSession:
        if outcome == "raise":
            raise RuntimeError("unknown provider option")
        return _FakeSession(CPU)

    monkeypatch.setattr(providers.ort, "InferenceSession", fake_session)
    assert providers.cuda_works.__wrapped__() is False

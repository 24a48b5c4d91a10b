"""Choosing the ONNX Runtime execution provider, and checking that a session really got it.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot load (missing CUDA or
cuDNN libraries), so the only trustworthy answer is ``session.get_providers()`` after creation.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import onnxruntime as ort

from segattr_onnx.errors import ProviderError

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_FALLBACK_MESSAGE = (
    "CUDA is not usable here; segattr-onnx runs on the CPU (pass --provider cpu to silence this)"
)


class CpuFallbackWarning(UserWarning):
    """``provider="auto"`` ended up on the CPU."""


def _plugin_executor(provider: str) -> list | None:
    from segattr_onnx.plugins import registry

    return registry().executors.get(provider)


def requested_providers(provider: str) -> list:
    """The provider list to ask ONNX Runtime for (a plugin executor's list as it is)."""
    if provider not in PROVIDER_CHOICES:
        executor = _plugin_executor(provider)
        if executor is not None:
            return executor
        from segattr_onnx.plugins import registry

        known = [*PROVIDER_CHOICES, *registry().executors]
        raise ProviderError(f"provider {provider!r} is unknown; use one of {', '.join(known)}")
    if provider == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    if CUDA not in available or not cuda_works():
        if provider == "cuda":
            raise ProviderError(
                "the CUDA provider cannot start here (ONNX Runtime providers: "
                f"{', '.join(available)}; onnxruntime-gpu needs CUDA 12 and cuDNN 9); "
                "use --provider cpu"
            )
        return [CPU]
    return [CUDA, CPU]


def device_of(session: ort.InferenceSession) -> str:
    """'cuda' or 'cpu': where the session's first provider runs."""
    return "cuda" if session.get_providers()[0] in (CUDA, "TensorrtExecutionProvider") else "cpu"


def check_session_provider(session: ort.InferenceSession, provider: str) -> str:
    """Enforce ``provider`` on a created session; warn once when ``auto`` landed on the CPU."""
    device = device_of(session)
    if provider == "cuda" and device != "cuda":
        raise ProviderError(
            "ONNX Runtime could not start the CUDA provider (check the CUDA and cuDNN libraries "
            "onnxruntime-gpu needs); use --provider cpu to run on the CPU"
        )
    if provider == "auto" and device != "cuda":
        warnings.warn(_FALLBACK_MESSAGE, CpuFallbackWarning, stacklevel=3)
    return device


@lru_cache(maxsize=1)
def cuda_works() -> bool:
    """Whether a CUDA session really starts here (a hardware fact, so probed once per process).

    ONNX Runtime logs an error for every session that fails to load the CUDA libraries; probing
    once with its logger silenced keeps CPU-only machines quiet and lets ``auto`` ask for the
    CPU provider directly afterwards.
    """
    from onnx import TensorProto, helper

    if CUDA not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
        return session.get_providers()[0] == CUDA
    except Exception:  # a broken CUDA install can raise instead of falling back
        return False
    finally:
        ort.set_default_logger_severity(2)


def probe_device(provider: str) -> str:
    """The device sessions will get for ``provider`` ('cuda' or 'cpu'), warning as they would."""
    requested = requested_providers(provider)  # validates the name
    if provider == "cpu":
        return "cpu"
    if provider not in PROVIDER_CHOICES:  # a plugin executor: its first provider decides
        first = requested[0][0] if isinstance(requested[0], tuple) else requested[0]
        return "cuda" if first in (CUDA, "TensorrtExecutionProvider") else "cpu"
    if cuda_works():
        return "cuda"
    if provider == "cuda":
        raise ProviderError(
            "ONNX Runtime could not start the CUDA provider (check the CUDA and cuDNN libraries "
            "onnxruntime-gpu needs); use --provider cpu to run on the CPU"
        )
    warnings.warn(_FALLBACK_MESSAGE, CpuFallbackWarning, stacklevel=2)
    return "cpu"

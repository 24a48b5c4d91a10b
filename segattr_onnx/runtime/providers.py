"""Choosing the ONNX Runtime execution provider, and checking that a session really got it.

ONNX Runtime falls back to the CPU silently when the CUDA provider cannot load (missing CUDA or
cuDNN libraries), so the only trustworthy answer is ``session.get_providers()`` after creation.
The CUDA provider is always requested with ``cuda_provider_options()``: full float32 precision
(no TF32) unless ``SEGATTR_ALLOW_TF32=1`` is set.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING

from segattr_onnx.errors import ProviderError
from segattr_onnx.text import setting

if TYPE_CHECKING:
    import onnxruntime as ort

PROVIDER_CHOICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ALLOW_TF32_ENV = "SEGATTR_ALLOW_TF32"


def _fallback_message() -> str:
    cpu = setting("--provider cpu", 'provider="cpu"')
    return f"CUDA is not usable here; segattr-onnx runs on the CPU (pass {cpu} to silence this)"


def _use_cpu() -> str:
    return "use " + setting("--provider cpu", 'provider="cpu"')


_fallback_reported = False  # the fallback is said once per process, however many sessions


def _warn_fallback(stacklevel: int) -> None:
    global _fallback_reported
    if not _fallback_reported:
        _fallback_reported = True
        warnings.warn(_fallback_message(), CpuFallbackWarning, stacklevel=stacklevel + 1)


def __getattr__(name: str):
    """``ort``: ONNX Runtime, imported when first needed (the CLI's start does not need it)."""
    if name == "ort":
        import onnxruntime

        return onnxruntime
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CpuFallbackWarning(UserWarning):
    """``provider="auto"`` ended up on the CPU."""


def _plugin_providers(provider: str) -> list | None:
    from segattr_onnx.plugins import registry

    return registry().providers.get(provider)


def cuda_provider_options() -> dict[str, str]:
    """The CUDA provider's options: float32 kept at full precision, convolutions chosen cheaply.

    - ``use_tf32 = "0"``: on Ampere and newer GPUs ONNX Runtime otherwise runs float32 Conv and
      MatMul as TF32, whose 10-bit mantissa (~5e-4 relative) swamps what the methods measure:
      Ablation-CAM's and KWC's weights are score drops of ~1e-3 relative between two sums of
      thousands of probabilities, and Score-CAM feeds scores of ~1e3 to a softmax. Set the
      environment variable ``SEGATTR_ALLOW_TF32=1`` to trade that precision for speed; it is
      read each time sessions are created. ONNX Runtime treats the option as a preference: for
      a convolution cuDNN has no full-precision engine for, it builds a TF32 plan instead. For
      a hard guarantee also start the process with ``NVIDIA_TF32_OVERRIDE=0`` (the driver then
      refuses TF32 in cuBLAS and cuDNN).
    - ``cudnn_conv_algo_search = "HEURISTIC"``: cuDNN's fast heuristic (its mode A) picks each
      Conv's algorithm once per input shape from its tables. ONNX Runtime's default,
      EXHAUSTIVE, times every algorithm (or, in its cuDNN-frontend path, queries the slower
      mode-B heuristic) on the first run of each Conv node at each new shape; every explanation
      builds several sessions (prefix, a suffix per layer, score heads, gradients) and runs each
      at a few batch sizes (the budget's chunk and the remainder), so that search would dominate
      short runs, allocate large transient workspaces, and, timing-based, could pick another
      algorithm on another run (the same case then differs in the last bits). DEFAULT maps to
      cuDNN's fallback engines in the frontend path, which ONNX Runtime itself warns may be
      extremely slow. HEURISTIC gives the same algorithm for the same shape on the same GPU.
    - ``arena_extend_strategy = "kSameAsRequested"``: chunks are sized from free GPU memory;
      the default power-of-two growth could ask for nearly twice what a chunk needs.
    """
    return {
        "use_tf32": "1" if os.environ.get(ALLOW_TF32_ENV, "").strip() == "1" else "0",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }


def requested_providers(provider: str) -> list:
    """The provider list to ask ONNX Runtime for (a plugin's named list as it is).

    CUDA comes as ``(CUDAExecutionProvider, cuda_provider_options())``, followed by the CPU
    provider for the operators CUDA lacks.
    """
    if provider not in PROVIDER_CHOICES:
        named = _plugin_providers(provider)
        if named is not None:
            return named
        from segattr_onnx.plugins import registry

        known = [*PROVIDER_CHOICES, *registry().providers]
        raise ProviderError(f"provider {provider!r} is unknown; use one of {', '.join(known)}")
    if provider == "cpu":
        return [CPU]
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available or not cuda_works():
        if provider == "cuda":
            raise ProviderError(
                "the CUDA provider cannot start here (ONNX Runtime providers: "
                f"{', '.join(available)}; onnxruntime-gpu needs CUDA 12 and cuDNN 9); "
                f"{_use_cpu()}"
            )
        return [CPU]
    return [(CUDA, cuda_provider_options()), CPU]


def device_of(session: ort.InferenceSession) -> str:
    """'cuda' or 'cpu': where the session's first provider runs."""
    return "cuda" if session.get_providers()[0] in (CUDA, "TensorrtExecutionProvider") else "cpu"


def check_session_provider(session: ort.InferenceSession, provider: str) -> str:
    """Enforce ``provider`` on a created session; warn once when ``auto`` landed on the CPU."""
    device = device_of(session)
    if provider == "cuda" and device != "cuda":
        raise ProviderError(
            "ONNX Runtime could not start the CUDA provider (check the CUDA and cuDNN libraries "
            f"onnxruntime-gpu needs); {_use_cpu()} to run on the CPU"
        )
    if provider == "auto" and device != "cuda":
        _warn_fallback(stacklevel=3)
    return device


@lru_cache(maxsize=1)
def cuda_works() -> bool:
    """Whether a CUDA session really starts here (a hardware fact, so probed once per process).

    ONNX Runtime logs an error for every session that fails to load the CUDA libraries; probing
    once with its logger silenced keeps CPU-only machines quiet and lets ``auto`` ask for the
    CPU provider directly afterwards. The probe uses the options real sessions get, so an option
    this ONNX Runtime rejects shows up here as "CUDA does not work", not later mid-explanation.
    """
    import onnxruntime as ort
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
        session = ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=[(CUDA, cuda_provider_options()), CPU],
        )
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
    if provider not in PROVIDER_CHOICES:  # a plugin's list: its first provider decides
        first = requested[0][0] if isinstance(requested[0], tuple) else requested[0]
        return "cuda" if first in (CUDA, "TensorrtExecutionProvider") else "cpu"
    if cuda_works():
        return "cuda"
    if provider == "cuda":
        raise ProviderError(
            "ONNX Runtime could not start the CUDA provider (check the CUDA and cuDNN libraries "
            f"onnxruntime-gpu needs); {_use_cpu()} to run on the CPU"
        )
    _warn_fallback(stacklevel=2)
    return "cpu"

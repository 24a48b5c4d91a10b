"""GPU tests: skipped where the CUDA provider does not work, failed instead under
``SEGATTR_REQUIRE_GPU=1`` (what benchmarks/gpu_check.sh sets, so a GPU check cannot pass by
skipping everything).

Run them with ``SEGATTR_REQUIRE_GPU=1 python -m pytest -m gpu tests/gpu``. Every comparison makes
its CPU reference in the same process, from the same fixture, so the only difference is the
device.
"""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest
from onnxruntime.capi import build_and_package_info

from segattr_onnx.runtime.providers import CUDA, cuda_works

REQUIRE_GPU_ENV = "SEGATTR_REQUIRE_GPU"


def why_cuda_does_not_work() -> str:
    """What a user needs to know to fix it: the ONNX Runtime build and what it found."""
    available = ort.get_available_providers()
    found = f"onnxruntime {ort.__version__} with providers {', '.join(available)}"
    if CUDA not in available:
        return f"{found}: install onnxruntime-gpu instead of onnxruntime"
    built_for = getattr(build_and_package_info, "cuda_version", None) or "?"
    return (
        f"{found}: the CUDA provider is built in (for CUDA {built_for}) but its session fell "
        f"back to the CPU; it needs an NVIDIA driver and the CUDA {built_for.split('.')[0]} "
        "libraries and cuDNN 9 it was built with on the library path (LD_LIBRARY_PATH, or "
        "onnxruntime.preload_dlls()); onnxruntime-gpu 1.23 needs libcudart.so.12, "
        "libcublas.so.12, libcublasLt.so.12, libcufft.so.11, libcurand.so.10 and libcudnn.so.9"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Skip, or fail under SEGATTR_REQUIRE_GPU=1, unless a CUDA session really starts.

    Decided in the call phase, not in a fixture, so a missing GPU under SEGATTR_REQUIRE_GPU=1 is
    reported as a FAILED test rather than as a setup error.
    """
    if cuda_works():
        return
    if os.environ.get(REQUIRE_GPU_ENV, "").strip() == "1":
        pytest.fail(
            f"{REQUIRE_GPU_ENV}=1 but CUDA does not work here: {why_cuda_does_not_work()}",
            pytrace=False,
        )
    pytest.skip(f"CUDA does not work here; set {REQUIRE_GPU_ENV}=1 to fail instead")

"""On a GPU: explanations really run on the CUDA provider, with the options segattr-onnx asks for.

ONNX Runtime falls back to the CPU without a word when the CUDA libraries are missing, so a GPU
run that "passes" proves nothing unless the sessions themselves say CUDAExecutionProvider.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx import Explainer
from segattr_onnx.runtime import sessions as sessions_module
from segattr_onnx.runtime.chunks import ChunkedRunner
from segattr_onnx.runtime.providers import ALLOW_TF32_ENV, CUDA, requested_providers
from tests.conftest import fixture

pytestmark = pytest.mark.gpu

# 1 + 2^-12: TF32 keeps 10 mantissa bits and reads it as exactly 1, so a sum of 1024 products
# with weights 1 is 1024.0; float32 holds it and every partial sum exactly, so in any summation
# order the sum is 1024.25. A gap of 0.25 against no rounding error at all.
NEAR_ONE = np.float32(1 + 2**-12)
TERMS = 1024
EXACT = TERMS * (1 + 2**-12)
TOLERANCE = 0.05  # room for a transform-based convolution algorithm's rounding


def test_every_session_of_an_explanation_runs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """KWC (prefix, suffixes), Score-CAM (masked inputs, score head) and Grad-CAM (backward
    graph): each session is on CUDA with TF32 off, and every runner binds its inputs there."""
    made: list[ort.InferenceSession] = []
    create = sessions_module.create_session

    def recording_create(*args, **kwargs) -> ort.InferenceSession:
        session = create(*args, **kwargs)
        made.append(session)
        return session

    devices: list[str] = []
    init = ChunkedRunner.__init__

    def recording_init(self: ChunkedRunner, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        devices.append(self.device)

    monkeypatch.setattr(sessions_module, "create_session", recording_create)
    monkeypatch.setattr(ChunkedRunner, "__init__", recording_init)
    monkeypatch.delenv(ALLOW_TF32_ENV, raising=False)

    fx = fixture("unet2d_torchscript")
    explainer = Explainer(fx.path, provider="cuda")
    assert explainer.device == "cuda"
    for method in ("kwc", "scorecam", "gradcam"):
        assert explainer.explain(fx.input(0), method).provider == "cuda"

    assert made, "no session was made through segattr_onnx.runtime.sessions.create_session"
    for session in made:
        assert session.get_providers()[0] == CUDA, session.get_providers()
        options = session.get_provider_options()[CUDA]
        assert options["use_tf32"] == "0"
        assert options["cudnn_conv_algo_search"] == "HEURISTIC"
        assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert devices and set(devices) == {"cuda"}, devices


def _matmul_model() -> onnx.ModelProto:
    """(256 × 1024) · (1024 × 256) of NEAR_ONE and ones: large enough for tensor cores."""
    weight = numpy_helper.from_array(np.ones((TERMS, 256), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tf32_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, TERMS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _conv_model() -> onnx.ModelProto:
    """A 1×1 Conv summing 1024 input channels of NEAR_ONE with weights 1."""
    weight = numpy_helper.from_array(np.ones((64, TERMS, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "tf32_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, TERMS, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64, 16, 16])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run_probe(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=requested_providers("cuda"))
    assert session.get_providers()[0] == CUDA
    (name,) = [i.name for i in session.get_inputs()]
    shape = session.get_inputs()[0].shape
    return session.run(None, {name: np.full(shape, NEAR_ONE, np.float32)})[0]


@pytest.mark.parametrize("make_model", [_matmul_model, _conv_model], ids=["MatMul", "Conv"])
def test_float32_products_keep_full_precision(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_TF32_ENV, raising=False)
    result = _run_probe(make_model())
    assert np.abs(result - EXACT).max() < TOLERANCE, f"got {np.unique(result)[:4]}: TF32 in use"


def test_the_tf32_probe_can_see_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: with SEGATTR_ALLOW_TF32=1 the same MatMul does round.

    cuBLAS picks TF32 tensor-core kernels for an fp32 GEMM this size whenever it may, on every
    GPU with TF32 (Ampere and newer); if this fails on such a GPU, the option does not reach
    ONNX Runtime and the precision test above proves nothing.
    """
    monkeypatch.setenv(ALLOW_TF32_ENV, "1")
    major = _compute_capability_major()
    if major is not None and major < 8:
        pytest.skip(f"compute capability {major}.x has no TF32")
    result = _run_probe(_matmul_model())
    assert np.abs(result - TERMS).max() < TOLERANCE, f"got {np.unique(result)[:4]}: TF32 not used"


def _compute_capability_major() -> int | None:
    """The GPU's compute capability major from nvidia-smi, None where it cannot say."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(float(out.strip().splitlines()[0]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def test_the_float16_fixture_explains_on_cuda_with_a_finite_map() -> None:
    """fp16 runs through cuDNN's half-precision tensor-core kernels, unlike the CPU provider."""
    fx = fixture("unet2d_fp16")
    result = Explainer(fx.path, provider="cuda").explain(fx.input(0), "kwc")
    assert result.provider == "cuda"
    assert result.map.shape == fx.test_shape[2:]
    assert np.all(np.isfinite(result.map))
    assert result.map.min() >= 0.0 and result.map.max() == pytest.approx(1.0)
    assert all(np.all(np.isfinite(layer.weights)) for layer in result.layers)

"""The committed fixtures compute what the PyTorch models that made them compute."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from tests.conftest import MODELS, Fixture


def test_onnx_runtime_matches_the_torch_reference(any_fixture: Fixture) -> None:
    references = np.load(MODELS / "reference_io.npz")
    x = references[f"{any_fixture.name}_input"]
    session = ort.InferenceSession(str(any_fixture.path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {any_fixture.spec["input_name"]: x})
    key = f"{any_fixture.name}_output"
    if any_fixture.spec["quantized"]:
        # int8 with random calibration: it must track the float model it was quantised from
        # (whose ONNX Runtime output matches torch, checked by the other parametrisations).
        float_model = MODELS / "unet2d_torchscript.onnx"
        float_session = ort.InferenceSession(str(float_model), providers=["CPUExecutionProvider"])
        (float_output,) = float_session.run(None, {any_fixture.spec["input_name"]: x})
        assert output.shape == float_output.shape
        assert np.corrcoef(output.ravel(), float_output.ravel())[0, 1] > 0.99
        return
    tolerance = any_fixture.spec["reference_atol"]
    np.testing.assert_allclose(output.astype(np.float64), references[key], atol=tolerance)

"""Ablation rows through the tail after a layer's linear readers (opt-in for now:
``AblationRunner.use_linearity``) give today's explanation:
KWC's and Ablation-CAM's maps, D, I and weights against the whole-suffix path (which the
weight-editing references of tests/methods check in turn), and the row forms themselves."""

from __future__ import annotations

import numpy as np
import pytest

from segattr_onnx import Explainer
from segattr_onnx.runtime.linear_ablation import DROP, FULL, KEEP, NONE, row_forms
from tests.conftest import assert_close, fixture

FIXTURES = {  # fixture → relative tolerance (float16 rounds every contribution)
    "unet2d_torchscript": 1e-5,
    "unet3d": 1e-5,
    "unet2d_dynamo": 1e-5,
    "unet2d_fixed_batch": 1e-5,
    "unet2d_fp16": 2e-3,
}


def _explain(name: str, method: str, linear: bool):
    fx = fixture(name)
    x = fx.input(2)
    explainer = Explainer(fx.path, provider="cpu")
    explainer._for_shape(x.shape).engine.ablation.use_linearity = linear
    return explainer.explain(x, method)


@pytest.mark.parametrize("method", ["kwc", "ablationcam"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_linear_rows_give_the_whole_suffix_explanation(name: str, method: str) -> None:
    linear = _explain(name, method, True)
    whole = _explain(name, method, False)
    tolerance = FIXTURES[name]
    assert "linear" in {run.graph for run in linear.runs}  # the path was taken
    assert "linear" not in {run.graph for run in whole.runs}
    assert_close(linear.map, whole.map, tolerance, f"{name} map")
    for a, b in zip(linear.layers, whole.layers, strict=True):
        assert_close(a.weights, b.weights, tolerance, f"{name} {a.layer} weights")
        for term in a.terms:
            assert_close(a.terms[term], b.terms[term], tolerance, f"{name} {a.layer} {term}")
    assert linear.forward_passes == whole.forward_passes


def test_sites_that_are_not_linear_fall_back_and_say_so() -> None:
    """NHWC blocks and QDQ models keep the whole suffix: their records say 'suffix'."""
    for name in ("unet2d_nhwc", "unet2d_qdq"):
        result = _explain(name, "kwc", True)
        graphs = {run.graph for run in result.runs if run.purpose == "ablation"}
        assert graphs == {"suffix"}, name


def test_row_forms_against_masks_written_out() -> None:
    masks = np.array(
        [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32
    )
    forms, kernels = row_forms(masks)
    assert forms.tolist() == [FULL, NONE, KEEP, DROP, KEEP]
    assert kernels[2:].tolist() == [2, 1, 0]
    assert row_forms(np.array([[1, 1, 0, 0]])) is None  # two kept of four: not a row form

"""One seam for running a case: ``Explainer.case`` sets it up, ``Explainer.run`` runs requests.

``explain`` and the metrics' scoring are built on it, so a caller composing a method by hand
from the seam must get exactly ``explain``'s kernel weights, and rows already computed for the
case must be reused, not recomputed, whichever caller asks.
"""

from __future__ import annotations

import numpy as np

from segattr_onnx import Explainer, Target
from segattr_onnx.methods.base import AblationRequest, MaskedInputRequest
from segattr_onnx.methods.registry import create_method
from segattr_onnx.methods.statistics import OVERLAP
from tests.conftest import fixture

MODEL = fixture("unet2d_torchscript")


def test_a_method_composed_from_the_seam_equals_explain() -> None:
    explainer = Explainer(MODEL.path, provider="cpu")
    x = MODEL.input(0)
    method = create_method("kwc")
    prepared = explainer.case(
        x, Target(class_index=1), "decoder", ablation_form=method.ablation_form("p2")
    )
    layer = prepared.layers[-1]
    requests = list(method.requests(prepared.case, layer))
    assert requests and all(isinstance(r, AblationRequest) for r in requests)
    rows, records = explainer.run(prepared, requests)
    assert sum(record.passes for record in records) == sum(len(r.masks) for r in requests)
    weights = method.kernel_weights(prepared.case, layer, rows).weights
    explained = explainer.explain(x, "kwc", "decoder", Target(class_index=1))
    by_layer = {attribution.layer: attribution.weights for attribution in explained.layers}
    np.testing.assert_allclose(weights, by_layer[layer.name], rtol=1e-6, atol=1e-9)
    # explain reused the rows the composed run left for the same case: only other layers ran.
    ablations = [run for run in explained.runs if run.purpose == "ablation"]
    assert sum(run.reused_rows for run in ablations) == sum(len(r.masks) for r in requests)


def test_masked_input_rows_come_back_in_request_order() -> None:
    explainer = Explainer(MODEL.path, provider="cpu")
    prepared = explainer.case(MODEL.input(1), Target(class_index=1))
    assert prepared.layers == () and prepared.case.base_score > 0
    x = prepared.case.x
    factors = np.linspace(1.0, 0.0, 5)

    def make_inputs(start: int, stop: int) -> np.ndarray:
        return np.concatenate([(x * factors[row]).astype(x.dtype) for row in range(start, stop)])

    (rows,), _ = explainer.run(prepared, [MaskedInputRequest("probe", 5, make_inputs, OVERLAP)])
    kept = rows[:, OVERLAP.columns.index("kept")]
    # Row 0 is the unmodified input: its kept score is the case's own base score.
    assert abs(kept[0] - prepared.case.base_score) < 1e-4 * prepared.case.base_score
    assert len(kept) == 5 and not np.allclose(kept, kept[0])

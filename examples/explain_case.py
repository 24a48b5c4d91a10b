"""Explain a synthetic case with every method on the bundled trained model, and score each map.

Run: ``python examples/explain_case.py`` (after ``pip install .``). Writes nothing; prints what
each method found, how its map scores against the case's ground truth, and what it cost.
"""

import numpy as np

import segattr_onnx
from segattr_onnx.bundled import example_model_path
from segattr_onnx.metrics import score_map
from segattr_onnx.synthetic import make_case

case = make_case(90_000, dim=2, size=128)  # a held-out seed: the model never saw it
explainer = segattr_onnx.Explainer(example_model_path(), provider="auto")
image = case.image[None]  # (1, H, W): channels first, no batch axis

for method in ("kwc", "ablationcam", "scorecam", "gradcam", "gradcampp"):
    # Sessions are built on the first call; Ablation-CAM then reuses KWC's dependent runs.
    result = explainer.explain(image, method=method, layers="decoder", variant="p2")
    scores = score_map(explainer, image, result.map, labels=case.labels, steps=None)
    on_target = result.map[case.labels == 3].mean()
    print(
        f"{method:12s} {result.forward_passes:4d} passes {result.seconds:6.3f} s  "
        f"PP {scores.prediction_preserved:.3f}  IP {scores.image_preserved:.3f}  "
        f"AQ {scores.attribution_quality:.3f}  mean map on target {on_target:.2f} "
        f"vs background {np.mean(result.map[case.labels == 0]):.2f}"
    )

"""Explain the bundled case with KWC, Score-CAM and Ablation-CAM, reusing one Explainer.

Run: ``python examples/explain_case.py`` (after ``pip install .``). Writes nothing; prints what
each method found and what it cost.
"""

from pathlib import Path

import numpy as np

import segattr_onnx

HERE = Path(__file__).parent
explainer = segattr_onnx.Explainer(HERE / "unet2d.onnx", provider="auto")
case = np.load(HERE / "case_2d.npy")  # (1, 128, 128): channels, H, W; no batch axis

for method in ("kwc", "ablationcam", "scorecam", "gradcam", "gradcampp"):
    # Sessions are built on the first call; Ablation-CAM then reuses KWC's dependent runs.
    result = explainer.explain(case, method=method, layers="decoder", variant="p2")
    peak = tuple(int(i) for i in np.unravel_index(np.argmax(result.map), result.map.shape))
    print(
        f"{method:12s} {result.forward_passes:4d} forward passes, {result.seconds:.3f} s, "
        f"peak at {peak}, mean {result.map.mean():.3f}"
    )
    for layer in result.layers[:2]:
        print(f"    {layer.layer}: weights {np.array2string(layer.weights, precision=4)}")

"""Inspect the bundled example model from Python: groups, bottleneck, block outputs.

Run: ``python examples/inspect_model.py`` (after ``pip install .``).
"""

import segattr_onnx
from segattr_onnx.bundled import example_model_path

MODEL = example_model_path()

report = segattr_onnx.inspect_model(MODEL, input_shape="1x1x128x128", provider="cpu")
analysis = report.analysis
print(f"input {analysis.input.name}: {analysis.input.layout}, analysed at {analysis.input.shape}")
print("bottleneck:", ", ".join(analysis.bottleneck))
for layer in analysis.layers:
    if layer.group == "decoder":
        print(f"  decoder {layer.name}: {layer.kernels} kernels at {layer.spatial_shape}")

"""Benchmark: one forward+backward run of the gradient graph over one forward run.

Grad-CAM and Grad-CAM++ need ∂T/∂A for the selected layers; segattr-onnx builds the backward
graph into the ONNX model, so one run computes both passes. Reverse-mode theory puts its cost
at 2–3× a forward pass. This script times, in one process and interleaved round by round:

* forward: the plain model's session, one case;
* forward+backward: the session of the model with T and ∂T/∂A_ℓ for every decoder layer;

and prints the median of each and the median of the per-round ratios.

Run from the repository root::

    python benchmarks/gradients.py                      # 2D fixture at 128×128
    python benchmarks/gradients.py --model tests/fixtures/models/unet3d.onnx \\
        --input-shape 1x1x16x16x16 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

from segattr_onnx import Explainer, Target  # noqa: E402
from segattr_onnx.graph.shapes import parse_shape  # noqa: E402
from segattr_onnx.methods.layers import select_layers  # noqa: E402
from segattr_onnx.runtime.providers import PROVIDER_CHOICES  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--input-shape", default="1x1x128x128")
    parser.add_argument("--layers", default="decoder")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    shape = parse_shape(args.input_shape)
    explainer = Explainer(args.model, provider=args.provider)
    dtype = np.float16 if "fp16" in Path(args.model).name else np.float32
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    result = explainer.explain(x, "gradcam", args.layers)  # builds and checks both sessions
    engine = explainer._for_shape(x.shape).engine
    analysis = engine.analysis
    target = Target(class_index=result.target["class_index"]).resolve(analysis)
    layers = [layer.name for layer in select_layers(analysis, args.layers)]
    model, spec, outputs = engine.gradient_model(target, layers)
    backward = engine.sessions.get(("gradients", spec, tuple(layers)), lambda: model)
    forward = engine.sessions.get(("full", None), lambda: analysis.model.proto)
    feeds = spec.feeds(result.prediction, None, target.class_index)
    backward_feeds = {
        analysis.input.name: x,
        **{k: v for k, v in feeds.items() if k != spec.base_input},
    }
    forward_feeds = {analysis.input.name: x}
    gradient_names = list(outputs.values())

    forward_times, backward_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        forward.run(None, forward_feeds)
        forward_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        backward.run(gradient_names, backward_feeds)
        backward_times.append(time.perf_counter() - started)
    ratios = [b / f for f, b in zip(forward_times, backward_times, strict=True)]
    report = {
        "model": Path(args.model).name,
        "input_shape": list(shape),
        "layers": len(layers),
        "provider": result.provider,
        "forward_seconds": round(statistics.median(forward_times), 6),
        "forward_backward_seconds": round(statistics.median(backward_times), 6),
        "ratio": round(statistics.median(ratios), 3),
        "backward_graph_nodes": len(model.graph.node),
        "forward_graph_nodes": len(analysis.model.proto.graph.node),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"gradients of T for {report['layers']} {args.layers} layers of {report['model']} "
        f"{args.input_shape}, provider {report['provider']}"
    )
    print(
        f"  forward            {report['forward_seconds'] * 1000:.2f} ms  "
        f"({report['forward_graph_nodes']} nodes)"
    )
    print(
        f"  forward+backward   {report['forward_backward_seconds'] * 1000:.2f} ms  "
        f"({report['backward_graph_nodes']} nodes)"
    )
    print(
        f"  ratio              {report['ratio']:.2f}x  median of {args.repeats} rounds "
        "(reverse-mode theory: 2-3x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

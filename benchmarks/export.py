"""Benchmark: an explained model (``segattr export``) against the plain model it came from.

A deployment runs the exported file instead of the model: the price of the built-in
explanation is the ratio of one run of the exported model (forward, backward to the explained
layers, saliency head) to one run of the plain model. Both are timed in this process with
plain ONNX Runtime sessions built and warmed outside the timing, interleaved run by run (the
machines here are shared and noisy, so only same-process ratios mean anything); the table
gives the medians and the median of the per-round ratios, for each session setting:

* ``default``: ONNX Runtime's default options for both models;
* ``no NCHWc``: ``disabled_optimizers=["NchwcTransformer"]`` for the exported model (how explain
  runs backward graphs: the layout transform reorders every tensor the backward pass reads
  outside a convolution, and its kernels round differently from explain's), default for the
  plain one.

Models: the 2D fixture (``unet2d_torchscript``) at ``--size-2d``, the bundled 3D model at
``--size-3d``, and, when torch is installed, the seeded 2D and 3D U-Nets of ``unet.py``
(16-32-64 channels, ConvTranspose ups) at the same sizes. The goal is ≤ 2.5× on the CPU.

Run from the repository root::

    python benchmarks/export.py                 # about a minute on 2 cores
    python benchmarks/export.py --runs 30 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

import onnxruntime as ort  # noqa: E402

from segattr_onnx.bundled import example_3d_model_path  # noqa: E402
from segattr_onnx.exporting import explained_model, save_exported  # noqa: E402
from segattr_onnx.graph.loading import load_model  # noqa: E402

GOAL = 2.5


def _session(path: Path, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
    )


def _cases(size_2d: int, size_3d: int, folder: Path) -> list[tuple[str, Path, tuple[int, ...]]]:
    cases = [
        (
            "fixture U-Net 2D (unet2d_torchscript)",
            REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx",
            (1, 1, size_2d, size_2d),
        ),
        ("bundled 3D model", Path(example_3d_model_path()), (1, 1, size_3d, size_3d, size_3d)),
    ]
    try:
        sys.path.insert(0, str(BENCHMARKS))
        from unet import export_onnx, make_unet
    except ImportError:
        return cases
    for dims, size in ((2, size_2d), (3, size_3d)):
        path = export_onnx(make_unet(dims), dims, folder / f"unet{dims}d.onnx")
        cases.append((f"benchmark U-Net {dims}D (unet.py)", path, (1, 1, *([size] * dims))))
    return cases


def measure(name: str, path: Path, shape: tuple[int, ...], method: str, runs: int, folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = explained_model(path, method, "decoder", None, "p2", shape)
    out = folder / f"{path.stem}_{shape[-1]}_{method}.xai.onnx"
    save_exported(exported, out, load_model(path))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sessions = {
        "plain": _session(path),
        "default": _session(out),
        "no NCHWc": _session(out, ("NchwcTransformer",)),
    }
    input_name = exported.input_name
    for session in sessions.values():  # warm: first-run packing and allocations
        session.run(None, {input_name: x})
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {input_name: x})
            times[key].append(time.perf_counter() - started)
    plain = statistics.median(times["plain"])
    row = {
        "model": name,
        "input": "x".join(map(str, shape)),
        "method": method,
        "layers": len(exported.layers),
        "plain_ms": plain * 1e3,
    }
    for key in ("default", "no NCHWc"):
        row[f"{key}_ms"] = statistics.median(times[key]) * 1e3
        # The median of each round's ratio: a round's runs are milliseconds apart, so a slow
        # spell of the machine slows both and cancels out.
        ratios = [e / p for e, p in zip(times[key], times["plain"], strict=True)]
        row[f"{key}_ratio"] = statistics.median(ratios)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-2d", type=int, default=256)
    parser.add_argument("--size-3d", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--methods", default="gradcam,gradcampp,layercam")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, path, shape in _cases(args.size_2d, args.size_3d, Path(folder)):
            for method in args.methods.split(","):
                rows.append(measure(name, path, shape, method, args.runs, Path(folder)))
    if args.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}))
        return
    print(f"| model | input | method | layers | plain (ms) | exported, default (ms) | ratio "
          f"| exported, no NCHWc (ms) | ratio | ≤ {GOAL:g}× |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = min(r["default_ratio"], r["no NCHWc_ratio"])
        print(
            f"| {r['model']} | {r['input']} | {r['method']} | {r['layers']} | "
            f"{r['plain_ms']:.1f} | {r['default_ms']:.1f} | **{r['default_ratio']:.2f}×** | "
            f"{r['no NCHWc_ms']:.1f} | **{r['no NCHWc_ratio']:.2f}×** | "
            f"{'PASS' if best <= GOAL else 'FAIL'} |"
        )


if __name__ == "__main__":
    main()

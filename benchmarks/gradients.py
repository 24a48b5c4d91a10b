"""Benchmark: Grad-CAM and Grad-CAM++ end to end against one forward pass of the same model.

A gradient method needs one observation pass (P and the layers' activations) and one run of
the backward graph built into the model (forward + backward), so its whole cost should stay
within a few forward passes. This script times, in one process and interleaved round by round
(the machines here are shared and noisy, so only same-process ratios mean anything):

* forward: one run of the plain model in a plain ONNX Runtime session (CPU provider, default
  options), built and warmed outside the timing; the median of ``--forward-runs`` runs;
* Grad-CAM and Grad-CAM++ end to end in a fresh ``Explainer``: reading and analysing the model,
  building the backward graph, creating both sessions, both runs, the weights, the layer maps
  and the combined map (set-up included, as for one case on the command line);
* fwd+bwd: one warm run of the backward graph's session alone (the floor the gradient run sets);

and prints a markdown table of the medians, the ratios (medians of the per-round ratios) and
PASS/FAIL against ``--target`` (4x one forward pass). The first round warms the process
(imports, ONNX Runtime's shared arena) and is not counted.

Models: the 2D fixture with free spatial dims (``unet2d_torchscript``, at each ``--size-2d``), the
3D fixture (``unet3d``, fixed at 16³), the 3D fixtures ``unet3d``, ``dynunet3d`` (MONAI
DynUNet) and ``segresnet3d`` (MONAI SegResNet) with their spatial dims declared free at
``--size-3d-fixtures`` (96³) and, when torch is installed, the seeded 3D U-Net of ``unet.py`` at
``--size-3d`` (128³), exported to a temporary folder. ``--all-fixtures`` adds every 2D fixture
at its own fixed size. Tiny inputs (a forward pass of a few milliseconds) measure the fixed
set-up cost (about 25 ms: analysis, backward graph, one session), which no ratio to the forward
pass can hide; the ms columns show it.

Run from the repository root::

    python benchmarks/gradients.py                    # about 2 minutes on 2 cores
    python benchmarks/gradients.py --rounds 5 --json
    python benchmarks/gradients.py --no-torch         # fixtures only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "models"
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

import onnxruntime as ort  # noqa: E402

from segattr_onnx import Explainer, Target  # noqa: E402
from segattr_onnx.methods.layers import select_layers  # noqa: E402

METHODS = ("gradcam", "gradcampp")
SETTLE_S = 0.2


@dataclass
class Case:
    label: str
    model: str
    x: np.ndarray
    input_name: str


def _fixture_cases(sizes_2d: list[int], all_fixtures: bool) -> list[Case]:
    """The 2D fixture with free spatial dims at each of ``sizes_2d``, the 3D fixture, and with
    ``all_fixtures`` every other fixture at its own size."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    rng = np.random.default_rng(0)
    cases = []
    for name, spec in manifest.items():
        dims = len(spec["input_shape"]) - 2
        if not (all_fixtures or name in ("unet2d_torchscript", "unet3d")):
            continue
        free = [i for i, d in enumerate(spec["input_shape"]) if isinstance(d, str) and i]
        for size in sizes_2d if free else [None]:
            shape = [size if axis in free else d for axis, d in enumerate(spec["test_shape"])]
            x = rng.standard_normal(shape).astype(np.dtype(spec["dtype"]))
            label = f"{name} ({dims}D fixture)"
            cases.append(Case(label, str(FIXTURES / spec["file"]), x, spec["input_name"]))
    return cases


FAMILIES = REPO_ROOT / "tests" / "fixtures" / "families"
FREED_3D = (("models", "unet3d"), ("families", "dynunet3d"), ("families", "segresnet3d"))


def _freed_3d_cases(size: int, folder: Path) -> list[Case]:
    """The 3D fixtures (exported at 16³ or 32³) with their spatial dims declared free, at
    size³: the same graphs and weights at a size where the forward pass does real work, so
    the ratio measures the method rather than the fixed set-up. A graph that baked its export
    size into constants and cannot run at size³ is left out, with a note."""
    import onnx

    cases = []
    rng = np.random.default_rng(1)
    for kind, name in FREED_3D:
        root = FIXTURES if kind == "models" else FAMILIES
        spec = json.loads((root / "manifest.json").read_text())["fixtures"][name]
        model = onnx.load(str(root / spec["file"]))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for axis in range(2, len(dims)):
            dims[axis].Clear()
            dims[axis].dim_param = f"spatial_{axis}"
        for output in model.graph.output:
            output.type.tensor_type.ClearField("shape")
        del model.graph.value_info[:]
        path = folder / f"{name}_free.onnx"
        onnx.save(model, str(path))
        x = rng.standard_normal((1, spec["test_shape"][1], size, size, size)).astype(np.float32)
        try:
            _forward_session(str(path)).run(None, {spec["input_name"]: x})
        except Exception as exc:  # ORT's own types: the graph is tied to its export size
            print(f"{name} cannot run at {size}³ ({str(exc)[:80]}); left out", file=sys.stderr)
            continue
        cases.append(Case(f"{name} (3D fixture, free dims)", str(path), x, spec["input_name"]))
    return cases


def _torch_case(size: int, folder: Path) -> Case | None:
    """The seeded 3D benchmark U-Net of unet.py at size³, or None without torch."""
    try:
        sys.path.insert(0, str(BENCHMARKS))
        from unet import INPUT_NAME, export_onnx, make_case, make_unet
    except ImportError:
        return None
    path = export_onnx(make_unet(3), 3, folder / "unet3d_benchmark.onnx")
    x = make_case(3, size).numpy()
    return Case("benchmark U-Net (3D, unet.py)", str(path), x, INPUT_NAME)


def _forward_session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _timed(function) -> tuple[float, object]:
    """Seconds ``function`` took, and its value. Each timing starts after a pause: idle worker
    threads of ONNX Runtime and OpenBLAS busy-wait for a while after their last work, and on
    a small machine they would slow whatever is timed next."""
    time.sleep(SETTLE_S)
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def _gradient_floor(explainer: Explainer, x: np.ndarray, result) -> float:
    """One warm run of the explainer's backward-graph session (forward + backward)."""
    engine = explainer._for_shape(x.shape).engine
    analysis = engine.analysis
    target = Target(class_index=result.target["class_index"]).resolve(analysis)
    layers = tuple(layer.name for layer in select_layers(analysis, "decoder"))
    model, spec, outputs = engine.gradient_model(target, layers)
    session = engine.sessions.get(("gradients", spec, layers), lambda: model)
    feeds = spec.feeds(result.prediction, None, target.class_index)
    feeds = {k: v for k, v in feeds.items() if k != spec.base_input}
    feeds[analysis.input.name] = x
    names = list(outputs.values())
    session.run(names, feeds)
    return statistics.median(_timed(lambda: session.run(names, feeds))[0] for _ in range(3))


def measure(case: Case, rounds: int, forward_runs: int, target: float) -> dict:
    session = _forward_session(case.model)
    feeds = {case.input_name: case.x}
    session.run(None, feeds)
    rows: dict[str, list[float]] = {"forward": [], **{m: [] for m in METHODS}}
    ratios: dict[str, list[float]] = {m: [] for m in METHODS}
    floors: list[float] = []
    for round_index in range(rounds + 1):  # round 0 warms the process and is dropped
        forward = statistics.median(
            _timed(lambda: session.run(None, feeds))[0] for _ in range(forward_runs)
        )
        seconds = {}
        for method in METHODS:
            explainer = None

            def run(method=method):
                nonlocal explainer
                explainer = Explainer(case.model, provider="cpu")
                return explainer.explain(case.x, method, "decoder")

            seconds[method], result = _timed(run)
            if method == "gradcam" and round_index:
                floors.append(_gradient_floor(explainer, case.x, result) / forward)
            del explainer, result
        if not round_index:
            continue
        rows["forward"].append(forward)
        for method in METHODS:
            rows[method].append(seconds[method])
            ratios[method].append(seconds[method] / forward)
    report = {
        "model": case.label,
        "input": "x".join(map(str, case.x.shape)),
        "forward_ms": statistics.median(rows["forward"]) * 1e3,
        "fwd_bwd_ratio": statistics.median(floors),
    }
    for method in METHODS:
        report[f"{method}_ms"] = statistics.median(rows[method]) * 1e3
        report[f"{method}_ratio"] = statistics.median(ratios[method])
        report[f"{method}_ratio_range"] = [min(ratios[method]), max(ratios[method])]
    for method in METHODS:
        report[f"{method}_pass"] = report[f"{method}_ratio"] <= target
    return report


def table(reports: list[dict], target: float) -> str:
    lines = [
        "| model | input | forward (ms) | fwd+bwd run / forward | Grad-CAM (ms) | ratio "
        f"| ≤ {target:g}× | Grad-CAM++ (ms) | ratio | ≤ {target:g}× |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        verdict = {m: "PASS" if r[f"{m}_pass"] else "FAIL" for m in METHODS}
        lines.append(
            f"| {r['model']} | {r['input']} | {r['forward_ms']:.1f} | "
            f"{r['fwd_bwd_ratio']:.2f}× | {r['gradcam_ms']:.1f} | "
            f"**{r['gradcam_ratio']:.2f}×** | {verdict['gradcam']} | {r['gradcampp_ms']:.1f} | "
            f"**{r['gradcampp_ratio']:.2f}×** | {verdict['gradcampp']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-2d", default="512,1024", help="sides of the 2D fixture's input, comma-separated"
    )
    parser.add_argument("--size-3d", type=int, default=128, help="side of the torch U-Net's input")
    parser.add_argument(
        "--size-3d-fixtures",
        type=int,
        default=96,
        help="side at which the 3D fixtures also run with free spatial dims (0: not at all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--forward-runs", type=int, default=5, help="forward runs per round")
    parser.add_argument("--target", type=float, default=4.0, help="ratio to pass")
    parser.add_argument("--all-fixtures", action="store_true", help="every 2D fixture too")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch U-Net")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        sizes_2d = [int(size) for size in args.size_2d.split(",") if size]
        cases = _fixture_cases(sizes_2d, args.all_fixtures)
        if args.size_3d_fixtures:
            cases += _freed_3d_cases(args.size_3d_fixtures, Path(folder))
        if not args.no_torch:
            built = _torch_case(args.size_3d, Path(folder))
            if built is None:
                print("torch is not installed: the 3D U-Net row is left out", file=sys.stderr)
            else:
                cases.append(built)
        reports = []
        for case in cases:
            reports.append(measure(case, args.rounds, args.forward_runs, args.target))
            if not args.json:
                print(f"measured {case.label} {reports[-1]['input']}", file=sys.stderr)
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(
        f"Grad-CAM and Grad-CAM++ through the decoder, fresh Explainer each (set-up included), "
        f"against one forward pass; onnxruntime {ort.__version__}, CPU provider, "
        f"{platform.processor() or platform.machine()}; median of {args.rounds} rounds"
    )
    print()
    print(table(reports, args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

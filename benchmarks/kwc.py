"""Benchmark: KWC over all decoder layers, against the ONNX Runtime floor and the MAC limit.

The engine's job is to add nothing to the runs a method needs, and to need as few as possible.
This script explains cases with KWC (P2 by default) through every decoder layer, in one process,
in four ways taken in turn each round (so a shared machine's drifts hit both alike):

* linear: today's default, each layer's rows formed after its first linear readers
  (docs/algorithms.md, "first-consumer linearity");
* suffix: every row through the whole graph after the layer (``use_linearity = False``);
* wide: linear, in batches sized by the memory budget alone, not kept within the CPU's
  last-level cache (``cache_bytes = None``; runtime/cpu_cache.py);
* serial: linear, one chunk at a time on every core instead of two chunks at once, each on
  half of them (``streams = 1``; runtime/cpu_streams.py).

For each it prints:

* total: wall time of ``Explainer.explain`` on a warm explainer (sessions already built, as in a
  validation pipeline that explains many cases), a new case each round;
* floor: the very same ONNX Runtime calls replayed alone, back to back (mean of a replay just
  before and one just after the explanation): ratio = total / floor, target ≤ 1.1;
* multiply-adds (``graph/cost.py``) of the passes as run, against the authors' way, one full
  re-run of the model per ablation; ``MAC limit`` is the time those multiply-adds take at the
  rate ONNX Runtime reaches on one pass of the full model, and total / limit how close the run
  comes to it. The authors' re-runs are timed too, as that many full passes in ONNX Runtime.

Run from the repository root::

    python benchmarks/kwc.py                       # 2D fixture at 128×128, P2
    python benchmarks/kwc.py --unet 16,32,64 --input-shape 1x1x256x256 --repeats 7
    python benchmarks/kwc.py --input-shape 1x1x32x32 --variant p1 --json
"""

from __future__ import annotations

import argparse
import json
import math
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


from ort_replay import RunRecorder  # noqa: E402

from segattr_onnx import Explainer  # noqa: E402
from segattr_onnx.graph.cost import graph_macs, node_macs  # noqa: E402
from segattr_onnx.graph.index import GraphIndex  # noqa: E402
from segattr_onnx.graph.linearity import formation  # noqa: E402
from segattr_onnx.graph.shapes import parse_shape  # noqa: E402
from segattr_onnx.runtime.providers import PROVIDER_CHOICES  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx"
MODES = ("linear", "suffix", "wide", "serial")


def multiply_adds(explainer: Explainer, shape: tuple[int, ...], result, variant: str) -> dict:
    """Multiply-adds of the explanation's passes as it ran them and of the authors' full
    re-runs (one full pass per ablation)."""
    sized = explainer._for_shape(shape)
    analysis, ablation = sized.analysis, sized.engine.ablation
    full = graph_macs(analysis.model.proto, analysis.tensors)
    form = "block" if variant == "p2" else "raw"
    ran = passes = 0
    for run in result.runs:
        passes += run.passes
        if run.graph == "linear" and run.layer is not None:  # rows formed after the readers
            ablated = ablation.ablated(run.layer, form)
            tail = ablated.linear
            index = GraphIndex(ablated.model.graph)
            outputs = [read.output for read in tail.reads]
            readers = contributions = 0
            for read in tail.reads:
                chain = [read.after.transpose_output, read.output] if read.after else [read.output]
                for output in chain:  # the reader, and the convolution after it if composed
                    node = next(n for n in ablated.model.graph.node if n.output[0] == output)
                    readers += node_macs(node, index, ablated.infos)
                contributions += _formation_macs(ablated, read) * ablated.site.channels
            hoisted = tail.hoisted
            once = graph_macs(hoisted.invariant, ablated.infos) if hoisted is not None else 0
            formations = (run.layer_runs - 2 - int(hoisted is not None)) // len(tail.reads)
            channels = ablated.site.channels
            kwc_rows = np.vstack([np.ones((1, channels)), 1 - np.eye(channels), np.eye(channels)])
            schedule = ablation.linear_schedule(ablated, kwc_rows)
            group = schedule.group if schedule is not None else channels
            per_row = graph_macs(tail.tail.model, ablated.infos, batched_from=outputs)
            # + Y(1) and B (the readers twice), the hoisted part (a skip half) once, and each
            # formation run: the grouped convolution on ``group`` channels (padding included)
            formed = contributions * formations * group // channels
            ran += run.passes * per_row + 2 * readers + once + formed
        elif run.graph == "suffix" and run.layer is not None:
            ablated = ablation.ablated(run.layer, form)
            mask = [ablated.site.mask_input]
            ran += run.passes * graph_macs(ablated.suffix.model, ablated.infos, mask)
        else:
            ran += run.passes * full
    return {"full_pass": full, "passes": passes, "ran": ran, "authors": passes * full}


def _formation_macs(ablated, read) -> int:
    """Multiply-adds of one channel's contribution K_c: the grouped convolution that forms a
    table covers Z's channels only (not a Concat's others), each alone."""
    op_type, attributes = formation(ablated.model, read)
    weights = GraphIndex(ablated.model.graph).initializers[read.weight].dims[2:]
    kernel = math.prod(attributes.get("kernel_shape") or weights)  # optional in ONNX
    produced = ablated.infos[read.output].shape
    if op_type == "Conv":  # every output value of the reader, from one input channel
        return math.prod(produced[1:]) * kernel
    # a ConvTranspose scatters each input position into its output channels through the kernel
    source = ablated.infos[ablated.site.source].shape
    return math.prod(source[2:]) * produced[1] * kernel


def _forward_seconds(explainer: Explainer, shape: tuple[int, ...], x: np.ndarray) -> float:
    """Median time of one plain pass of the full model (the MAC rate's reference)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        explainer.model.proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = explainer.analysis(shape).input.name
    session.run(None, {name: x})
    times = []
    for _ in range(9):
        started = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _export_unet(widths: tuple[int, ...]) -> Path:
    """unet.py's seeded 2D U-Net, TorchScript-exported to a temporary folder."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unet import export_onnx, make_unet

    folder = Path(tempfile.mkdtemp(prefix="segattr-kwc-"))
    name = "unet_" + "-".join(map(str, widths)) + ".onnx"
    return export_onnx(make_unet(2, widths=widths), 2, folder / name)


class Mode:
    """One way of running KWC, its explainer and what its rounds measured."""

    def __init__(self, name: str, model: str, provider: str, shape: tuple[int, ...]) -> None:
        self.name = name
        started = time.perf_counter()
        self.explainer = Explainer(model, provider=provider)
        ablation = self.explainer._for_shape(shape).engine.ablation
        ablation.use_linearity = name != "suffix"
        if name == "wide":
            ablation.cache_bytes = None
        if name == "serial":
            ablation.streams = 1
        self.load_seconds = time.perf_counter() - started
        self.totals: list[float] = []
        self.floors: list[float] = []
        self.previous_calls: list = []
        self.result = None


def run_round(mode: Mode, recorder: RunRecorder, case: np.ndarray, args) -> None:
    """One explanation, its time and its floor (the previous round's calls cost the same:
    same graphs, same shapes, so the floor is the mean of a replay before and one after)."""
    recorder.calls = mode.previous_calls
    before = recorder.replay_seconds() if mode.previous_calls else None
    recorder.calls = []
    recorder.recording = True
    started = time.perf_counter()
    result = mode.explainer.explain(case, "kwc", args.layers, variant=args.variant)
    mode.totals.append(time.perf_counter() - started)
    recorder.recording = False
    after = recorder.replay_seconds()
    mode.floors.append(after if before is None else (before + after) / 2)
    if len(recorder.calls) != result.session_runs:
        raise SystemExit(
            f"recorded {len(recorder.calls)} ORT calls but the explanation reports "
            f"{result.session_runs}"
        )
    mode.previous_calls = recorder.calls
    mode.result = result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument(
        "--unet",
        metavar="WIDTHS",
        help="instead of --model, export unet.py's 2D U-Net with these widths (e.g. 16,32,64: "
        "the issue's reference model; needs torch)",
    )
    parser.add_argument("--input-shape", default="1x1x128x128")
    parser.add_argument("--variant", choices=("p1", "p2"), default="p2")
    parser.add_argument("--layers", default="decoder")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    shape = parse_shape(args.input_shape)
    if args.unet:
        args.model = str(_export_unet(tuple(int(w) for w in args.unet.split(","))))
    recorder = RunRecorder()
    recorder.install()
    rng = np.random.default_rng(0)
    dtype = np.float16 if "fp16" in Path(args.model).name else np.float32

    def new_case() -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    modes = [Mode(name, args.model, args.provider, shape) for name in MODES]
    cold = {}
    for mode in modes:
        started = time.perf_counter()
        mode.explainer.explain(new_case(), "kwc", args.layers, variant=args.variant)
        cold[mode.name] = mode.load_seconds + time.perf_counter() - started
    for _ in range(args.repeats):
        case = new_case()
        for mode in modes:
            run_round(mode, recorder, case, args)

    explainer = modes[0].explainer
    full_seconds = _forward_seconds(explainer, shape, new_case())
    report: dict = {
        "model": Path(args.model).name,
        "input_shape": list(shape),
        "variant": args.variant,
        "repeats": args.repeats,
        "full_pass_seconds": round(full_seconds, 5),
    }
    for mode in modes:
        result = mode.result
        macs = multiply_adds(mode.explainer, shape, result, args.variant)
        rate = macs["full_pass"] / full_seconds
        total = statistics.median(mode.totals)
        floor = statistics.median(mode.floors)
        ratios = [t / f for t, f in zip(mode.totals, mode.floors, strict=True)]
        report[mode.name] = {
            "layers": len(result.layers),
            "kernels": [len(layer.weights) for layer in result.layers],
            "forward_passes": result.forward_passes,
            "session_runs": result.session_runs,
            "graphs": sorted({r.graph for r in result.runs if r.purpose == "ablation"}),
            "cold_start_seconds": round(cold[mode.name], 4),
            "total_seconds": round(total, 5),
            "floor_seconds": round(floor, 5),
            "ratio_total_over_floor": round(statistics.median(ratios), 3),
            "ratio_best_rounds": round(min(mode.totals) / min(mode.floors), 3),
            "multiply_adds": macs,
            "mac_limit_seconds": round(macs["ran"] / rate, 5),
            "ratio_total_over_mac_limit": round(total / (macs["ran"] / rate), 3),
        }
    linear, suffix = report["linear"], report["suffix"]
    authors_seconds = linear["multiply_adds"]["passes"] * full_seconds
    report["authors_full_reruns_seconds"] = round(authors_seconds, 4)
    for index, other in ((1, "suffix"), (2, "wide"), (3, "serial")):
        report[f"linear_over_{other}"] = round(
            statistics.median(
                a / b for a, b in zip(modes[0].totals, modes[index].totals, strict=True)
            ),
            3,
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"KWC ({args.variant}) on {report['model']} {args.input_shape}, {linear['layers']} "
        f"decoder layers {linear['kernels']}, {linear['forward_passes']} forward passes, "
        f"median of {args.repeats} rounds"
    )
    wide, serial = report["wide"], report["serial"]
    header = (
        f"  {'':26}{'linear (default)':>18}{'wide':>12}{'serial':>12}{'suffix':>12}{'authors':>12}"
    )
    print(header)

    def row(label: str, *cells: str) -> None:
        widths = (18, 12, 12, 12, 12)[: len(cells)]
        print(f"  {label:26}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))

    columns = (linear, wide, serial, suffix)
    giga = {m: report[m]["multiply_adds"]["ran"] / 1e9 for m in MODES}
    authors_giga = linear["multiply_adds"]["authors"] / 1e9
    row(
        "multiply-adds (G)",
        *(f"{giga[m]:.1f}" for m in ("linear", "wide", "serial", "suffix")),
        f"{authors_giga:.1f}",
    )
    row("ORT runs", *(str(c["session_runs"]) for c in columns), str(linear["forward_passes"]))
    row("cold start (s)", *(f"{c['cold_start_seconds']:.3f}" for c in columns))
    row(
        "total, warm (s)",
        *(f"{c['total_seconds']:.3f}" for c in columns),
        f"{authors_seconds:.2f}",
    )
    row("floor, ORT replay (s)", *(f"{c['floor_seconds']:.3f}" for c in columns))
    row("total / floor", *(f"{c['ratio_total_over_floor']:.3f}x" for c in columns))
    row("MAC limit (s)", *(f"{c['mac_limit_seconds']:.3f}" for c in columns))
    row("total / MAC limit", *(f"{c['ratio_total_over_mac_limit']:.2f}x" for c in columns))
    print(
        f"  linear / suffix {report['linear_over_suffix']:.3f}x, linear / wide "
        f"{report['linear_over_wide']:.3f}x, linear / serial {report['linear_over_serial']:.3f}x "
        "(medians of per-round ratios); multiply-adds "
        f"{1 - giga['linear'] / giga['suffix']:.0%} fewer than the suffix's; the authors' "
        f"column is {linear['forward_passes']} full passes at {1000 * full_seconds:.1f} ms in "
        "ONNX Runtime"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: KWC over all decoder layers, total time against the ONNX Runtime floor.

The engine's job is to add nothing to the runs a method needs. This script explains one case
with KWC (P2 by default) through every decoder layer and compares, in the same process:

* total: wall time of ``Explainer.explain`` on a warm explainer (sessions already built, as in a
  validation pipeline that explains many cases), a new case each round so nothing is reused;
* floor: the very same ONNX Runtime calls replayed alone — every session run the explanation
  made (observation pass, suffix chunks), recorded with their feeds, then re-run back to back
  with ``session.run``: the time ORT itself needs for that work (mean of a replay just before
  and one just after each explanation);
* in-call: the time spent inside ORT's run calls during the explanation itself.

ratio = total / floor; the target is ≤ 1.15. The headline is the median of the per-round
ratios; the ratio of medians and of the best rounds are printed too. Cold-start cost (analysis,
rewrites, session creation) is printed separately.

It also counts the multiply-adds (``graph/cost.py``) of the work: every pass the explanation
ran, through the graph it ran on (the observation through the full model, each ablation
through its layer's suffix), against the authors' way, a full re-run of the model per
ablation; and the share of each suffix pass spent in the ablated tensor's first consumers,
which exact first-consumer linearity would run once per layer instead of once per pass (an
estimate until that path exists). ``MAC limit`` is the time those multiply-adds take at the
rate ONNX Runtime reaches on one pass of the full model.

Run from the repository root::

    python benchmarks/kwc.py                       # 2D fixture at 128×128, P2
    python benchmarks/kwc.py --input-shape 1x1x32x32 --variant p1 --json
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


from ort_replay import RunRecorder  # noqa: E402

from segattr_onnx import Explainer  # noqa: E402
from segattr_onnx.graph.cost import graph_macs, node_macs  # noqa: E402
from segattr_onnx.graph.index import GraphIndex  # noqa: E402
from segattr_onnx.graph.shapes import parse_shape  # noqa: E402
from segattr_onnx.runtime.providers import PROVIDER_CHOICES  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx"


def multiply_adds(explainer: Explainer, shape: tuple[int, ...], result, variant: str) -> dict:
    """Multiply-adds of the explanation's passes as it ran them, of the authors' full re-runs,
    and of the suffix passes less their first consumers (the linearity estimate)."""
    sized = explainer._for_shape(shape)
    analysis, ablation = sized.analysis, sized.engine.ablation
    full = graph_macs(analysis.model.proto, analysis.tensors)
    form = "block" if variant == "p2" else "raw"
    ran = linear = passes = 0
    for run in result.runs:
        passes += run.passes
        if run.graph == "linear" and run.layer is not None:  # rows formed after the readers
            ablated = ablation.ablated(run.layer, form)
            tail = ablated.linear
            index = GraphIndex(ablated.model.graph)
            readers = sum(
                node_macs(node, index, ablated.infos)
                for node in ablated.model.graph.node
                if node.name in {read.node for read in tail.reads}
            )
            tail_macs = graph_macs(tail.tail.model, ablated.infos)
            ran += run.passes * tail_macs + 2 * readers  # Y(1) and the grouped contributions
            linear += run.passes * tail_macs + 2 * readers
            continue
        if run.graph != "suffix" or run.layer is None:
            ran += run.passes * full
            linear += run.passes * full
            continue
        ablated = ablation.ablated(run.layer, form)
        suffix = ablated.suffix.model
        macs = graph_macs(suffix, ablated.infos)
        first = _first_consumer_macs(suffix, ablated.site.mask_input, ablated.infos)
        ran += run.passes * macs
        linear += run.passes * (macs - first) + first  # the contributions: one grouped pass
    return {"full_pass": full, "passes": passes, "ran": ran, "authors": passes * full,
            "with_linearity_estimate": linear}  # fmt: skip


def _first_consumer_macs(suffix, mask_input: str, infos) -> int:
    """Multiply-adds of the convolutions that read the masked tensor, directly or through a
    Concat (a U-Net's skip join), when every reader is one: what linearity would take out of
    each pass. 0 when some reader is not linear in it (a normalisation, an activation)."""
    index = GraphIndex(suffix.graph)
    masked = [o for i in index.consumers.get(mask_input, []) for o in index.nodes[i].output]
    readers = [i for name in masked for i in index.consumers.get(name, [])]
    total = 0
    for position in readers:
        node = index.nodes[position]
        targets = [position]
        if node.op_type == "Concat":
            targets = [i for o in node.output for i in index.consumers.get(o, [])]
        for target in targets:
            if index.nodes[target].op_type not in ("Conv", "ConvTranspose"):
                return 0
            total += node_macs(index.nodes[target], index, infos)
    return total


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--input-shape", default="1x1x128x128")
    parser.add_argument("--variant", choices=("p1", "p2"), default="p2")
    parser.add_argument("--layers", default="decoder")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--linearity",
        action="store_true",
        help="start eligible rows after each layer's linear readers (opt-in, issue 17)",
    )
    args = parser.parse_args(argv)

    shape = parse_shape(args.input_shape)
    recorder = RunRecorder()
    recorder.install()
    started = time.perf_counter()
    explainer = Explainer(args.model, provider=args.provider)
    if args.linearity:
        explainer._for_shape(shape).engine.ablation.use_linearity = True
    rng = np.random.default_rng(0)
    dtype = np.float16 if "fp16" in Path(args.model).name else np.float32

    def new_case() -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    first = explainer.explain(new_case(), "kwc", args.layers, variant=args.variant)
    cold = time.perf_counter() - started

    totals, floors, in_calls = [], [], []
    previous_calls: list = []
    for _ in range(args.repeats):
        # The floor of a round is the mean of a replay just before and one just after its
        # explanation (the previous round's calls cost the same: same graphs, same shapes), so
        # slow drifts of a shared machine hit both sides of the ratio alike.
        recorder.calls = previous_calls
        before = recorder.replay_seconds() if previous_calls else None
        recorder.calls = []
        recorder.in_call_seconds = 0.0
        recorder.recording = True
        started = time.perf_counter()
        result = explainer.explain(new_case(), "kwc", args.layers, variant=args.variant)
        totals.append(time.perf_counter() - started)
        recorder.recording = False
        in_calls.append(recorder.in_call_seconds)
        after = recorder.replay_seconds()
        floors.append(after if before is None else (before + after) / 2)
        if len(recorder.calls) != result.session_runs:
            raise SystemExit(
                f"recorded {len(recorder.calls)} ORT calls but the explanation reports "
                f"{result.session_runs}"
            )
        previous_calls = recorder.calls

    total, floor, in_call = (statistics.median(v) for v in (totals, floors, in_calls))
    # The least-disturbed round of each: on a shared machine noise only ever adds time.
    best_ratio = min(totals) / min(floors)
    median_round_ratio = statistics.median(t / f for t, f in zip(totals, floors, strict=True))
    report = {
        "model": Path(args.model).name,
        "input_shape": list(shape),
        "variant": args.variant,
        "layers": len(first.layers),
        "kernels": [len(layer.weights) for layer in first.layers],
        "forward_passes": first.forward_passes,
        "session_runs": first.session_runs,
        "provider": first.provider,
        "cold_start_seconds": round(cold, 4),
        "total_seconds": round(total, 5),
        "floor_seconds": round(floor, 5),
        "in_call_ort_seconds": round(in_call, 5),
        "ratio_total_over_floor": round(median_round_ratio, 3),
        "ratio_of_medians": round(total / floor, 3),
        "ratio_best_rounds": round(best_ratio, 3),
        "ratio_per_round": [round(t / f, 3) for t, f in zip(totals, floors, strict=True)],
        "target_ratio": 1.15,
    }
    macs = multiply_adds(explainer, shape, result, args.variant)
    rate = macs["full_pass"] / _forward_seconds(explainer, shape, new_case())
    report["multiply_adds"] = macs
    report["mac_limit_seconds"] = round(macs["ran"] / rate, 5)
    report["ratio_total_over_mac_limit"] = round(total / (macs["ran"] / rate), 3)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"KWC ({args.variant}) on {report['model']} {args.input_shape}, {report['layers']} "
        f"decoder layers {report['kernels']}, provider {report['provider']}"
    )
    print(f"  forward passes      {report['forward_passes']}  ({report['session_runs']} ORT runs)")
    print(f"  cold start          {cold:.3f} s  (analysis, rewrites, sessions; once per model)")
    print(f"  total (warm)        {total:.4f} s  median of {args.repeats}")
    print(f"  floor (ORT replay)  {floor:.4f} s")
    print(f"  ORT in-call         {in_call:.4f} s")
    print(
        f"  ratio total/floor   {median_round_ratio:.3f}x  median of round ratios (target <= 1.15x)"
    )
    print(f"  ratio of medians    {total / floor:.3f}x")
    print(f"  ratio, best rounds  {best_ratio:.3f}x  min(total) / min(floor)")
    print(f"  per-round ratios    {report['ratio_per_round']}")
    giga = {key: value / 1e9 for key, value in macs.items()}
    print(
        f"  multiply-adds       {giga['ran']:.2f} G as run ({macs['passes']} passes); "
        f"authors' full re-runs {giga['authors']:.2f} G ({macs['authors'] / macs['ran']:.2f}x); "
        f"with first-consumer linearity (estimate) {giga['with_linearity_estimate']:.2f} G "
        f"({1 - macs['with_linearity_estimate'] / macs['ran']:.0%} less)"
    )
    print(
        f"  MAC limit           {report['mac_limit_seconds']:.4f} s at one full pass's rate; "
        f"total/limit {report['ratio_total_over_mac_limit']:.3f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

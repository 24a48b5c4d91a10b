"""Benchmark: kernel ablation of each decoder layer, full re-runs vs suffix-only runs.

For every decoder (post-bottleneck) layer with C kernels, KWC runs 2·C masked predictions (the
P^-k masks, which drop kernel k, and the P^k masks, which keep only kernel k). This script
times that ablation twice in one process:

* full:   ``AblationRunner.ablate(..., use_suffix=False)``, the whole masked model re-run with
          the input tiled 2·C times;
* suffix: ``AblationRunner.prefix`` (one pass up to the layer, inside the timed region, since it
          is part of the real cost) followed by ``AblationRunner.ablate(..., prefix=...)``, which
          runs only the graph after the layer.

It prints, per layer and in total, the median times, the measured ratio full / suffix and the
ideal ratio from convolution MAC counts, (2C·F) / (F + 2C·S), with F the conv MACs of the whole
model and S those of the suffix graph (the +F is the prefix pass). Only Conv and ConvTranspose
MACs are counted; everything else (activations, Expand of skip tensors, host copies, session
overhead) is what separates the measured ratio from the ideal one.

Machines are shared and noisy, so each session is warmed up once (the correctness check, which
also compares both variants' outputs) and the two variants are interleaved (full, suffix, full,
suffix, ...) over ``--repeats`` rounds, reporting medians.

Run from the repository root::

    python benchmarks/ablation_suffix.py
    python benchmarks/ablation_suffix.py --json
    python benchmarks/ablation_suffix.py --model big.onnx --input-shape 1x1x256x256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from segattr_onnx.errors import SegattrError  # noqa: E402
from segattr_onnx.graph.catalogue import ModelAnalysis, analyse_model  # noqa: E402
from segattr_onnx.graph.shapes import TensorInfo, parse_shape  # noqa: E402
from segattr_onnx.runtime.ablation import AblationRunner  # noqa: E402
from segattr_onnx.runtime.providers import PROVIDER_CHOICES  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "tests" / "fixtures" / "models" / "unet2d_torchscript.onnx"
DEFAULT_SHAPE = "1x1x32x32"
MAC_OPS = ("Conv", "ConvTranspose")
ATOL = 1e-5
MAC_NOTE = (
    "MACs count Conv/ConvTranspose only; ideal = 2C*F / (F + 2C*S), "
    "F = whole-model conv MACs per item, S = suffix conv MACs per item, +F = prefix pass"
)


# --------------------------------------------------------------------------- MAC counts
def _item_size(info: TensorInfo | None) -> int | None:
    """Elements of one batch item (dim 0 skipped), or None when a dim is unknown."""
    if info is None or info.shape is None or len(info.shape) < 2:
        return None
    dims = info.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return int(np.prod(dims))


def conv_macs(
    nodes: list[onnx.NodeProto], analysis: ModelAnalysis, infos: dict[str, TensorInfo]
) -> int | None:
    """Multiply-accumulates of one batch item through the Conv/ConvTranspose ``nodes``.

    Conv: prod(output dims) · C_in/group · prod(kernel); ConvTranspose: prod(input dims) ·
    C_out/group · prod(kernel). Both factors are ``weight.dims[1] · prod(weight.dims[2:])``.
    None when a shape or weight is unknown.
    """
    total = 0
    for node in nodes:
        if node.op_type not in MAC_OPS:
            continue
        weight = analysis.index.constant_source(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) < 3:
            return None
        per_position = int(weight.dims[1]) * int(np.prod(weight.dims[2:]))
        tensor = node.output[0] if node.op_type == "Conv" else node.input[0]
        size = _item_size(infos.get(tensor))
        if size is None:
            return None
        total += size * per_position
    return total


def ideal_ratio(masks: int, full: int | None, suffix: int | None) -> float | None:
    if not full or suffix is None:
        return None
    return masks * full / (full + masks * suffix)


# --------------------------------------------------------------------------- timing
@dataclass
class LayerResult:
    name: str
    op: str
    kernels: int
    masks: int
    full_macs: int | None
    suffix_macs: int | None
    suffix_nodes: int
    full_times: list[float] = field(default_factory=list)
    suffix_times: list[float] = field(default_factory=list)
    max_abs_diff: float = 0.0
    outputs_match: bool = True

    @property
    def ideal(self) -> float | None:
        return ideal_ratio(self.masks, self.full_macs, self.suffix_macs)

    @property
    def full_s(self) -> float:
        return statistics.median(self.full_times)

    @property
    def suffix_s(self) -> float:
        return statistics.median(self.suffix_times)

    @property
    def ratio(self) -> float:
        return self.full_s / self.suffix_s


def kwc_masks(channels: int, dtype: np.dtype) -> np.ndarray:
    """The 2C KWC masks: row k removes kernel k (P^-k), row C+k keeps only kernel k (P^k)."""
    eye = np.eye(channels, dtype=dtype)
    return np.concatenate([1 - eye, eye], axis=0)


def run_full(runner: AblationRunner, x: np.ndarray, layer: str, masks: np.ndarray) -> None:
    for _ in runner.ablate(x, layer, masks, use_suffix=False):
        pass


def run_suffix(runner: AblationRunner, x: np.ndarray, layer: str, masks: np.ndarray) -> None:
    prefix = runner.prefix(x, layer)
    for _ in runner.ablate(x, layer, masks, prefix=prefix):
        pass


def collect(chunks) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        for name, value in chunk.outputs.items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


def check_and_warm(
    runner: AblationRunner, x: np.ndarray, result: LayerResult, masks: np.ndarray
) -> str | None:
    """One untimed run of each variant (builds and warms all three sessions); compare outputs."""
    full = collect(runner.ablate(x, result.name, masks, use_suffix=False))
    prefix = runner.prefix(x, result.name)
    suffix = collect(runner.ablate(x, result.name, masks, prefix=prefix))
    common = [name for name in suffix if name in full]
    if not common:
        result.outputs_match = False
        return f"WARNING: {result.name}: full and suffix runs share no output to compare"
    for name in common:
        a, b = full[name].astype(np.float64), suffix[name].astype(np.float64)
        if a.shape != b.shape:
            result.outputs_match = False
            return f"WARNING: {result.name}: output {name!r} shapes differ {a.shape} vs {b.shape}"
        result.max_abs_diff = max(result.max_abs_diff, float(np.max(np.abs(a - b), initial=0.0)))
        if not np.allclose(a, b, atol=ATOL):
            result.outputs_match = False
    if not result.outputs_match:
        return (
            f"WARNING: {result.name}: full and suffix outputs differ "
            f"(max |diff| {result.max_abs_diff:.3g} > atol {ATOL:g})"
        )
    return None


def make_input(analysis: ModelAnalysis, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(analysis.input.dtype)
    shape = analysis.input.shape
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def session_provider(runner: AblationRunner, layer: str) -> str:
    """The first provider of the (already cached) full-model session of ``layer``."""
    ablated = runner.ablated(layer)
    session = runner.sessions.get(("full", layer, "block"), lambda: ablated.model)
    return session.get_providers()[0]


def benchmark(args: argparse.Namespace) -> dict:
    analysis = analyse_model(args.model, input_shape=parse_shape(args.input_shape))
    runner = AblationRunner(analysis, provider=args.provider)
    x = make_input(analysis, args.seed)
    full_macs = conv_macs(list(analysis.model.proto.graph.node), analysis, analysis.tensors)
    mask_dtype = np.dtype(np.float32)

    results: list[LayerResult] = []
    plans: list[tuple[LayerResult, np.ndarray]] = []
    warnings_out: list[str] = []
    for name in analysis.post_bottleneck:
        layer = analysis.layer(name)
        ablated = runner.ablated(name)
        suffix = ablated.suffix
        masks = kwc_masks(layer.kernels, mask_dtype)
        result = LayerResult(
            name=name,
            op=layer.op,
            kernels=layer.kernels,
            masks=len(masks),
            full_macs=conv_macs(list(ablated.model.graph.node), analysis, ablated.infos),
            suffix_macs=conv_macs(list(suffix.model.graph.node), analysis, ablated.infos),
            suffix_nodes=suffix.node_count,
        )
        warning = check_and_warm(runner, x, result, masks)
        if warning:
            warnings_out.append(warning)
        results.append(result)
        plans.append((result, masks))
    if not results:
        raise SystemExit(f"{analysis.model.display_name} has no decoder (post-bottleneck) layers")
    provider_used = session_provider(runner, results[0].name)

    total_full: list[float] = []
    total_suffix: list[float] = []
    for _ in range(args.repeats):
        round_full = round_suffix = 0.0
        for result, masks in plans:
            start = time.perf_counter()
            run_full(runner, x, result.name, masks)
            middle = time.perf_counter()
            run_suffix(runner, x, result.name, masks)
            end = time.perf_counter()
            result.full_times.append(middle - start)
            result.suffix_times.append(end - middle)
            round_full += middle - start
            round_suffix += end - middle
        total_full.append(round_full)
        total_suffix.append(round_suffix)

    rows = [
        {
            "layer": r.name,
            "op": r.op,
            "kernels": r.kernels,
            "masks": r.masks,
            "suffix_nodes": r.suffix_nodes,
            "full_macs_per_item": r.full_macs,
            "suffix_macs_per_item": r.suffix_macs,
            "full_ms": r.full_s * 1e3,
            "suffix_ms": r.suffix_s * 1e3,
            "ratio": r.ratio,
            "ideal_ratio": r.ideal,
            "full_ms_runs": [t * 1e3 for t in r.full_times],
            "suffix_ms_runs": [t * 1e3 for t in r.suffix_times],
            "max_abs_diff": r.max_abs_diff,
            "outputs_match": r.outputs_match,
        }
        for r in results
    ]
    known = all(r.full_macs is not None and r.suffix_macs is not None for r in results)
    ideal_total = None
    if known and full_macs:
        work_full = sum(r.masks * r.full_macs for r in results)  # type: ignore[operator]
        work_suffix = sum(r.full_macs + r.masks * r.suffix_macs for r in results)  # type: ignore[operator]
        ideal_total = work_full / work_suffix
    full_ms, suffix_ms = statistics.median(total_full) * 1e3, statistics.median(total_suffix) * 1e3
    total = {
        "layer": "TOTAL",
        "kernels": sum(r.kernels for r in results),
        "masks": sum(r.masks for r in results),
        "full_ms": full_ms,
        "suffix_ms": suffix_ms,
        "ratio": full_ms / suffix_ms,
        "ideal_ratio": ideal_total,
        "outputs_match": all(r.outputs_match for r in results),
    }
    return {
        "onnxruntime": ort.__version__,
        "provider_requested": args.provider,
        "provider": provider_used,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "model": analysis.model.display_name,
        "input_shape": list(analysis.input.shape),
        "repeats": args.repeats,
        "statistic": "median",
        "model_conv_macs_per_item": full_macs,
        "note": MAC_NOTE,
        "layers": rows,
        "total": total,
        "warnings": warnings_out,
    }


# --------------------------------------------------------------------------- output
def _fmt_macs(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_table(report: dict) -> None:
    cpus = report["cpu_count"]
    usable = report["cpus_usable"]
    cpu_text = f"{cpus}" if usable in (None, cpus) else f"{cpus} ({usable} usable)"
    print(
        f"onnxruntime {report['onnxruntime']} | provider {report['provider']} "
        f"(requested {report['provider_requested']}) | CPUs {cpu_text} | "
        f"model {report['model']} | input {'x'.join(map(str, report['input_shape']))}"
    )
    print(
        f"median of {report['repeats']} interleaved rounds; full = whole masked model re-run, "
        "suffix = prefix pass + suffix-only runs"
    )
    header = (
        "layer",
        "op",
        "C",
        "masks",
        "sfx nodes",
        "full MMAC",
        "sfx MMAC",
        "full ms",
        "suffix ms",
        "ratio",
        "ideal",
        "ok",
    )
    lines = [
        (
            row["layer"],
            row["op"],
            str(row["kernels"]),
            str(row["masks"]),
            str(row["suffix_nodes"]),
            _fmt_macs(row["full_macs_per_item"]),
            _fmt_macs(row["suffix_macs_per_item"]),
            f"{row['full_ms']:.2f}",
            f"{row['suffix_ms']:.2f}",
            _fmt_ratio(row["ratio"]),
            _fmt_ratio(row["ideal_ratio"]),
            "yes" if row["outputs_match"] else "NO",
        )
        for row in report["layers"]
    ]
    total = report["total"]
    lines.append(
        (
            "TOTAL",
            "",
            str(total["kernels"]),
            str(total["masks"]),
            "",
            "",
            "",
            f"{total['full_ms']:.2f}",
            f"{total['suffix_ms']:.2f}",
            _fmt_ratio(total["ratio"]),
            _fmt_ratio(total["ideal_ratio"]),
            "yes" if total["outputs_match"] else "NO",
        )
    )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def render(cells) -> str:
        parts = [str(cells[0]).ljust(widths[0]), str(cells[1]).ljust(widths[1])]
        parts += [str(c).rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(parts)

    print(render(header))
    print("  ".join("-" * w for w in widths))
    for line in lines[:-1]:
        print(render(line))
    print("  ".join("-" * w for w in widths))
    print(render(lines[-1]))
    print(f"MMAC = million MACs per batch item; {report['note']}")
    for warning in report["warnings"]:
        print(warning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time KWC kernel ablation of decoder layers: full re-runs vs suffix-only."
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="ONNX model to ablate")
    parser.add_argument(
        "--input-shape",
        default=DEFAULT_SHAPE,
        help=f"input shape, e.g. 1x1x256x256 (default {DEFAULT_SHAPE})",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median; default 5)")
    parser.add_argument("--provider", choices=PROVIDER_CHOICES, default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except SegattrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

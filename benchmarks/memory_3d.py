"""Benchmark: peak memory and time of KWC on the 3D U-Net at 128³, under a memory budget.

A 3D volume at 128³ is where memory decides whether an explanation runs at all: one batch item
of the decoder's suffix graphs takes hundreds of MB, and KWC (P2) through the decoder's 168
kernels is 336 suffix passes. The budget (``--memory-budget``, default a share of free memory)
sets how many masks share a run; this script checks that the whole explanation stays within
the machine, and reports:

* wall time of ``Explainer.explain`` (cold: analysis and session creation included, as for a
  single case on the command line) and of the whole worker process;
* forward passes and ONNX Runtime runs, and the batch chosen for each layer;
* peak RSS of the worker (VmHWM, and ru_maxrss), which holds nothing but the explanation;
* the budget used, in bytes, and the machine's free memory when the worker started.

The model is the benchmark U-Net of ``unet.py`` (3D; ``--widths`` overrides its channel widths,
e.g. 8,16,32,64 for the 168-kernel decoder), exported to a temporary folder; the explanation
runs in a fresh worker process so its peak RSS is its own (torch, used for the export, stays in
the parent).

Run from the repository root (needs torch for the export)::

    python benchmarks/memory_3d.py                          # 128³, default budget
    python benchmarks/memory_3d.py --widths 8,16,32,64      # the wider U-Net
    python benchmarks/memory_3d.py --size 64 --memory-budget 2G --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

import onnxruntime as ort  # noqa: E402

from segattr_onnx.errors import SegattrError  # noqa: E402
from segattr_onnx.runtime.budget import parse_memory_budget  # noqa: E402
from segattr_onnx.runtime.chunks import available_memory_bytes  # noqa: E402

MIB = 1 << 20


def _status_bytes(key: str) -> int | None:
    """A size line of /proc/self/status (VmHWM, VmRSS), in bytes; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker(model: str, case: str, budget_text: str | None, provider: str, variant: str) -> dict:
    """Explain one case in this (fresh) process and measure it; torch is never imported here."""
    started = time.perf_counter()
    from segattr_onnx import Explainer
    from segattr_onnx.runtime.chunks import default_memory_budget

    free_at_start = available_memory_bytes()
    budget = parse_memory_budget(budget_text).resolve() if budget_text is not None else None
    explainer = Explainer(model, provider=provider, memory_budget=budget)
    x = np.load(case)
    # What the explainer will snapshot for the default: the same call, a moment earlier.
    used = budget if budget is not None else default_memory_budget()
    explain_started = time.perf_counter()
    explanation = explainer.explain(x, "kwc", "decoder", variant=variant)
    explain_seconds = time.perf_counter() - explain_started
    ablations = [r for r in explanation.runs if r.purpose == "ablation"]
    kernels = sum(len(layer.weights) for layer in explanation.layers)
    return {
        "size": list(x.shape[2:]),
        "provider": explanation.provider,
        "variant": variant,
        "layers": len(explanation.layers),
        "kernels": kernels,
        "explain_seconds": round(explain_seconds, 2),
        "worker_seconds": round(time.perf_counter() - started, 2),
        "forward_passes": explanation.forward_passes,
        "session_runs": explanation.session_runs,
        "suffix_passes": sum(r.passes for r in ablations),
        "batches": [
            {"layer": r.layer, "passes": r.passes, "runs": r.session_runs, "batch": r.batch_size}
            for r in ablations
        ],
        "budget_bytes": used,
        "budget": budget_text or "default",
        "free_bytes_at_start": free_at_start,
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "map_range": [float(explanation.map.min()), float(explanation.map.max())],
    }


def run(
    size: int,
    budget_text: str | None,
    provider: str,
    variant: str,
    widths: tuple[int, ...] | None = None,
) -> dict:
    """Export the 3D U-Net and a case to a temporary folder; explain them in a fresh worker."""
    sys.path.insert(0, str(BENCHMARKS))
    import unet
    from unet import export_onnx, make_case, make_unet

    if widths is not None:
        # make_unet builds UNet(dims), which reads its widths from this table when it is built.
        unet.WIDTHS = {**unet.WIDTHS, 3: widths}
    with tempfile.TemporaryDirectory(prefix="segattr-memory-3d-") as folder:
        model = export_onnx(make_unet(3), 3, Path(folder) / "unet3d.onnx")
        case = Path(folder) / f"case{size}.npy"
        np.save(case, make_case(3, size).numpy())
        command = [sys.executable, __file__, "--worker", str(model), str(case)]
        command += ["--provider", provider, "--variant", variant]
        if budget_text is not None:
            command += ["--memory-budget", budget_text]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["widths"] = list(unet.WIDTHS[3])
    report["machine"] = {
        "cpus": os.cpu_count(),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
    }
    return report


def format_report(report: dict) -> str:
    size = "x".join(map(str, report["size"]))
    machine = report["machine"]
    lines = [
        f"KWC ({report['variant']}) on the 3D U-Net (widths {report['widths']}) at {size}, "
        f"{report['provider']}, "
        f"{machine['cpus']} CPUs, {machine['memory_total_bytes'] / 2**30:.1f} GiB, "
        f"onnxruntime {machine['onnxruntime']}",
        f"budget: {report['budget']} = {report['budget_bytes'] / MIB:.0f} MiB "
        f"(free at start {report['free_bytes_at_start'] / MIB:.0f} MiB)",
        f"time: {report['explain_seconds']:.1f} s explain (cold), "
        f"{report['worker_seconds']:.1f} s worker",
        f"passes: {report['forward_passes']} forward passes ({report['suffix_passes']} through "
        f"suffixes, {report['kernels']} kernels in {report['layers']} layers), "
        f"{report['session_runs']} ONNX Runtime runs",
        f"peak RSS: {report['peak_rss_bytes'] / MIB:.0f} MiB (VmHWM), "
        f"{report['ru_maxrss_bytes'] / MIB:.0f} MiB (ru_maxrss)",
        "",
        f"{'layer':45} {'passes':>6} {'runs':>5} {'batch':>5}",
    ]
    for row in report["batches"]:
        lines.append(
            f"{row['layer'][:45]:45} {row['passes']:>6} {row['runs']:>5} {row['batch']:>5}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="side of the cube (default 128)")
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="as segattr explain takes it: 4G, 512M, bytes, 0.3 or 30%% of free memory "
        "(default: segattr's default)",
    )
    parser.add_argument(
        "--widths",
        default=None,
        help="channel widths of the U-Net's levels, e.g. 8,16,32,64 (default: unet.py's)",
    )
    parser.add_argument("--provider", default="cpu", help="ONNX Runtime provider (default cpu)")
    parser.add_argument("--variant", default="p2", choices=("p1", "p2"))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_budget is not None:
        try:
            parse_memory_budget(args.memory_budget)  # fail before the export, not after
        except SegattrError as exc:
            parser.error(str(exc))
    if args.worker:
        report = worker(*args.worker, args.memory_budget, args.provider, args.variant)
        print(json.dumps(report))
        return
    if args.size < 16 or args.size % 8:
        parser.error("--size must be a multiple of 8, at least 16 (the U-Net pools 3 times)")
    widths = None
    if args.widths is not None:
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            parser.error(f"--widths {args.widths!r} is not a list of integers like 8,16,32,64")
    report = run(args.size, args.memory_budget, args.provider, args.variant, widths)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


if __name__ == "__main__":
    main()

"""Benchmark: does ``--memory-budget`` bound the whole process? KWC on a 15-layer decoder.

The model is the benchmark U-Net of ``unet.py`` made wide and deep (channel widths 12 to 384:
15 decoder layers, 1 116 kernels), the kind of decoder on which a 6 GB budget once peaked at
16 GB. For each input size, KWC (P2) over the whole decoder runs in a fresh worker process:

* once without a budget (batches sized from a quarter of free memory): the baseline;
* once per budget given (default 1G and 2G).

Each worker reports its peak resident memory (VmHWM: interpreter, model, rewritten graphs,
sessions, arenas, everything), the footprint it held when the first batch was sized, its time
and its session runs. The table prints peak / budget (must stay at or under 1, or under the
footprint when that alone is over the budget) and the time over the unbudgeted run of the same
size, measured in the same invocation.

Run from the repository root (needs torch for the export)::

    python benchmarks/memory_budget.py                        # 256² and 384², 1G and 2G
    python benchmarks/memory_budget.py --sizes 256 --budgets 600M 1G --json out.json
    python benchmarks/memory_budget.py --fixtures --budgets 2G    # every test fixture
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

WIDTHS = (12, 24, 48, 96, 192, 384)
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "models"
MIB = 1 << 20


def _status_bytes(key: str) -> int | None:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return None


def worker(model: str, case: str, budget_text: str | None) -> dict:
    """One explanation in this fresh process (torch is never imported here)."""
    from segattr_onnx import Explainer
    from segattr_onnx.runtime import chunks
    from segattr_onnx.runtime.budget import parse_memory_budget
    from segattr_onnx.runtime.memory import resident_bytes

    budget = parse_memory_budget(budget_text).resolve() if budget_text else None
    footprint: list[int] = []
    original = chunks.room_for_runs

    def room_for_runs(process_budget: int) -> int | None:
        if not footprint:  # what the process held when the first batch was sized
            footprint.append(resident_bytes() or 0)
        return original(process_budget)

    chunks.room_for_runs = room_for_runs
    explainer = Explainer(model, provider="cpu", memory_budget=budget)
    x = np.load(case)
    started = time.perf_counter()
    explanation = explainer.explain(x, "kwc", "decoder")
    seconds = time.perf_counter() - started
    return {
        "budget": budget_text or "none",
        "budget_bytes": budget,
        "seconds": round(seconds, 2),
        "session_runs": explanation.session_runs,
        "forward_passes": explanation.forward_passes,
        "kernels": sum(len(layer.weights) for layer in explanation.layers),
        "layers": len(explanation.layers),
        "peak_bytes": _status_bytes("VmHWM"),
        "footprint_bytes": footprint[0] if footprint else None,
    }


def fixture_rows(budgets: list[str]) -> list[dict]:
    """KWC on every test fixture (free sizes at 256²), without a budget and under each one."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="segattr-budget-fx-") as tmp:
        for name, spec in sorted(manifest.items()):
            # Free spatial sizes at 256 (3D: 64), so the runs are big enough to measure.
            free = 64 if len(spec["test_shape"]) == 5 else 256
            shape = [
                size if isinstance(declared, int) or position < 2 else free
                for position, (declared, size) in enumerate(
                    zip(spec["input_shape"], spec["test_shape"], strict=True)
                )
            ]
            shape[0] = 1
            case = Path(tmp) / f"{name}.npy"
            dtype = np.float16 if spec["dtype"] == "float16" else np.float32
            np.save(case, np.random.default_rng(0).standard_normal(shape).astype(dtype))
            baseline = None
            for budget in [None, *budgets]:
                row = spawn(FIXTURES / spec["file"], case, budget)
                baseline = baseline or row["seconds"]
                row["time_ratio"] = row["seconds"] / baseline
                rows.append({"size": f"{name} {'x'.join(map(str, shape))}", **row})
    return rows


def prepare(workdir: Path, sizes: list[int]) -> Path:
    import unet

    unet.WIDTHS = {**unet.WIDTHS, 2: WIDTHS}
    model = workdir / "unet15.onnx"
    unet.export_onnx(unet.make_unet(2), 2, model)
    for size in sizes:
        np.save(workdir / f"x{size}.npy", unet.make_case(2, size).numpy())
    return model


def spawn(model: Path, case: Path, budget: str | None) -> dict:
    command = [sys.executable, __file__, "--worker", str(model), str(case), budget or ""]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({budget}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size(size: int | str) -> str:
    return f"{size}²" if isinstance(size, int) else size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--budgets", nargs="+", default=["1G", "2G"])
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument(
        "--fixtures", action="store_true", help="the test fixtures instead of the wide U-Net"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, case, budget = args.worker
        print(json.dumps(worker(model, case, budget or None)))
        return 0

    rows = fixture_rows(args.budgets) if args.fixtures else []
    with tempfile.TemporaryDirectory(prefix="segattr-budget-") as tmp:
        workdir = Path(tmp)
        model = prepare(workdir, args.sizes) if not args.fixtures else None
        for size in [] if args.fixtures else args.sizes:
            case = workdir / f"x{size}.npy"
            baseline = spawn(model, case, None)
            rows.append({"size": size, **baseline})
            for budget in args.budgets:
                rows.append({"size": size, **spawn(model, case, budget)})
                rows[-1]["time_ratio"] = rows[-1]["seconds"] / baseline["seconds"]
            print(f"{size}²: done", file=sys.stderr, flush=True)
    print(
        "| size | budget | peak (MiB) | peak / budget | footprint (MiB) | seconds | "
        "time / unbudgeted | session runs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        budget = row["budget_bytes"]
        ratio = f"{row['peak_bytes'] / budget:.2f}" if budget else ""
        footprint = f"{row['footprint_bytes'] / MIB:.0f}" if row["footprint_bytes"] else ""
        print(
            f"| {_size(row['size'])} | {row['budget']} | {row['peak_bytes'] / MIB:.0f} | {ratio} | "
            f"{footprint} | {row['seconds']} | {row.get('time_ratio', 1.0):.2f} | "
            f"{row['session_runs']} |"
        )
    if not args.fixtures:
        print(f"model: benchmark U-Net, widths {WIDTHS}, {rows[0]['layers']} decoder layers, ")
        print(f"{rows[0]['kernels']} kernels; KWC P2 on the CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

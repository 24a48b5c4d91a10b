"""Benchmark: how long the CLI and the package take to start (issue 17's ≤ 0.5 s goal).

Each probe runs as a fresh interpreter ``--runs`` times, interleaved with the others so a
shared machine's drifts hit them alike; the medians are printed with their ratio to a bare
``python -c pass`` measured in the same invocation. The 0.5 s goal is for ``import segattr_onnx``
(also reported as ``-X importtime``'s own cumulative figure, which leaves out the interpreter's
start) and for ``segattr --help``. The heavy imports of an explanation (onnx, ONNX Runtime,
ml_dtypes, which onnx imports) are shown for reference: they are paid by the commands that
build sessions, not by the start.

Run from the repository root::

    python benchmarks/startup.py --runs 15
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time

from cli_process import compile_package_bytecode, segattr_command

GOAL_SECONDS = 0.5


PROBES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import segattr_onnx": [sys.executable, "-c", "import segattr_onnx"],
    "segattr --help": [*segattr_command(), "--help"],
    "import segattr_onnx.cli": [sys.executable, "-c", "import segattr_onnx.cli"],
    "import onnx": [sys.executable, "-c", "import onnx"],
    "import onnxruntime": [sys.executable, "-c", "import onnxruntime"],
    "import ml_dtypes": [sys.executable, "-c", "import ml_dtypes"],
}


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def importtime_seconds(module: str) -> float:
    """``-X importtime``'s cumulative microseconds for ``module`` itself."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
    )
    pattern = re.compile(rf"\|\s*(\d+)\s*\|\s*{re.escape(module)}\s*$")
    for line in completed.stderr.splitlines():
        match = pattern.search(line)
        if match:
            return int(match.group(1)) / 1e6
    raise SystemExit(f"no importtime line for {module}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    compile_package_bytecode()  # as pip install does: time the start, not the compiler
    times: dict[str, list[float]] = {name: [] for name in PROBES}
    importtime: list[float] = []
    for _ in range(args.runs):
        for name, command in PROBES.items():
            times[name].append(wall_seconds(command))
        importtime.append(importtime_seconds("segattr_onnx"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["python -c pass"]
    report = {
        "runs": args.runs,
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_bare_python": {k: round(v / baseline, 2) for k, v in medians.items()},
        "importtime_segattr_onnx_seconds": round(statistics.median(importtime), 4),
        "goal_seconds": GOAL_SECONDS,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"median of {args.runs} fresh interpreters each (goal: <= {GOAL_SECONDS} s)")
    for name, value in medians.items():
        verdict = ""
        if name in ("import segattr_onnx", "segattr --help"):
            verdict = "  ok" if value <= GOAL_SECONDS else "  OVER"
        print(f"  {name:26} {value:7.3f} s  {value / baseline:5.1f}x bare python{verdict}")
    print(f"  -X importtime segattr_onnx {report['importtime_segattr_onnx_seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

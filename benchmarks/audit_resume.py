"""Benchmark: a 200-case audit, resumed after one case changed, re-runs exactly that case.

Builds 200 synthetic cases (``segattr synth`` data, 64², with labels) for the bundled model,
runs ``segattr audit`` three times as a CI pipeline would, and prints what each run says it
computed and reused, and how long it took:

1. a first run: every case × method computed;
2. one case file replaced by another valid case, then ``--resume``: only that case's runs
   computed, every other one reused (their files and settings are unchanged);
3. the same without ``--resume``: everything computed afresh (a gate's verdict must come
   from the run that reports it, unless the user asks otherwise).

Run from the repository root::

    python benchmarks/audit_resume.py                  # 200 cases, Grad-CAM
    python benchmarks/audit_resume.py --cases 50 --methods gradcam kwc
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))

from segattr_onnx.bundled import example_model_path  # noqa: E402
from segattr_onnx.synthetic import make_case, save_case  # noqa: E402

SUMMARY = re.compile(r"\((\d+) case runs computed, (\d+) reused\)")


def audit(config: Path, *extra: str) -> tuple[int, int, float, int]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", "audit", str(config), "--quiet", *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    match = SUMMARY.search(done.stdout)
    if match is None:
        raise SystemExit(f"audit printed no summary (exit {done.returncode}):\n{done.stderr}")
    return int(match.group(1)), int(match.group(2)), seconds, done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--methods", nargs="+", default=["gradcam"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="segattr-resume-") as tmp:
        folder = Path(tmp)
        (folder / "cases").mkdir()
        for index in range(args.cases):
            save_case(
                make_case(90_000 + index, dim=2, size=64), folder / "cases" / f"c{index:03d}.npz"
            )
        config = folder / "audit.toml"
        config.write_text(
            "\n".join(
                [
                    f'model = "{example_model_path()}"',
                    f"methods = {json.dumps(args.methods)}",
                    'layers = "last"',
                    'provider = "cpu"',
                    'checks = ["prediction_preserved >= 0"]',
                    "",
                    "[[cases]]",
                    'input = "cases/*.npz"',
                    'labels = "same"',
                ]
            )
        )
        runs = len(args.methods) * args.cases
        rows = [("first run", *audit(config))]
        # One case replaced by a different valid case (same name, other content).
        save_case(make_case(99_999, dim=2, size=64), folder / "cases" / "c007.npz", force=True)
        rows.append(("one case changed, --resume", *audit(config, "--resume")))
        rows.append(("same, without --resume", *audit(config)))
    print(f"{args.cases} cases × {len(args.methods)} method(s) = {runs} case runs")
    print("| run | computed | reused | seconds | exit |")
    print("|---|---|---|---|---|")
    for name, computed, reused, seconds, code in rows:
        print(f"| {name} | {computed} | {reused} | {seconds:.1f} | {code} |")
    expected = [(runs, 0), (len(args.methods), runs - len(args.methods)), (runs, 0)]
    ok = [(row[1], row[2]) for row in rows] == expected
    print("as expected" if ok else f"NOT as expected: {expected}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

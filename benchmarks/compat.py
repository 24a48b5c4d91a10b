"""The compatibility table: every fixture model, every method, default layers and ``last``.

Each cell is one real ``segattr explain`` run in its own process, as a user would type it, on
a seeded random input of the fixture's test shape. A run counts as ``ok`` when it exits 0 and
writes a finite map that is not constant; otherwise the cell shows the exit code and the first
line of the error. The table (Markdown) goes to stdout, or into ``docs/compatibility.md``
between its generated-table markers with ``--write``.

    python benchmarks/compat.py [--write] [--only NAME[,NAME]] [--methods kwc,gradcam]

The ``export`` column writes ``segattr export --method gradcam`` and runs it with plain ONNX
Runtime; ``ok`` there means its ``saliency`` equals the Grad-CAM column's map within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_SETS = {
    "families": REPO_ROOT / "tests" / "fixtures" / "families",
    "unets": REPO_ROOT / "tests" / "fixtures" / "models",
}
METHODS = (
    "kwc",
    "ablationcam",
    "scorecam",
    "gradcam",
    "gradcampp",
    "layercam",
    "hirescam",
    "integrated_gradients",
    "smoothgrad",
    "gradient_input",
    "export",
)
LAYER_SPECS = ("decoder", "last")
# Methods of the input's gradient: no layers, so one column each.
INPUT_METHODS = {"integrated_gradients", "smoothgrad", "gradient_input"}
# `segattr export --method gradcam`, run by onnxruntime and compared with explain's map.
EXPORT_TOLERANCE = 1e-5
DOC = REPO_ROOT / "docs" / "compatibility.md"
BEGIN, END = "<!-- compat:begin -->", "<!-- compat:end -->"


def fixtures(only: set[str] | None) -> list[dict]:
    """Every fixture of both manifests, with its path, family and exporter."""
    found = []
    for kind, folder in FIXTURE_SETS.items():
        manifest = folder / "manifest.json"
        if not manifest.exists():
            continue
        for name, spec in sorted(json.loads(manifest.read_text())["fixtures"].items()):
            if only and name not in only:
                continue
            found.append(
                {
                    "name": name,
                    "path": folder / spec["file"],
                    "family": spec.get("family", "unet" if kind == "unets" else "?"),
                    "exporter": spec.get("exporter", "?"),
                    "layout": spec.get("layout", "?"),
                    "dtype": spec.get("dtype", "float32"),
                    "shape": spec["test_shape"],
                    "output": spec.get("target_output"),
                }
            )
    return found


def _segattr(*args: str) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - started


def _first_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    line = lines[0] if lines else (stderr.strip().splitlines() or ["?"])[-1]
    return line.replace("|", "/")[:140]


def inspect_row(fx: dict) -> dict:
    shape = "x".join(map(str, fx["shape"]))
    args = ["inspect", str(fx["path"]), "--input-shape", shape, "--json", "--provider", "cpu"]
    code, out, err, _ = _segattr(*args)
    if code != 0:
        return {"rule": f"inspect failed: {_first_error(err)}"}
    data = json.loads(out)
    grouping = data["grouping"]
    if fx["output"]:
        grouping = next(g for g in data["groupings"] if g["output"] == fx["output"])
    return {
        "rule": grouping["rule"],
        "layers": len(data["layers"]),
        "post": len(grouping["post_bottleneck"]),
        "bottleneck": len(grouping["bottleneck"]),
    }


def _specs(method: str) -> tuple[str, ...]:
    return ("input",) if method in INPUT_METHODS else LAYER_SPECS


def explain_cell(fx: dict, method: str, layers: str, work: Path, x_path: Path) -> str:
    if method == "export":
        return export_cell(fx, layers, work, x_path)
    out = work / f"{fx['name']}_{method}_{layers}.npy"
    args = ["explain", str(fx["path"]), str(x_path), "--out", str(out), "--method", method]
    if layers != "input":
        args += ["--layers", layers]
    args += ["--provider", "cpu", "--quiet", "--force", "--json"]
    if fx["output"]:
        args += ["--output-name", fx["output"]]
    code, stdout, stderr, seconds = _segattr(*args)
    if code != 0:
        return f"exit {code}: {_first_error(stderr)}"
    result = np.load(out)
    if not np.all(np.isfinite(result)):
        return "non-finite map"
    if float(result.max() - result.min()) <= 0:
        # Grad-CAM's map is 0 where every layer's gradient cancels (docs/algorithms.md §4.2).
        return "zero map (gradients cancel)" if method == "gradcam" else "constant map"
    inner = json.loads(stdout)["seconds"]
    return f"ok {inner:.2f} s ({seconds:.1f} s)"


def export_cell(fx: dict, layers: str, work: Path, x_path: Path) -> str:
    """`segattr export --method gradcam`, its `saliency` run by plain onnxruntime (NCHWc
    transform off, as docs/export.md says) against the map of `segattr explain`."""
    import onnxruntime as ort

    shape = "x".join(map(str, fx["shape"]))
    exported = work / f"{fx['name']}_{layers}.xai.onnx"
    args = ["export", str(fx["path"]), "--out", str(exported), "--layers", layers]
    args += ["--input-shape", shape, "--force"]
    if fx["output"]:
        args += ["--output-name", fx["output"]]
    code, _, stderr, seconds = _segattr(*args)
    if code != 0:
        return f"exit {code}: {_first_error(stderr)}"
    reference = work / f"{fx['name']}_gradcam_{layers}.npy"
    if not reference.exists():
        return "no gradcam map to compare"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(exported), options, ["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
    )
    image = session.get_inputs()[0].name
    (saliency,) = session.run(["saliency"], {image: np.load(x_path)})
    difference = float(np.abs(saliency[0] - np.load(reference)).max())
    verdict = "ok" if difference <= EXPORT_TOLERANCE else "DIFFERS"
    return f"{verdict} Δ {difference:.0e} ({seconds:.1f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/compatibility.md")
    parser.add_argument("--only", help="comma-separated fixture names")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    methods = args.methods.split(",")
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for fx in fixtures(only):
            dtype = np.float16 if fx["dtype"] == "float16" else np.float32
            x = np.random.default_rng(0).standard_normal(fx["shape"]).astype(dtype)
            x_path = work / f"{fx['name']}_input.npy"
            np.save(x_path, x)
            facts = inspect_row(fx)
            cells = {}
            for method in methods:
                for layers in _specs(method):
                    cells[(method, layers)] = explain_cell(fx, method, layers, work, x_path)
                    failures += not cells[(method, layers)].startswith(("ok", "zero map"))
            rows.append((fx, facts, cells))
            print(f"{fx['name']}: {facts.get('rule')}", file=sys.stderr, flush=True)
    table = _table(rows, methods)
    print(table)
    if args.write:
        text = DOC.read_text()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return 1 if failures else 0


def _table(rows, methods) -> str:
    header = ["model", "family", "exporter", "layout", "rule", "layers (post)"]
    header += [f"{m} {spec}" for m in methods for spec in _specs(m)]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU provider. Cells: status, "
        "seconds inside the call (wall seconds of the whole process).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for fx, facts, cells in rows:
        counts = f"{facts.get('layers', '?')} ({facts.get('post', '?')})"
        values = [fx["name"], fx["family"], fx["exporter"], fx["layout"], facts["rule"], counts]
        values += [cells[(m, spec)] for m in methods for spec in _specs(m)]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

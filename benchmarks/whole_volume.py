"""Benchmark: whole-volume KWC of a sliding-window prediction — passes, skipped windows, time,
peak RSS, and the ratio to ONNX Runtime's floor.

The volume is a mosaic of held-out synthetic 32³ cases (the scale the bundled 3D model was
trained at), 8 × 8 × 5 of them by default: 256 × 256 × 160 voxels, covered by the model's 32³
patch at half overlap with Gaussian blending, as the model would be deployed. The target is
class 1 on the predicted mask's largest connected component, so most windows never touch the
region and are not re-run for the ablations.

Two fresh worker processes do the work, so that their peak RSS is the explanation's own:

1. the explanation timed, with its forward passes, skipped windows and peak RSS (VmHWM);
2. the same explanation with every ONNX Runtime call recorded (session, feeds, outputs), then
   those calls replayed back to back: the floor (``ort_replay.py``), and the ratio to it.

Run from the repository root::

    python benchmarks/whole_volume.py                 # 256 × 256 × 160
    python benchmarks/whole_volume.py --tiles 4 4 3   # 128 × 128 × 96, quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCHMARKS))

MIB = 1 << 20
TILE = 32  # the bundled 3D model's training size, and its patch here


def mosaic(tiles: tuple[int, int, int], first_seed: int = 90_000) -> np.ndarray:
    """Held-out synthetic 32³ cases side by side: nodules at the scale the model knows."""
    from segattr_onnx.synthetic import make_case

    volume = np.zeros(tuple(TILE * t for t in tiles), np.float32)
    seed = first_seed
    for i in range(tiles[0]):
        for j in range(tiles[1]):
            for k in range(tiles[2]):
                case = make_case(seed, dim=3, size=TILE)
                volume[TILE * i : TILE * (i + 1), TILE * j : TILE * (j + 1),
                       TILE * k : TILE * (k + 1)] = case.image  # fmt: skip
                seed += 1
    return volume


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker(tiles: tuple[int, int, int], record: bool) -> dict:
    from segattr_onnx import Explainer, Target
    from segattr_onnx.bundled import example_3d_model_path
    from segattr_onnx.sliding_window import SlidingWindow
    from segattr_onnx.target import Region
    from segattr_onnx.windowed import explain_windowed

    volume = mosaic(tiles)
    explainer = Explainer(example_3d_model_path(), provider="cpu")
    window = SlidingWindow((TILE,) * 3, overlap=0.5, blend="gaussian", batch=4)
    target = Target(class_index=1, region=Region.largest_component())
    recorder = None
    if record:
        from ort_replay import RunRecorder

        recorder = RunRecorder()
        recorder.install()
        recorder.recording = True
    started = time.perf_counter()
    explanation = explain_windowed(explainer, volume[None], window, "kwc", "decoder", target)
    seconds = time.perf_counter() - started
    ablations = [r for r in explanation.runs if r.purpose == "ablation"]
    result = {
        "volume": list(volume.shape),
        "windows": len(window.grid(volume.shape)),
        "skipped_windows": ablations[0].skipped_windows if ablations else 0,
        "forward_passes": explanation.forward_passes,
        "layers": len(explanation.layers),
        "seconds": seconds,
        "peak_rss": _vm_hwm(),
    }
    if recorder is not None:
        recorder.recording = False
        result["recorded_calls"] = len(recorder.calls)
        result["floor_seconds"] = recorder.replay_seconds()
    return result


def run_worker(tiles: tuple[int, int, int], record: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--tiles", *map(str, tiles)]
    if record:
        command.append("--record")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, nargs=3, default=(8, 8, 5))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tiles = tuple(args.tiles)
    if args.worker:
        print(json.dumps(worker(tiles, args.record)))
        return
    timed = run_worker(tiles, record=False)
    replayed = run_worker(tiles, record=True)
    results = {
        **timed,
        "floor_seconds": replayed["floor_seconds"],
        "recorded_calls": replayed["recorded_calls"],
        "ratio_to_floor": timed["seconds"] / replayed["floor_seconds"],
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    shape = "x".join(map(str, results["volume"]))
    print(f"whole-volume KWC (decoder, {results['layers']} layers), volume {shape}, 32³ windows")
    print(f"  windows               {results['windows']}")
    print(f"  skipped for ablations {results['skipped_windows']} (do not touch the region)")
    print(f"  forward passes        {results['forward_passes']}")
    print(f"  seconds               {results['seconds']:.1f}")
    rss = results["peak_rss"]
    print(f"  peak RSS              {rss / MIB:.0f} MiB" if rss else "  peak RSS  n/a")
    print(f"  floor (ORT replay)    {results['floor_seconds']:.1f} s "
          f"({results['recorded_calls']} ORT calls)")  # fmt: skip
    print(f"  ratio to the floor    {results['ratio_to_floor']:.2f}")


if __name__ == "__main__":
    main()

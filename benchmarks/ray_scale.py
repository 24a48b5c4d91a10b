"""Benchmark: what Ray costs and what it buys — an audit and one 3D case, local vs Ray.

Prints, in one run on a Ray cluster of this machine that the script starts:

1. a 20-case audit (the bundled 2D model at 128², KWC through the decoder, scores with
   curves) run in this process, then through Ray with 1 actor (given every core, as the local
   run has) and with 2 actors (half the cores each). The overhead of Ray at 1 actor is the
   ratio to the local time (goal: at most 1.15). Each Ray run starts its own actors (cold, as
   a CI job would), so actor start-up, model shipping and session building are in its time;
   the actor's start is shown apart, being a fixed cost that a longer audit amortises.
2. one 3D case's KWC (the benchmark U-Net of ``unet.py``, exported with torch) run locally
   and with its kernel ablations split over 2 actors, both with their sessions built.
3. a projection — not a measurement — of that 3D case's wall time on 1, 4 and 16 workers:
   wall(n) = serial + Σ_layers ceil(rows_l / n) · t_row + pieces(n) · latency / n, with the
   driver's serial part and the per-row time measured in (2), the latency of an empty item
   through the pool measured here, and the plan's rows per layer. A GPU worker's ``t_row``
   must be measured on one; pass it as ``--gpu-row-seconds`` to project GPUs, else the
   projection uses this machine's rate.

Run from the repository root (needs torch for the 3D export, and the segattr-ray plugin)::

    python benchmarks/ray_scale.py                  # 20 cases at 128², 3D at 48³
    python benchmarks/ray_scale.py --cases 8 --size-3d 32 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
sys.path.insert(0, str(BENCHMARKS))

import ray  # noqa: E402
from segattr_ray.backend import WORKER_SYSTEM_CONFIG  # noqa: E402

from segattr_onnx import Explainer, Target  # noqa: E402
from segattr_onnx.audit import audit  # noqa: E402
from segattr_onnx.bundled import example_model_path  # noqa: E402
from segattr_onnx.runtime.backends import ExecutorOptions, executor_backend  # noqa: E402
from segattr_onnx.synthetic import make_case, save_case  # noqa: E402


def write_audit(folder: Path, cases: int, size: int) -> Path:
    (folder / "cases").mkdir(parents=True)
    for seed in range(90_000, 90_000 + cases):
        save_case(make_case(seed, dim=2, size=size), folder / "cases" / f"case{seed}.npz")
    config = folder / "audit.toml"
    config.write_text(
        "\n".join(
            [
                f'model = "{example_model_path()}"',
                'methods = ["kwc"]',
                'layers = "decoder"',
                'provider = "cpu"',
                "steps = 10",
                'checks = ["prediction_preserved >= 0"]',
                "[[cases]]",
                'input = "cases/*.npz"',
                'labels = "same"',
            ]
        )
    )
    return config


def timed_audit(
    config: Path, output: Path, workers: int | None, cpus: int
) -> tuple[float, dict, float]:
    """The audit's wall time, its scores, and how long its actors took to start."""
    backend = None
    if workers is not None:
        backend = executor_backend("ray", ExecutorOptions(workers=workers, worker_cpus=cpus))
    started = time.perf_counter()
    try:
        report = audit(config, output=output, executor=backend or "local")
    finally:
        start_s = backend.current_pool.start_seconds if backend is not None else 0.0
        if backend is not None:
            backend.close()
    seconds = time.perf_counter() - started
    scores = {(r.case, r.check): r.value for r in report.results}
    return seconds, scores, start_s


def round_trip_seconds(workers: int, cpus: int, calls: int = 50) -> float:
    """One item's latency through the pool when the item itself takes no time."""
    explainer = Explainer(example_model_path(), provider="cpu")
    backend = executor_backend("ray", ExecutorOptions(workers=workers, worker_cpus=cpus))
    try:
        pool = backend.pool(explainer)
        pool.current_pids()  # started
        started = time.perf_counter()
        for _ in range(calls):
            pool.current_pids()
        return (time.perf_counter() - started) / calls
    finally:
        backend.close()


def export_3d(folder: Path) -> Path:
    from unet import export_onnx, make_unet

    return export_onnx(make_unet(3), 3, folder / "unet3d.onnx")


def timed_explain(explainer: Explainer, x: np.ndarray) -> tuple[float, object]:
    """A warm explanation: sessions built by an earlier one, rows not reused."""
    explainer.forget_case()
    started = time.perf_counter()
    explanation = explainer.explain(x, "kwc", "decoder", Target(class_index=1))
    return time.perf_counter() - started, explanation


def timed_observation(explainer: Explainer, x: np.ndarray) -> float:
    """The part of an explanation that stays on the driver: the observation pass."""
    explainer.forget_case()
    started = time.perf_counter()
    explainer.case(x, Target(class_index=1), "decoder", ablation_form="block")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size-2d", type=int, default=128)
    parser.add_argument("--size-3d", type=int, default=48)
    parser.add_argument("--gpu-row-seconds", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    # The cluster a user's run starts, or a standing one given the same system config.
    ray.init(
        num_cpus=cores,
        include_dashboard=False,
        logging_level="ERROR",
        _system_config=WORKER_SYSTEM_CONFIG,
    )
    results: dict = {"cores": cores, "cases": args.cases, "size_2d": args.size_2d}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = write_audit(folder / "audit", args.cases, args.size_2d)
        local_s, local_scores, _ = timed_audit(config, folder / "local", None, cores)
        one_s, one_scores, start_s = timed_audit(config, folder / "ray1", 1, cores)
        two_s, two_scores, _ = timed_audit(config, folder / "ray2", 2, max(cores // 2, 1))
        worst = max(
            abs(a - b)
            for scores in (one_scores, two_scores)
            for a, b in zip(scores.values(), local_scores.values(), strict=True)
        )
        results["audit"] = {
            "local_s": round(local_s, 2),
            "ray_1_actor_s": round(one_s, 2),
            "ray_2_actors_s": round(two_s, 2),
            "ray_1_actor_over_local": round(one_s / local_s, 3),
            "actor_start_s": round(start_s, 2),
            "ray_2_actors_over_local": round(two_s / local_s, 3),
            "max_score_difference": worst,
        }

        model = export_3d(folder)
        from unet import make_case as make_volume

        x = make_volume(3, args.size_3d).numpy()
        local = Explainer(model, provider="cpu")
        timed_explain(local, x)  # sessions built
        local_s, explanation = timed_explain(local, x)
        serial = timed_observation(local, x)
        backend = executor_backend(
            "ray", ExecutorOptions(workers=2, worker_cpus=max(cores // 2, 1))
        )
        try:
            remote = Explainer(model, provider="cpu", executor=backend)
            timed_explain(remote, x)  # actors started, sessions built: a warm pool
            ray_s, shipped = timed_explain(remote, x)
        finally:
            backend.close()
        rows = [r.passes for r in explanation.runs if r.purpose == "ablation"]
        t_row = max(local_s - serial, 0.0) / max(sum(rows), 1)
        latency = round_trip_seconds(2, max(cores // 2, 1))
        results["kwc_3d"] = {
            "size": args.size_3d,
            "layers": len(rows),
            "ablation_rows": int(sum(rows)),
            "local_s": round(local_s, 2),
            "ray_2_actors_s": round(ray_s, 2),
            "ray_over_local": round(ray_s / local_s, 3),
            "max_map_difference": float(np.abs(shipped.map - explanation.map).max()),
        }
        row_seconds = args.gpu_row_seconds if args.gpu_row_seconds else t_row
        projection = {}
        for workers in (1, 4, 16):
            pieces = sum(min(r, 2 * workers) for r in rows)
            wall = serial + sum(math.ceil(r / workers) for r in rows) * row_seconds
            projection[workers] = round(wall + pieces * latency / workers, 2)
        results["projection"] = {
            "what": "a projection from measured per-row time and latency, not a measurement",
            "serial_s": round(serial, 3),
            "row_seconds": row_seconds,
            "row_seconds_from": "--gpu-row-seconds" if args.gpu_row_seconds else "this machine",
            "latency_per_item_s": round(latency, 4),
            "wall_s_by_workers": projection,
        }
    ray.shutdown()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    a, k, p = results["audit"], results["kwc_3d"], results["projection"]
    print(f"machine: {cores} cores; Ray cluster of this machine started by the script")
    print(
        f"audit of {args.cases} cases at {args.size_2d}² (KWC, decoder, curves of 10 steps), "
        "cold runs:"
    )
    print(f"  local            {a['local_s']:7.2f} s   1.000")
    print(
        f"  Ray, 1 actor     {a['ray_1_actor_s']:7.2f} s   {a['ray_1_actor_over_local']:.3f}"
        "   (overhead goal: at most 1.15)"
    )
    print(f"  Ray, 2 actors    {a['ray_2_actors_s']:7.2f} s   {a['ray_2_actors_over_local']:.3f}")
    print(f"  (Ray, 1 actor: {a['actor_start_s']:.2f} s of it starting the actor, a fixed cost)")
    print(f"  largest score difference from local: {a['max_score_difference']:.2g}")
    print(f"3D KWC at {k['size']}³: {k['layers']} layers, {k['ablation_rows']} ablation rows")
    print(f"  local            {k['local_s']:7.2f} s   1.000")
    print(
        f"  Ray, 2 actors    {k['ray_2_actors_s']:7.2f} s   {k['ray_over_local']:.3f}"
        "   (both warm: sessions built)"
    )
    print(f"  largest map difference from local: {k['max_map_difference']:.2g}")
    print(
        f"projection (not measured) of that case: {p['serial_s']:.3f} s on the driver, "
        f"{p['row_seconds']:.4f} s per row ({p['row_seconds_from']}), "
        f"{p['latency_per_item_s']:.4f} s latency per item:"
    )
    for workers, wall in p["wall_s_by_workers"].items():
        print(f"  {workers:2d} worker(s)    {wall:7.2f} s")


if __name__ == "__main__":
    main()

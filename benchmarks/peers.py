"""Benchmark: segattr-onnx against the tools people use today, on the same weights and input.

One invocation builds one torch U-Net per dimensionality (``unet.py``; 2D at 256², 3D at 64³),
exports it to ONNX, draws one input and takes the predicted mask of class 1 as the target
region. Then each (method, tool) pair runs in its own worker process, so its peak RSS is its
own, and everything is compared:

* Ablation-CAM: segattr-onnx vs pytorch-grad-cam ``AblationCAM`` (segmentation target), on the
  last decoder convolution's block (pytorch-grad-cam zeroes the block's ReLU output, as
  segattr-onnx's P2 ablation does);
* Score-CAM: segattr-onnx vs pytorch-grad-cam ``ScoreCAM`` on the same convolution (its raw
  output is the activation both upsample and normalise);
* KWC (P2, every decoder layer): segattr-onnx vs ``torch_kwc.py``, the straightforward torch
  implementation that edits weights and re-runs the whole model for every kernel. KWC also gets
  two rows for the command a user types (``segattr explain ... --method kwc``), timed from
  process start to exit, imports, model loading and session building included: a first call
  with an empty cache folder (``SEGATTR_CACHE_DIR``), then the same call again on the cache the
  first one wrote. In-process timings hide what a user pays per call; these rows show it.
  Each pair of calls follows a warm torch KWC run of its own (a fresh worker: its cold run,
  then the timed one), and the CLI's ratios are the medians of the per-pair ratios: a shared
  machine's load drifts over the minutes the table takes, and the CLI rows come last.

For each: seconds (median of ``--repeats`` warm runs, after one cold run that builds sessions),
forward passes (segattr-onnx: passes through the graph each run needs, mostly the part after
the layer; peers: whole-model passes), peak RSS of the worker, the peer's time over
segattr-onnx's, and segattr-onnx's time over its floor (the same ORT calls replayed alone).
Results are also compared number for number where the methods coincide; the CLI's map must
equal the in-process map within 1e-5.

``--widths`` sets the U-Net's channels per level (default: ``unet.py``'s per dimensionality).
The reference model for the CLI rows is ``--widths 16,32,64`` at 256²: 6 decoder layers,
144 kernels, 289 forward passes per KWC.

Run from the repository root (needs the benchmark extras: see benchmarks/README.md)::

    python benchmarks/peers.py                      # the table in benchmarks/README.md
    python benchmarks/peers.py --dims 2 --repeats 5 --json results.json
    python benchmarks/peers.py --dims 2 --methods kwc --widths 16,32,64 --repeats 5
    python benchmarks/peers.py --provider cuda --quick     # what gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
try:
    import segattr_onnx  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(REPO_ROOT))
from cli_process import compile_package_bytecode, segattr_command  # noqa: E402

SIZES = {2: 256, 3: 64}
QUICK_SIZES = {2: 128, 3: 32}
CLASS_INDEX = 1
METHODS = ("ablationcam", "scorecam", "kwc")
PEER_OF = {
    "ablationcam": "pytorch-grad-cam AblationCAM",
    "scorecam": "pytorch-grad-cam ScoreCAM",
    "kwc": "torch KWC (weight editing, full re-runs)",
}
CLI_TOLERANCE = 1e-5  # largest |CLI map − in-process map| accepted: same graph, same batches


@dataclass
class Job:
    """One worker's work: a tool running one method on one prepared case."""

    tool: str  # "segattr" or "peer"
    method: str
    dims: int
    workdir: str
    repeats: int
    provider: str = "cpu"
    memory_budget: int | None = None  # segattr-onnx's --memory-budget, in bytes
    widths: list[int] = field(default_factory=list)  # the U-Net's; empty: unet.py's default


@dataclass
class Timing:
    tool: str
    method: str
    dims: int
    seconds: list[float] = field(default_factory=list)
    cold_seconds: float = 0.0
    forward_passes: int = 0
    session_runs: int | None = None
    floor_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    idle_rss_mb: float = 0.0  # after imports and loading, before any work
    threads: str = ""
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def last_decoder_conv(dims: int, widths: tuple[int, ...] | list[int] = ()) -> str:
    """The last decoder's second convolution: one decoder per level but the bottleneck's."""
    from unet import WIDTHS

    return f"/decoders.{len(widths or WIDTHS[dims]) - 2}/blocks/blocks.1/conv/Conv"


def parse_widths(text: str) -> tuple[int, ...]:
    """``16,32,64`` → (16, 32, 64): channels per level, the last the bottleneck's."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(
            f"--widths {text!r}: give two or more positive channel counts, e.g. 16,32,64"
        )
    return widths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------
# Preparing the shared case (driver)
# ----------------------------------------------------------------------------------------------


def prepare(dims: int, size: int, workdir: Path, widths: tuple[int, ...] = ()) -> None:
    """Weights, ONNX export, input and target region for one dimensionality, written once."""
    import torch
    from unet import export_onnx, make_case, make_unet

    model = make_unet(dims, widths=widths)
    torch.save(model.state_dict(), workdir / f"unet{dims}d.pt")
    export_onnx(model, dims, workdir / f"unet{dims}d.onnx")
    x = make_case(dims, size)
    with torch.no_grad():
        probabilities = model(x)[0].numpy()
    region = probabilities.argmax(axis=0) == CLASS_INDEX
    np.save(workdir / f"x{dims}d.npy", x.numpy())
    np.save(workdir / f"region{dims}d.npy", region)


def load_case(job: Job) -> tuple[np.ndarray, np.ndarray]:
    workdir = Path(job.workdir)
    return np.load(workdir / f"x{job.dims}d.npy"), np.load(workdir / f"region{job.dims}d.npy")


# ----------------------------------------------------------------------------------------------
# Workers (one process each)
# ----------------------------------------------------------------------------------------------


def run_segattr(job: Job) -> tuple[Timing, dict[str, np.ndarray]]:
    import onnxruntime as ort
    from ort_replay import RunRecorder

    from segattr_onnx import Explainer, Target

    x, region = load_case(job)
    layers = "decoder" if job.method == "kwc" else [last_decoder_conv(job.dims, job.widths)]
    target = Target(class_index=CLASS_INDEX, region=region)
    # The recorder keeps every run's feeds for the floor's replay; a budgeted run is measured
    # for its peak memory, so it runs without one (and reports no floor).
    recorder = RunRecorder()
    if job.memory_budget is None:
        recorder.install()
    explainer = Explainer(
        Path(job.workdir) / f"unet{job.dims}d.onnx",
        provider=job.provider,
        memory_budget=job.memory_budget,
    )
    timing = Timing("segattr", job.method, job.dims, idle_rss_mb=peak_rss_mb())
    options = ort.SessionOptions()
    timing.threads = f"ORT intra-op {options.intra_op_num_threads or os.cpu_count()} (default)"

    def explain():
        return explainer.explain(x, job.method, layers, target=target, variant="p2")

    started = time.perf_counter()
    result = explain()
    timing.cold_seconds = time.perf_counter() - started
    for _ in range(job.repeats):
        explainer.forget_case()  # the same case again: nothing may be reused from the last run
        recorder.calls, recorder.recording = [], True
        started = time.perf_counter()
        result = explain()
        timing.seconds.append(time.perf_counter() - started)
        recorder.recording = False
        if job.memory_budget is None:
            timing.floor_seconds.append(recorder.replay_seconds())
    timing.forward_passes = result.forward_passes
    timing.session_runs = result.session_runs
    timing.peak_rss_mb = peak_rss_mb()
    arrays = {"map": result.map}
    for index, layer in enumerate(result.layers):
        arrays[f"weights{index}"] = layer.weights
        for name, values in layer.terms.items():
            arrays[f"{name}{index}"] = values
    return timing, arrays


def _torch_model(job: Job):
    import torch
    from unet import make_unet

    model = make_unet(job.dims, widths=tuple(job.widths))
    model.load_state_dict(torch.load(Path(job.workdir) / f"unet{job.dims}d.pt"))
    return model.eval()


class PassCounter:
    """Counts whole-model passes (batch items) through a torch module."""

    def __init__(self, model) -> None:
        self.passes = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, _module, inputs) -> None:
        self.passes += int(inputs[0].shape[0])


def run_peer(job: Job) -> tuple[Timing, dict[str, np.ndarray]]:
    import torch

    x_np, region = load_case(job)
    model = _torch_model(job)
    x = torch.from_numpy(x_np)
    counter = PassCounter(model)
    timing = Timing("peer", job.method, job.dims, idle_rss_mb=peak_rss_mb())
    timing.threads = f"torch intra-op {torch.get_num_threads()}"
    arrays: dict[str, np.ndarray] = {}

    if job.method == "kwc":
        from torch_kwc import kwc_by_weight_editing

        def run() -> None:
            result = kwc_by_weight_editing(model, x, CLASS_INDEX, region)
            arrays["map"] = result.map
            for index, layer in enumerate(result.layers):
                arrays[f"weights{index}"] = layer.weights
                arrays[f"dependent{index}"] = layer.dependent
                arrays[f"independent{index}"] = layer.independent
    else:
        run = _grad_cam_runner(job, model, x, region, arrays)

    try:
        started = time.perf_counter()
        run()
        timing.cold_seconds = time.perf_counter() - started
    except Exception as exc:  # a peer that cannot do this case: reported, not hidden
        timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        timing.peak_rss_mb = peak_rss_mb()
        return timing, arrays
    for _ in range(job.repeats):
        counter.passes = 0
        started = time.perf_counter()
        run()
        timing.seconds.append(time.perf_counter() - started)
    timing.forward_passes = counter.passes
    timing.peak_rss_mb = peak_rss_mb()
    return timing, arrays


def _grad_cam_runner(job: Job, model, x, region: np.ndarray, arrays: dict):
    """A pytorch-grad-cam call as its README shows it, capturing the weights it computes."""
    from grad_cam_import import import_grad_cam

    import_grad_cam()
    from pytorch_grad_cam import AblationCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    block = model.decoders[-1].blocks[1]
    if job.method == "ablationcam":
        cam = AblationCAM(model=model, target_layers=[block.act])
    else:
        cam = ScoreCAM(model=model, target_layers=[block.conv])
    targets = [SemanticSegmentationTarget(CLASS_INDEX, region.astype(np.float32))]
    original = cam.get_cam_weights

    def capture(*args, **kwargs):
        weights = original(*args, **kwargs)
        arrays["weights0"] = np.asarray(weights)[0]
        return weights

    cam.get_cam_weights = capture

    def run() -> None:
        arrays["map"] = cam(input_tensor=x, targets=targets)[0]

    return run


def worker(job: Job, out: Path) -> None:
    timing, arrays = run_segattr(job) if job.tool == "segattr" else run_peer(job)
    np.savez(out.with_suffix(".npz"), **arrays)
    out.write_text(json.dumps(asdict(timing)))


# ----------------------------------------------------------------------------------------------
# Comparing results where the methods coincide
# ----------------------------------------------------------------------------------------------


def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare(method: str, ours: dict, peer: dict) -> dict[str, float]:
    """Largest differences between the two tools' numbers, relative where the scale is free."""
    if not peer:
        return {}
    if method == "kwc":
        layers = sum(1 for key in ours if key.startswith("weights"))
        report = {
            term: max(_relative(ours[f"{term}{i}"], peer[f"{term}{i}"]) for i in range(layers))
            for term in ("dependent", "independent", "weights")
        }
        report["map_max_abs"] = float(np.abs(ours["map"] - peer["map"]).max())
        return report
    report = {"weights": _relative(ours["weights0"], peer["weights0"])}
    if method == "scorecam":
        # pytorch-grad-cam rescales with (m − min)/(max + 1e-7); both min-maxed here.
        report["map_max_abs_minmax"] = float(
            np.abs(_minmax(ours["map"]) - _minmax(peer["map"])).max()
        )
    return report


def ablation_map_check(
    workdir: Path, dims: int, provider: str, widths: tuple[int, ...] = ()
) -> dict[str, float]:
    """Ablation-CAM maps, ours vs pytorch-grad-cam's, at a layer whose block is the raw output.

    At a ReLU block pytorch-grad-cam builds the map from the ReLU's output while the spec (and
    segattr-onnx) use the kernel's raw output, so maps can only be compared where the two are the
    same tensor: the last ConvTranspose (no norm or activation after it). pytorch-grad-cam
    ablates a layer whose minimum is not 0 with min − 1e7 instead of 0, so it is given an
    ablation layer that always zeroes, the paper's Ablation-CAM.
    """
    import torch
    from grad_cam_import import import_grad_cam

    import_grad_cam()
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from segattr_onnx import Explainer, Target

    class ZeroAblation(AblationLayer):
        def __call__(self, x):
            output = self.activations
            for i in range(output.size(0)):
                output[i, self.indices[i], :] = 0
            return output

    job = Job("peer", "ablationcam", dims, str(workdir), 1, widths=list(widths))
    x_np, region = load_case(job)
    model = _torch_model(job)
    index = len(model.decoders) - 1
    cam = AblationCAM(
        model=model, target_layers=[model.decoders[-1].up], ablation_layer=ZeroAblation()
    )
    captured = {}
    original = cam.get_cam_weights

    def capture(*args, **kwargs):
        captured["weights"] = np.asarray(original(*args, **kwargs))[0]
        return captured["weights"][None]

    cam.get_cam_weights = capture
    theirs = cam(
        input_tensor=torch.from_numpy(x_np),
        targets=[SemanticSegmentationTarget(CLASS_INDEX, region.astype(np.float32))],
    )[0]
    ours = Explainer(workdir / f"unet{dims}d.onnx", provider=provider).explain(
        x_np,
        "ablationcam",
        [f"/decoders.{index}/up/ConvTranspose"],
        target=Target(class_index=CLASS_INDEX, region=region),
    )
    return {
        "weights": _relative(ours.layers[0].weights, captured["weights"]),
        "map_max_abs_minmax": float(np.abs(_minmax(ours.map) - _minmax(theirs)).max()),
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def spawn(job: Job, workdir: Path) -> tuple[Timing, dict[str, np.ndarray]]:
    budget = f"-{job.memory_budget}" if job.memory_budget else ""
    out = workdir / f"{job.tool}-{job.method}-{job.dims}d{budget}.json"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(asdict(job)),
        "--worker-out",
        str(out),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"worker {job.tool}/{job.method}/{job.dims}d failed:\n{completed.stderr}")
    data = json.loads(out.read_text())
    arrays = dict(np.load(out.with_suffix(".npz")))
    return Timing(**data), arrays


# ----------------------------------------------------------------------------------------------
# The command line, end to end (driver)
# ----------------------------------------------------------------------------------------------


@dataclass
class CliTiming:
    """``segattr explain`` as a user runs it: each call a process of its own."""

    command: list[str] = field(default_factory=list)
    first_seconds: list[float] = field(default_factory=list)  # empty cache folder
    second_seconds: list[float] = field(default_factory=list)  # the cache the first call wrote
    first_rss_mb: list[float] = field(default_factory=list)
    second_rss_mb: list[float] = field(default_factory=list)
    first_explain_seconds: list[float] = field(default_factory=list)  # as each call reports it
    second_explain_seconds: list[float] = field(default_factory=list)
    forward_passes: int | None = None
    cache_entries: list[int] = field(default_factory=list)  # written by each first call
    map_max_abs: float = 0.0  # largest |CLI map − in-process map| over every call
    # The torch KWC's warm run just before each pair of calls (empty: no peer): a shared
    # machine's load drifts over the minutes a table takes, so each pair is compared with a
    # peer run of its own, and the ratio is the median of the per-pair ratios.
    peer_seconds: list[float] = field(default_factory=list)


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds from process start to exit, the process's own peak RSS (MB), and its output.

    ``os.wait4`` reaps the child with its own rusage: ``RUSAGE_CHILDREN`` would be the largest
    of every child so far, the workers' included.
    """
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text


def run_cli(
    workdir: Path,
    dims: int,
    provider: str,
    repeats: int,
    reference: np.ndarray,
    peer: Job | None = None,
) -> CliTiming:
    """``repeats`` pairs of calls, each pair on a fresh cache folder: first (empty), second;
    with a ``peer`` job, each pair right after a warm run of the peer of its own."""
    model, x, region = (
        workdir / f"{name}{dims}d.{ext}"
        for name, ext in (("unet", "onnx"), ("x", "npy"), ("region", "npy"))
    )
    timing = CliTiming()
    compile_package_bytecode()  # as pip install does: the calls time the command, not compiling
    for repeat in range(repeats):
        if peer is not None:
            paired, _ = spawn(peer, workdir)
            timing.peer_seconds.append(paired.median)
        cache = Path(tempfile.mkdtemp(prefix=f"cache{dims}d-", dir=workdir))  # mode 0700
        env = {**os.environ, "TQDM_DISABLE": "1", "SEGATTR_CACHE_DIR": str(cache)}
        for call in ("first", "second"):
            out = workdir / f"cli{dims}d-{repeat}-{call}.npy"
            command = [
                *segattr_command(),
                *("explain", str(model), str(x), "--out", str(out), "--method", "kwc"),
                *("--layers", "decoder", "--variant", "p2", "--class-index", str(CLASS_INDEX)),
                *("--region", str(region), "--provider", provider, "--quiet"),
            ]
            seconds, rss, text = timed_process(command, env)
            getattr(timing, f"{call}_seconds").append(seconds)
            getattr(timing, f"{call}_rss_mb").append(rss)
            timing.command = command
            reported = re.search(r"(\d+) forward passes in ([0-9.]+) s", text)
            if reported:
                timing.forward_passes = int(reported.group(1))
                getattr(timing, f"{call}_explain_seconds").append(float(reported.group(2)))
            written = np.load(out)
            difference = (
                float(np.abs(written.astype(np.float64) - reference).max())
                if written.shape == reference.shape
                else float("inf")  # not the same map at all
            )
            timing.map_max_abs = max(timing.map_max_abs, difference)
            if call == "first":
                timing.cache_entries.append(
                    sum(1 for path in (cache / "entries").rglob("*") if path.is_file())
                )
    return timing


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "segattr-onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "onnx",
        "torch",
        "grad-cam",
        "numpy",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = model or platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()}"


def markdown(rows: list[dict], header: dict) -> str:
    lines = [
        f"Machine: {header['machine']}. Provider: {header['provider']}. "
        f"Median of {header['repeats']} warm runs each"
        + (
            f" ({header['peer_repeats']} for the peers)."
            if header["peer_repeats"] != header["repeats"]
            else "."
        )
        + " U-Net widths: "
        + ", ".join(f"{d}D {'/'.join(map(str, w))}" for d, w in header["widths"].items())
        + ".",
        "",
        "| case | method | tool | seconds | passes | peak RSS (MB) | peer / segattr "
        "| segattr / floor | agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['method']} | {row['tool']} | {row['seconds']} | "
            f"{row['passes']} | {row['peak_rss_mb']} | {row['speedup']} | {row['floor_ratio']} | "
            f"{row['agreement']} |"
        )
    return "\n".join(lines)


def cli_report(
    case: str, cli: CliTiming, ours: Timing, peer: Timing | None
) -> tuple[list[dict], dict, str]:
    """The CLI's two table rows, its ``--json`` record and its one-line summary."""
    first = statistics.median(cli.first_seconds)
    second = statistics.median(cli.second_seconds)

    def speedup(calls: list[float]) -> float | None:
        if cli.peer_seconds:  # each pair against the peer run just before it
            return statistics.median(t / c for t, c in zip(cli.peer_seconds, calls, strict=True))
        return peer.median / statistics.median(calls) if peer else None

    speedup_first = speedup(cli.first_seconds)
    speedup_second = speedup(cli.second_seconds)
    within = cli.map_max_abs <= CLI_TOLERANCE
    agreement = f"map_max_abs {cli.map_max_abs:.1e} vs in-process" + (
        "" if within else f" (over {CLI_TOLERANCE:g}!)"
    )
    passes = "" if cli.forward_passes is None else str(cli.forward_passes)
    rows = [
        {
            "case": case,
            "method": "kwc",
            "tool": tool,
            "seconds": _fmt(seconds),
            "passes": passes,
            "peak_rss_mb": f"{statistics.median(rss):.0f}",
            "speedup": f"**{_fmt(speedup)}×**" if speedup else "",
            "floor_ratio": "",
            "agreement": agreement,
        }
        for tool, seconds, rss, speedup in (
            ("segattr-onnx CLI, first call (cold cache)", first, cli.first_rss_mb, speedup_first),
            (
                "segattr-onnx CLI, second call (cache warm)",
                second,
                cli.second_rss_mb,
                speedup_second,
            ),
        )
    ]
    detail = {
        **asdict(cli),
        "first_median": first,
        "second_median": second,
        "speedup_first": speedup_first,
        "speedup_second": speedup_second,
        "map_within_tolerance": within,
        "tolerance": CLI_TOLERANCE,
    }

    def ratio(value: float | None) -> str:
        return f" ({value:.1f}x)" if value else ""

    line = (
        (f"{case} kwc: torch KWC {peer.median:.1f} s; " if peer else f"{case} kwc: ")
        + f"in-process {ours.median:.1f} s{ratio(peer.median / ours.median if peer else None)}; "
        + f"CLI first {first:.1f} s{ratio(speedup_first)}, "
        + f"second {second:.1f} s{ratio(speedup_second)}"
    )
    if cli.peer_seconds:
        line += (
            " (each pair of calls against a torch KWC run just before it: "
            + ", ".join(f"{t:.1f}" for t in cli.peer_seconds)
            + " s)"
        )
    if not all(cli.cache_entries):
        line += "; the first call wrote no cache entry, so the second ran cold too"
    if not within:
        line += f"; CLI map differs from the in-process map by {cli.map_max_abs:.1e}"
    return rows, detail, line


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--peer-repeats",
        type=int,
        help="timed runs of the peers (default: --repeats); the torch KWC at 3D 64³ takes "
        "minutes per run on 2 cores",
    )
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller cases, 2 repeats")
    parser.add_argument("--size", type=int, help="edge of the case (default 256 in 2D, 64 in 3D)")
    parser.add_argument(
        "--widths",
        type=parse_widths,
        default=(),
        help="the U-Net's channels per level, comma-separated, e.g. 16,32,64 (default: "
        "unet.py's, 8,16,32,64 in 2D and 4,8,16,32 in 3D)",
    )
    parser.add_argument("--no-peers", action="store_true", help="segattr-onnx and its floor only")
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(Job(**json.loads(args.worker)), Path(args.worker_out))
        return 0
    from unet import WIDTHS

    widths = list(args.widths)

    repeats = 2 if args.quick else args.repeats
    peer_repeats = args.peer_repeats or repeats
    sizes = dict(QUICK_SIZES if args.quick else SIZES)
    if args.size:
        sizes = dict.fromkeys(sizes, args.size)
    header = {
        "machine": machine(),
        "provider": args.provider,
        "repeats": repeats,
        "peer_repeats": peer_repeats,
        "widths": {dims: list(args.widths or WIDTHS[dims]) for dims in args.dims},
        "versions": versions(),
        "command": " ".join(["python", "benchmarks/peers.py", *(argv or sys.argv[1:])]),
    }
    rows: list[dict] = []
    details: list[dict] = []
    cli_lines: list[str] = []  # printed after the table
    with tempfile.TemporaryDirectory(prefix="segattr-peers-") as tmp:
        workdir = Path(tmp)
        for dims in args.dims:
            prepare(dims, sizes[dims], workdir, args.widths)
            case = f"{dims}D {sizes[dims]}^{dims}"
            for method in args.methods:
                ours, ours_arrays = spawn(
                    Job("segattr", method, dims, tmp, repeats, args.provider, widths=widths),
                    workdir,
                )
                peer, peer_arrays = (
                    (None, {})
                    if args.no_peers
                    else spawn(Job("peer", method, dims, tmp, peer_repeats, widths=widths), workdir)
                )
                agreement = (
                    compare(method, ours_arrays, peer_arrays) if peer and not peer.error else {}
                )
                floor_ratios = [
                    t / f for t, f in zip(ours.seconds, ours.floor_seconds, strict=True)
                ]
                floor_ratio = statistics.median(floor_ratios)
                speedup = peer.median / ours.median if peer and not peer.error else None
                agreement_text = ", ".join(f"{k} {v:.1e}" for k, v in agreement.items())
                rows.append(
                    {
                        "case": case,
                        "method": method,
                        "tool": "segattr-onnx",
                        "seconds": _fmt(ours.median),
                        "passes": f"{ours.forward_passes} ({ours.session_runs} runs)",
                        "peak_rss_mb": f"{ours.peak_rss_mb:.0f}",
                        "speedup": f"**{_fmt(speedup)}×**" if speedup else "",
                        "floor_ratio": f"{floor_ratio:.3f}×",
                        "agreement": agreement_text,
                    }
                )
                if peer is not None:
                    rows.append(
                        {
                            "case": case,
                            "method": method,
                            "tool": PEER_OF[method],
                            "seconds": _fmt(peer.median)
                            if not peer.error
                            else f"fails: {peer.error}",
                            "passes": str(peer.forward_passes) if not peer.error else "",
                            "peak_rss_mb": f"{peer.peak_rss_mb:.0f}",
                            "speedup": "",
                            "floor_ratio": "",
                            "agreement": "",
                        }
                    )
                details.append(
                    {
                        "case": case,
                        "method": method,
                        "segattr": asdict(ours),
                        "peer": asdict(peer) if peer else None,
                        "speedup": speedup,
                        "segattr_over_floor": floor_ratio,
                        "segattr_over_floor_per_run": floor_ratios,
                        "agreement": agreement,
                    }
                )
                if method == "kwc" and peer is not None and not peer.error:
                    # Issue 13's bar: under a budget of the torch KWC's own peak, still >= 4x.
                    budget = int(peer.peak_rss_mb * (1 << 20))
                    bounded, _ = spawn(
                        Job("segattr", method, dims, tmp, repeats, args.provider, budget, widths),
                        workdir,
                    )
                    bounded_speedup = peer.median / bounded.median
                    rows.append(
                        {
                            "case": case,
                            "method": method,
                            "tool": f"segattr-onnx, --memory-budget {peer.peak_rss_mb:.0f}M",
                            "seconds": _fmt(bounded.median),
                            "passes": f"{bounded.forward_passes} ({bounded.session_runs} runs)",
                            "peak_rss_mb": f"{bounded.peak_rss_mb:.0f}",
                            "speedup": f"**{_fmt(bounded_speedup)}×**",
                            "floor_ratio": "",
                            "agreement": "",
                        }
                    )
                    details[-1]["segattr_at_peer_peak"] = {
                        **asdict(bounded),
                        "memory_budget": budget,
                        "speedup": bounded_speedup,
                        "within_budget": bounded.peak_rss_mb * (1 << 20) <= budget,
                    }
                if method == "kwc":
                    peer_ok = peer is not None and not peer.error
                    paired = Job("peer", method, dims, tmp, 1, widths=widths) if peer_ok else None
                    cli = run_cli(workdir, dims, args.provider, repeats, ours_arrays["map"], paired)
                    cli_rows, cli_detail, cli_line = cli_report(
                        case, cli, ours, peer if peer_ok else None
                    )
                    rows.extend(cli_rows)
                    details[-1]["cli"] = cli_detail
                    cli_lines.append(cli_line)
                peer_text = f", peer {_fmt(peer.median)} s" if peer and not peer.error else ""
                print(f"{case} {method}: segattr {_fmt(ours.median)} s{peer_text}", flush=True)
            if not args.no_peers and dims == 2 and "ablationcam" in args.methods:
                check = ablation_map_check(workdir, dims, args.provider, args.widths)
                header[f"ablationcam_convtranspose_check_{dims}d"] = check
    table = markdown(rows, header)
    print()
    print(table)
    for line in cli_lines:
        print(line)
    for key, value in header.items():
        if key.startswith("ablationcam_convtranspose_check"):
            print(f"{key}: " + ", ".join(f"{k} {v:.1e}" for k, v in value.items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": details}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

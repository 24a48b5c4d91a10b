"""Whole-volume attribution of a sliding-window prediction (kernel-ablation methods).

A model deployed patch by patch draws its mask from the blend of the patches' outputs, so the
explanation must be of that blend: T = Σ_R P over the fused prediction, and a kernel's weight
comes from ablating it in every patch and fusing the ablated outputs with the same weights.
Kernel weights are therefore global, one per kernel for the whole volume, and a layer's map is
Σ_k w_k · A_k with A_k the kernel's activations fused over the patches (each upsampled to its
patch, blended like the outputs), at input resolution.

Every statistic the methods use sums over the region R, and every voxel of R is covered only by
windows that touch R: the others are run once (they make the prediction) but never for the
ablations, and the run record counts them.

Covered: kernel ablations (KWC, Ablation-CAM), masked inputs (Score-CAM: each whole-volume
masked input predicted through the windows and fused) and Grad-CAM (each touching window's
backward run seeded with its share w_p/W of ∂T/∂F, so gradients flow through the blend; α_k is
the mean of ∂T/∂A_k over those windows and positions). Grad-CAM++, whose weights pair each
position's gradient with the same position's activation, is refused by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from segattr_onnx.arrays import upsample
from segattr_onnx.errors import MethodError
from segattr_onnx.explainer import Explainer, attribute_layer
from segattr_onnx.explanation import Explanation, RunRecord
from segattr_onnx.graph.catalogue import KernelLayer
from segattr_onnx.methods.base import (
    VARIANTS,
    AblationRequest,
    AttributionMethod,
    Case,
    GradientRequest,
    MaskedInputRequest,
    Request,
)
from segattr_onnx.methods.layers import is_group_selection, select_layers
from segattr_onnx.methods.registry import create_method
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import ChunkedRunner, default_memory_budget
from segattr_onnx.runtime.observation import observe
from segattr_onnx.sliding_window import SlidingWindow, WindowGrid, channels_first
from segattr_onnx.target import ResolvedTarget, Target, default_output, region_sum

WINDOWED_METHODS = ("kwc", "ablationcam", "scorecam", "gradcam")
ROWS_PER_PASS = 16  # ablation rows fused at once: bounds the (rows, C, *volume) accumulator


@dataclass(frozen=True)
class WindowedCase(Case):
    """A case whose prediction and activations are fused over windows, on the volume's grid."""

    volume_shape: tuple[int, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.volume_shape


@dataclass
class WindowedPrepared:
    """A case set up for windowed requests: the fused case, its windows and which of them
    touch the region (the only ones re-run)."""

    case: WindowedCase
    layers: tuple[KernelLayer, ...]
    output: np.ndarray = field(repr=False)  # the fused target output, channels first
    runner: AblationRunner = field(repr=False)
    grid: WindowGrid = field(repr=False)
    patches: _Patches = field(repr=False)
    touching: list[int] = field(repr=False)

    def run(self, request: Request) -> tuple[np.ndarray, RunRecord]:
        """One request's statistic rows on fused re-predictions, and its run record."""
        if isinstance(request, AblationRequest):
            rows = _ablation_rows(self.runner, request, self.case, self.patches, self.touching,
                                  self.grid)  # fmt: skip
            ablated = self.runner.ablated(request.layer, request.form)
            linear = self.runner.linear_schedule(ablated, request.masks) is not None
            purpose, graph, count = "ablation", "linear" if linear else "suffix", len(request.masks)
        elif isinstance(request, MaskedInputRequest):
            rows = _masked_rows(self.runner, request, self.case, self.touching, self.grid)
            purpose, graph, count = "masked-input", "full", request.count
        else:
            raise MethodError("gradients through a sliding window are not supported yet")
        skipped = len(self.grid) - len(self.touching)
        record = RunRecord(purpose, request.layer, graph, 0, count * len(self.touching), 0, 0,
                           skipped_windows=skipped)  # fmt: skip
        return rows, record


def prepare_windowed(
    explainer: Explainer,
    x: np.ndarray,
    window: SlidingWindow,
    layers: str | Sequence[str] | None = "decoder",
    target: Target | None = None,
    variant: str = "p2",
) -> WindowedPrepared:
    """One pass per window: the fused prediction, the region, T, and the selected layers'
    activations (fused when a method asks for a layer). ``layers=None`` selects none, as
    scoring needs."""
    if variant not in VARIANTS:
        raise MethodError(f"variant {variant!r} is unknown; use 'p1' or 'p2'")
    array = explainer.shaped_input(x)
    if explainer.input_channel_axis() != 1:
        raise MethodError("sliding-window explanations take channels-first models for now")
    image = array[0]
    grid = window.grid(image.shape[1:])
    runner = explainer.local_executor((1, image.shape[0], *window.patch)).runner
    analysis = runner.analysis
    target = target or Target()
    chosen: list[KernelLayer] = []
    if layers is not None:
        if target.output is None and is_group_selection(layers):
            target = replace(target, output=default_output(analysis))
        chosen = select_layers(analysis, layers, target.output)
    resolved = target.resolve(analysis, chosen)
    patches = _Patches(grid.padded_input(image), grid)
    outputs, activations = _fused_observation(analysis, runner, patches, chosen, resolved, grid)
    prediction = resolved.probabilities(_model_layout(outputs[None], resolved))[0]
    region = resolved.region_mask(_model_layout(outputs[None], resolved))
    base_score = float(region_sum(prediction[None], region)[0])
    if not base_score > 0:
        raise MethodError(
            f"the target score of the fused prediction is {base_score:g}: the model predicts "
            f"nothing for class {resolved.class_index} in the region"
        )
    touching = [i for i in range(len(grid)) if region is None or region[_inside(grid, i)].any()]
    case = WindowedCase(
        analysis=analysis,
        x=array,
        target=resolved,
        prediction=prediction,
        region=region,
        base_score=base_score,
        activations=activations,
        variant=variant,
        volume_shape=tuple(image.shape[1:]),
    )
    return WindowedPrepared(case, tuple(chosen), outputs, runner, grid, patches, touching)


def explain_windowed(
    explainer: Explainer,
    x: np.ndarray,
    window: SlidingWindow,
    method: str | AttributionMethod = "kwc",
    layers: str | Sequence[str] = "decoder",
    target: Target | None = None,
    variant: str = "p2",
) -> Explanation:
    """Explain the sliding-window prediction of ``x`` (the model's layout, channels first)."""
    started = time.perf_counter()
    method = create_method(method) if isinstance(method, str) else method
    if method.name not in WINDOWED_METHODS:
        raise MethodError(
            f"{method.name} through a sliding window is not supported yet; use one of "
            f"{', '.join(WINDOWED_METHODS)}, or explain the whole input"
        )
    prepared = prepare_windowed(explainer, x, window, layers, target, variant)
    case, grid = prepared.case, prepared.grid
    records = [RunRecord("observation", None, "observed", 0, len(grid), len(grid), 1)]
    gradients: dict[str, np.ndarray] = {}
    if method.uses_gradients:
        gradients = _window_gradients(explainer, prepared)
        runs = len(prepared.touching) * _seeded_channels(prepared)
        records.append(RunRecord("gradient", None, "backward", 0, runs, runs, 1,
                                 skipped_windows=len(grid) - len(prepared.touching)))  # fmt: skip
    attributions = []
    for layer in prepared.layers:
        rows = []
        for request in method.requests(case, layer):
            if isinstance(request, GradientRequest):
                rows.append(gradients[request.layer])
                continue
            request_rows, record = prepared.run(request)
            rows.append(request_rows)
            records.append(record)
        attributions.append(attribute_layer(method, case, layer, rows, layer.group))
    combined = method.combine(case, [a.map for a in attributions])
    return Explanation(
        map=np.clip(combined, 0.0, 1.0).astype(np.float32),
        method=method.name,
        variant=variant,
        layers=tuple(attributions),
        target=case.target.describe(),
        base_score=case.base_score,
        prediction=case.prediction,
        runs=tuple(records),
        seconds=time.perf_counter() - started,
        provider=explainer.device,
    )


def _target_gradient(prepared: WindowedPrepared) -> np.ndarray:
    """∂T/∂F: T = Σ_R P_c of the fused output F (channels first), per channel and voxel."""
    target, case = prepared.case.target, prepared.case
    fused = prepared.output.astype(np.float64)
    region = np.ones(fused.shape[1:]) if case.region is None else case.region.astype(np.float64)
    seed = np.zeros_like(fused)
    c = target.class_index if target.channel_axis is not None else 0
    if target.activation == "none":
        seed[c] = region
    elif target.activation == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-fused[c]))
        seed[c] = region * p * (1.0 - p)
    else:  # softmax over the classes: ∂P_c/∂F_j = P_c (δ_cj − P_j)
        exp = np.exp(fused - fused.max(axis=0))
        probabilities = exp / exp.sum(axis=0)
        seed = -region * probabilities[c] * probabilities
        seed[c] += region * probabilities[c]
    return seed


def _seeded_channels(prepared: WindowedPrepared) -> int:
    target = prepared.case.target
    return target.classes if target.activation == "softmax" else 1


def _window_gradients(explainer: Explainer, prepared: WindowedPrepared) -> dict[str, np.ndarray]:
    """Each layer's ∂T/∂A over the windows touching the region, as (C, windows·positions):
    window p's output enters F with weight w_p/W, so its backward run is seeded with
    (w_p/W)·∂T/∂F on each output channel (one run per channel, linear in the seed)."""
    grid, case = prepared.grid, prepared.case
    target = case.target
    runner = explainer.gradient_runner((1, case.x.shape[1], *grid.window.patch))
    seed = np.zeros((prepared.output.shape[0], *grid.padded))
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(grid.pad, grid.spatial, strict=True))
    seed[(slice(None), *crop)] = _target_gradient(prepared)
    coverage = grid.coverage()
    channels = range(target.classes) if target.activation == "softmax" else [target.class_index]
    per_layer: dict[str, list[np.ndarray]] = {layer.name: [] for layer in prepared.layers}
    for index in prepared.touching:
        window = grid.slices(index)
        total: dict[str, np.ndarray] = {}
        for channel in channels:
            row = channel if target.channel_axis is not None else 0
            share = grid.weights / coverage[window]  # w_p / W on the window
            weights = (seed[(row, *window)] * share).astype(np.float32)
            if not weights.any():
                continue
            linear = replace(target, activation="none", class_index=channel)
            found: dict[str, np.ndarray] = {}
            runner.run(prepared.patches[index], prepared.layers, linear, weights, found)
            for name, gradient in found.items():
                total[name] = total[name] + gradient if name in total else gradient
        for layer in prepared.layers:
            gradient = total.get(layer.name)
            if gradient is not None:
                per_layer[layer.name].append(gradient.reshape(len(gradient), -1))
    return {
        name: np.concatenate(parts, axis=1) if parts else np.zeros((1, 1), np.float32)
        for name, parts in per_layer.items()
    }


class _Patches:
    """Window i of the padded input, (1, C, *patch), cut when asked for."""

    def __init__(self, padded: np.ndarray, grid: WindowGrid) -> None:
        self.padded, self.grid = padded, grid

    def __getitem__(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self.padded[(slice(None), *self.grid.slices(index))][None])


class _FusedActivations(Mapping):
    """Each layer's activations fused over the windows, at input resolution, made when a
    method asks for that layer and kept for the latest layer only: a volume's fused
    activations of every layer at once would not fit.

    The windows' own activations (at the layer's resolution) come from ``per_window`` when
    the observation kept them, else from ``observe_layer(name, window)``, one more pass of
    each window for that layer: memory for time, when keeping them would not fit."""

    def __init__(
        self,
        names: list[str],
        grid: WindowGrid,
        per_window: dict[str, list[np.ndarray]] | None,
        observe_layer: Callable[[str, int], np.ndarray],
    ) -> None:
        self._names, self._grid = names, grid
        self._per_window, self._observe_layer = per_window, observe_layer
        self._latest: tuple[str, np.ndarray] | None = None

    def _window(self, name: str, index: int) -> np.ndarray:
        if self._per_window is not None:
            return self._per_window[name][index]
        return self._observe_layer(name, index)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if self._latest is None or self._latest[0] != name:
            grid = self._grid
            total = None
            for index in range(len(grid)):
                full = upsample(self._window(name, index), grid.window.patch)
                if total is None:
                    total = np.zeros((full.shape[0], *grid.padded), np.float32)
                total[(slice(None), *grid.slices(index))] += full * grid.weights
            fused = _crop(total / grid.coverage().astype(np.float32), grid).astype(np.float32)
            self._latest = (name, fused)
        return self._latest[1]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _fused_observation(analysis, runner, patches, chosen, resolved, grid: WindowGrid):
    """The fused target output (C, *volume), and each layer's activations per window (kept
    when every window's fit in half the run budget, else observed again per layer)."""
    output_sum = None
    per_window: dict[str, list[np.ndarray]] | None = {layer.name: [] for layer in chosen}
    budget = runner.memory_budget or default_memory_budget("cpu")
    for index in range(len(grid)):
        seen = observe(analysis, runner.sessions, patches[index], chosen, resolved)
        values = channels_first(seen.outputs[resolved.output], resolved.channel_axis)[0]
        if output_sum is None:
            output_sum = np.zeros((values.shape[0], *grid.padded), np.float64)
            kept = sum(a.nbytes for a in seen.activations.values()) * len(grid)
            if kept > budget // 2:
                per_window = None
        output_sum[(slice(None), *grid.slices(index))] += values * grid.weights
        if per_window is not None:
            for name, activation in seen.activations.items():
                per_window[name].append(activation)
    fused = _crop(output_sum / grid.coverage(), grid).astype(np.float32)
    layers = {layer.name: layer for layer in chosen}

    def observe_layer(name: str, index: int) -> np.ndarray:
        seen = observe(analysis, runner.sessions, patches[index], [layers[name]], resolved)
        return seen.activations[name]

    return fused, _FusedActivations(list(layers), grid, per_window, observe_layer)


def _inside(grid: WindowGrid, index: int) -> tuple[slice, ...]:
    """Window ``index`` in the input's own (unpadded) coordinates."""
    return tuple(
        slice(max(window.start - lo, 0), min(window.stop - lo, size))
        for window, (lo, _), size in zip(grid.slices(index), grid.pad, grid.spatial, strict=True)
    )


def _extent(grid: WindowGrid, indices: list[int]) -> tuple[slice, ...]:
    """The box (padded coordinates) the windows ``indices`` cover together."""
    starts = grid.starts[indices]
    return tuple(
        slice(int(starts[:, axis].min()), int(starts[:, axis].max()) + patch)
        for axis, patch in enumerate(grid.window.patch)
    )


def _ablation_rows(
    runner,
    request: AblationRequest,
    case: WindowedCase,
    patches: _Patches,
    touching: list[int],
    grid: WindowGrid,
) -> np.ndarray:
    """The request's statistic rows on fused re-predictions; only windows touching the region
    are re-run (the statistics read nothing else)."""

    def rows_of(masks: np.ndarray, index: int) -> np.ndarray:
        parts = [
            channels_first(chunk.outputs[case.target.output], case.target.channel_axis)
            for chunk in runner.ablate(
                patches[index], request.layer, masks, form=request.form, use_suffix=True
            )
        ]
        return np.concatenate(parts)

    return _fused_rows(len(request.masks), lambda a, b, i: rows_of(request.masks[a:b], i),
                       request.statistic, case, touching, grid)  # fmt: skip


def _masked_rows(
    runner,
    request: MaskedInputRequest,
    case: WindowedCase,
    touching: list[int],
    grid: WindowGrid,
) -> np.ndarray:
    """The request's statistic rows for whole-volume masked inputs, each predicted through
    the windows that touch the region and fused."""
    analysis = runner.analysis
    session = runner.sessions.get(("full", None), lambda: analysis.model.proto)
    chunks = ChunkedRunner(session, runner.batch_cap)
    inputs: dict[tuple[int, int], np.ndarray] = {}  # the latest rows, padded

    def rows_of(start: int, stop: int, index: int) -> np.ndarray:
        if (start, stop) not in inputs:
            inputs.clear()
            rows = request.make_inputs(start, stop)
            inputs[(start, stop)] = np.stack([grid.padded_input(row) for row in rows])
        batch = np.ascontiguousarray(inputs[(start, stop)][(slice(None), slice(None),
                                                            *grid.slices(index))])  # fmt: skip
        name, output = analysis.input.name, case.target.output
        ran = chunks.run_batched({}, {name: batch}, [output], len(batch))
        return channels_first(ran[output], case.target.channel_axis)

    return _fused_rows(request.count, rows_of, request.statistic, case, touching, grid)


def _fused_rows(count, rows_of, statistic, case: WindowedCase, touching, grid) -> np.ndarray:
    """Statistic rows of ``count`` re-predictions, ``rows_of(start, stop, window)`` giving
    each window's outputs (rows, C, *patch); fused only over the box the touching windows
    cover, which holds the whole region."""
    box = _extent(grid, touching)
    inside = tuple(  # the box, in the input's own coordinates
        slice(max(b.start - lo, 0), min(b.stop - lo, size))
        for b, (lo, _), size in zip(box, grid.pad, grid.spatial, strict=True)
    )
    keep = tuple(  # the part of the box that is not padding
        slice(i.start + lo - b.start, i.stop + lo - b.start)
        for i, b, (lo, _) in zip(inside, box, grid.pad, strict=True)
    )
    coverage = grid.coverage()[box]
    cropped = replace(
        case,
        prediction=case.prediction[inside],
        region=None if case.region is None else case.region[inside],
    )
    rows = []
    for start in range(0, count, ROWS_PER_PASS):
        stop = min(start + ROWS_PER_PASS, count)
        total = None
        for index in touching:
            values = rows_of(start, stop, index)
            if total is None:
                total = np.zeros((stop - start, values.shape[1], *coverage.shape), np.float64)
            where = tuple(
                slice(w.start - b.start, w.stop - b.start)
                for w, b in zip(grid.slices(index), box, strict=True)
            )
            total[(slice(None), slice(None), *where)] += values * grid.weights
        fused = (total / np.where(coverage > 0, coverage, 1.0))[(slice(None), slice(None), *keep)]
        probabilities = case.target.probabilities(
            _model_layout(fused.astype(np.float32), case.target)
        )
        rows.append(statistic.reduce(probabilities, cropped))
    return np.concatenate(rows)


def _model_layout(values: np.ndarray, target: ResolvedTarget) -> np.ndarray:
    """(N, C, *S) back to the output's own layout, which the target reads."""
    return (
        values[:, 0] if target.channel_axis is None else np.moveaxis(values, 1, target.channel_axis)
    )


def _crop(values: np.ndarray, grid: WindowGrid) -> np.ndarray:
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(grid.pad, grid.spatial, strict=True))
    return values[(slice(None), *crop)]

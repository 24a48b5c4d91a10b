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

Covered: kernel ablations (KWC, Ablation-CAM) and masked inputs (Score-CAM: each whole-volume
masked input predicted through the windows and fused). Gradients through the blend (Grad-CAM,
Grad-CAM++) are not yet; they are refused by name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from segattr_onnx.arrays import upsample
from segattr_onnx.errors import MethodError
from segattr_onnx.explainer import Explainer
from segattr_onnx.explanation import Explanation, LayerAttribution, RunRecord
from segattr_onnx.methods.base import (
    VARIANTS,
    AblationRequest,
    AttributionMethod,
    Case,
    MaskedInputRequest,
)
from segattr_onnx.methods.layers import is_group_selection, select_layers
from segattr_onnx.methods.registry import create_method
from segattr_onnx.runtime.chunks import ChunkedRunner
from segattr_onnx.runtime.observation import observe
from segattr_onnx.sliding_window import SlidingWindow, WindowGrid
from segattr_onnx.target import ResolvedTarget, Target, default_output, region_sum

ROWS_PER_PASS = 16  # ablation rows fused at once: bounds the (rows, C, *volume) accumulator


@dataclass(frozen=True)
class WindowedCase(Case):
    """A case whose prediction and activations are fused over windows, on the volume's grid."""

    volume_shape: tuple[int, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.volume_shape


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
    if variant not in VARIANTS:
        raise MethodError(f"variant {variant!r} is unknown; use 'p1' or 'p2'")
    method = create_method(method) if isinstance(method, str) else method
    if method.uses_gradients:
        raise MethodError(
            f"{method.name} through a sliding window is not supported yet (gradients through "
            "the blend); use kwc or ablationcam, or explain the whole input"
        )
    array = explainer.shaped_input(x)
    if explainer.input_channel_axis() != 1:
        raise MethodError("sliding-window explanations take channels-first models for now")
    image = array[0]
    grid = window.grid(image.shape[1:])
    padded = grid.padded_input(image)
    runner = explainer.local_executor((1, image.shape[0], *window.patch)).runner
    analysis = runner.analysis
    target = target or Target()
    if target.output is None and is_group_selection(layers):
        target = replace(target, output=default_output(analysis))
    chosen = select_layers(analysis, layers, target.output)
    resolved = target.resolve(analysis, chosen)
    patches = [padded[(slice(None), *grid.slices(i))][None] for i in range(len(grid))]

    # One pass per window: the prediction and every layer's activations, fused.
    outputs, activations = _fused_observation(analysis, runner, patches, chosen, resolved, grid)
    prediction = resolved.probabilities(_model_layout(outputs[None], resolved))[0]
    region = resolved.region_mask(_model_layout(outputs[None], resolved))
    base_score = float(region_sum(prediction[None], region)[0])
    if not base_score > 0:
        raise MethodError(
            f"the target score of the fused prediction is {base_score:g}: the model predicts "
            f"nothing for class {resolved.class_index} in the region"
        )
    touching = [i for i in range(len(grid)) if region is None or region[grid.slices(i)].any()]
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
    records = [RunRecord("observation", None, "observed", 0, len(grid), len(grid), 1)]
    attributions = []
    for layer in chosen:
        rows = []
        for request in method.requests(case, layer):
            if isinstance(request, AblationRequest):
                rows.append(_ablation_rows(runner, request, case, patches, touching, grid))
                purpose, graph, count = "ablation", "suffix", len(request.masks)
            elif isinstance(request, MaskedInputRequest):
                rows.append(_masked_rows(runner, request, case, touching, grid))
                purpose, graph, count = "masked-input", "full", request.count
            else:
                raise MethodError(f"{method.name} through a sliding window is not supported yet")
            records.append(
                RunRecord(
                    purpose,
                    layer.name,
                    graph,
                    0,
                    passes=count * len(touching),
                    session_runs=0,
                    batch_size=0,
                    skipped_windows=len(grid) - len(touching),
                )
            )
        weights = method.kernel_weights(case, layer, rows)
        layer_map = method.layer_map(case, layer, weights)
        attributions.append(
            LayerAttribution(layer.name, layer.group, weights.weights, weights.terms, layer_map)
        )
    combined = method.combine(case, [a.map for a in attributions])
    return Explanation(
        map=np.clip(combined, 0.0, 1.0).astype(np.float32),
        method=method.name,
        variant=variant,
        layers=tuple(attributions),
        target=resolved.describe(),
        base_score=base_score,
        prediction=prediction,
        runs=tuple(records),
        seconds=time.perf_counter() - started,
        provider=explainer.device,
    )


def _fused_observation(analysis, runner, patches, chosen, resolved, grid: WindowGrid):
    """The fused target output (C, *volume) and each layer's fused activations."""
    output_sum = None
    activation_sums: dict[str, np.ndarray] = {}
    for index, patch in enumerate(patches):
        seen = observe(analysis, runner.sessions, patch, chosen, resolved)
        values = _channels_first(seen.outputs[resolved.output], resolved)[0]
        if output_sum is None:
            output_sum = np.zeros((values.shape[0], *grid.padded), np.float64)
        window = (slice(None), *grid.slices(index))
        output_sum[window] += values * grid.weights
        for name, activation in seen.activations.items():
            full = upsample(activation, grid.window.patch)
            if name not in activation_sums:
                activation_sums[name] = np.zeros((full.shape[0], *grid.padded), np.float32)
            activation_sums[name][window] += full * grid.weights
    coverage = grid.coverage()
    fused = _crop(output_sum / coverage, grid).astype(np.float32)
    activations = {
        name: _crop(total / coverage.astype(np.float32), grid).astype(np.float32)
        for name, total in activation_sums.items()
    }
    return fused, activations


def _ablation_rows(
    runner,
    request: AblationRequest,
    case: WindowedCase,
    patches: list[np.ndarray],
    touching: list[int],
    grid: WindowGrid,
) -> np.ndarray:
    """The request's statistic rows on fused re-predictions; only windows touching the region
    are re-run (the statistics read nothing else)."""
    target = case.target
    coverage = grid.coverage()
    rows = []
    for start in range(0, len(request.masks), ROWS_PER_PASS):
        masks = request.masks[start : start + ROWS_PER_PASS]
        total = None
        for index in touching:
            window = (slice(None), slice(None), *grid.slices(index))
            for chunk in runner.ablate(
                patches[index], request.layer, masks, form=request.form, use_suffix=True
            ):
                values = _channels_first(chunk.outputs[target.output], target)
                if total is None:
                    total = np.zeros((len(masks), values.shape[1], *grid.padded), np.float64)
                total[(slice(chunk.start, chunk.stop), *window[1:])] += values * grid.weights
        fused = _crop_rows(total / np.where(coverage > 0, coverage, 1.0), grid)
        probabilities = target.probabilities(_model_layout(fused.astype(np.float32), target))
        rows.append(request.statistic.reduce(probabilities, case))
    return np.concatenate(rows)


def _masked_rows(
    runner,
    request: MaskedInputRequest,
    case: WindowedCase,
    touching: list[int],
    grid: WindowGrid,
) -> np.ndarray:
    """The request's statistic rows for whole-volume masked inputs, each predicted through
    the windows that touch the region and fused."""
    target = case.target
    analysis = runner.analysis
    session = runner.sessions.get(("full", None), lambda: analysis.model.proto)
    chunks = ChunkedRunner(session, runner.batch_cap)
    coverage = grid.coverage()
    rows = []
    for start in range(0, request.count, ROWS_PER_PASS):
        stop = min(start + ROWS_PER_PASS, request.count)
        padded = np.stack([grid.padded_input(row) for row in request.make_inputs(start, stop)])
        total = None
        for index in touching:
            window = (slice(None), slice(None), *grid.slices(index))
            batch = np.ascontiguousarray(padded[window])
            ran = chunks.run_batched({}, {analysis.input.name: batch}, [target.output], len(batch))
            values = _channels_first(ran[target.output], target)
            if total is None:
                total = np.zeros((stop - start, values.shape[1], *grid.padded), np.float64)
            total[window] += values * grid.weights
        fused = _crop_rows(total / np.where(coverage > 0, coverage, 1.0), grid)
        probabilities = target.probabilities(_model_layout(fused.astype(np.float32), target))
        rows.append(request.statistic.reduce(probabilities, case))
    return np.concatenate(rows)


def _channels_first(values: np.ndarray, target: ResolvedTarget) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return (
        values[:, None]
        if target.channel_axis is None
        else np.moveaxis(values, target.channel_axis, 1)
    )


def _model_layout(values: np.ndarray, target: ResolvedTarget) -> np.ndarray:
    """(N, C, *S) back to the output's own layout, which the target reads."""
    return (
        values[:, 0] if target.channel_axis is None else np.moveaxis(values, 1, target.channel_axis)
    )


def _crop(values: np.ndarray, grid: WindowGrid) -> np.ndarray:
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(grid.pad, grid.spatial, strict=True))
    return values[(slice(None), *crop)]


def _crop_rows(values: np.ndarray, grid: WindowGrid) -> np.ndarray:
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(grid.pad, grid.spatial, strict=True))
    return values[(slice(None), slice(None), *crop)]

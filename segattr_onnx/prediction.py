"""The model's own output for one input: whole, or fused from a sliding window as deployed.

``segattr predict`` writes it, and it is what an explanation explains: when a model card says
the model runs patch by patch (``[inference]``), the prediction is the blend of the patches'
outputs (``sliding_window.py``), never the output of a resized volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from segattr_onnx.errors import InputDataError
from segattr_onnx.explainer import Explainer
from segattr_onnx.progress import make_progress
from segattr_onnx.runtime.work import LazyRows
from segattr_onnx.sliding_window import SlidingWindow, channels_first
from segattr_onnx.target import Target


@dataclass(frozen=True)
class Prediction:
    """An output of the model as (C, *spatial) float32 on the input's grid."""

    values: np.ndarray = field(repr=False)
    output: str
    windows: int  # patches run; 1 for a whole-input run
    session_runs: int
    seconds: float

    def summary(self) -> dict:
        return {
            "output": self.output,
            "shape": list(self.values.shape),
            "windows": self.windows,
            "session_runs": self.session_runs,
            "seconds": round(self.seconds, 3),
        }


def predict(
    explainer: Explainer,
    x: np.ndarray,
    window: SlidingWindow | None = None,
    output: str | None = None,
    progress: bool | object = False,
) -> Prediction:
    """``output`` (default: the segmentation output explanations explain) for ``x``, as the
    model's own last layer leaves it (no activation added), channels first.

    With ``window``, the input is covered by patches and their outputs blended; without, the
    model runs once on the whole input.
    """
    started = time.perf_counter()
    array = explainer.shaped_input(x)
    channel_axis = explainer.input_channel_axis()
    run_shape = array.shape
    if window is not None:
        run_shape = _with_spatial(array.shape, channel_axis, window.patch)
    executor = explainer.local_executor(run_shape)
    runner = executor.runner
    analysis = runner.analysis
    resolved = Target(output=output).resolve(analysis)
    session = runner.sessions.get(("full", None), lambda: analysis.model.proto)
    from segattr_onnx.runtime.chunks import ChunkedRunner

    chunks = ChunkedRunner(session, runner.batch_cap)
    name = analysis.input.name
    if window is None:
        (values,) = [chunks.run({name: array}, [resolved.output])[resolved.output]]
        fused = channels_first(values, resolved.channel_axis)[0]
        return Prediction(fused, resolved.output, 1, chunks.runs, time.perf_counter() - started)
    image = np.moveaxis(array[0], channel_axis - 1, 0)  # (C, *spatial)
    grid = window.grid(image.shape[1:])
    padded = grid.padded_input(image)

    def patches(start: int, stop: int) -> np.ndarray:
        stack = np.stack([padded[(slice(None), *grid.slices(i))] for i in range(start, stop)])
        return np.moveaxis(stack, 1, channel_axis)  # back to the model's layout

    bar = make_progress(progress, len(grid), f"prediction: {len(grid)} windows")
    try:
        feeds = {name: LazyRows(len(grid), patches)}
        ran = chunks.iter_chunks({}, feeds, [resolved.output], window.batch, bar.update)
        outputs = (
            (chunk.start, channels_first(chunk.outputs[resolved.output], resolved.channel_axis))
            for chunk in ran
        )
        channels = _output_channels(analysis, resolved)
        fused = grid.fuse(outputs, channels)
    finally:
        bar.close()
    return Prediction(fused, resolved.output, len(grid), chunks.runs, time.perf_counter() - started)


def _with_spatial(shape: tuple[int, ...], channel_axis: int, spatial: tuple[int, ...]):
    axes = [a for a in range(1, len(shape)) if a != channel_axis]
    if len(axes) != len(spatial):
        raise InputDataError(
            f"the patch {list(spatial)} has {len(spatial)} dims but the input has "
            f"{len(axes)} spatial dims"
        )
    result = list(shape)
    for axis, size in zip(axes, spatial, strict=True):
        result[axis] = size
    return tuple(result)


def _output_channels(analysis, resolved) -> int:
    if resolved.channel_axis is None:
        return 1
    shape = analysis.tensors[resolved.output].shape
    return int(shape[resolved.channel_axis])

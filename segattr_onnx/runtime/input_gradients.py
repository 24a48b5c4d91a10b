"""Input-gradient runs: ∂T/∂x for many inputs at once, from one backward model per batch size.

Integrated Gradients and SmoothGrad need the gradient of T = Σ_R P at tens of inputs (points on
a path, noisy copies). Their rows are independent, so they run batched: several rows per ONNX
Runtime run through a backward model built for exactly that batch size
(``graph/gradient_model.build_input_gradient_model``). Only the mean gradient is kept: rows
are made a chunk at a time and summed as they come back, so a 3D case never holds every
row, nor every gradient, at once.

One batch size serves every chunk: K rows in batches of at most B run as ⌈K/B⌉ chunks of the
same size B' = ⌈K/⌈K/B⌉⌉, the last one padded with copies of its last row (fewer than ⌈K/B⌉
padded rows in all, never a second model for the remainder).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from segattr_onnx.errors import (
    GradientRuleError,
    ModelFileError,
    ModelRunError,
    ShapeInferenceError,
)
from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.graph.gradient_model import build_input_gradient_model
from segattr_onnx.graph.heads import ScoreHeadSpec
from segattr_onnx.graph.shapes import activation_bytes_per_item
from segattr_onnx.progress import Progress
from segattr_onnx.runtime.chunks import BatchCap, BatchFallbackWarning, ChunkedRunner, chunk_size
from segattr_onnx.runtime.gradients import target_feeds
from segattr_onnx.runtime.score_heads import ScoreHeads
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.target import ResolvedTarget, region_sum

INPUT_GRADIENT_MODELS_KEPT = 4  # backward models kept per input size (target head × batch)
# A backward pass keeps the forward activations until the backward nodes have read them, and
# its gradients are as large again: twice the forward pass's activations per item.
BACKWARD_FACTOR = 2

InputGradientModel = tuple[onnx.ModelProto, ScoreHeadSpec, str]


@dataclass(frozen=True)
class GradientInputs:
    """The inputs at which a method takes ∂T/∂x: ``count`` rows, ``make(start, stop)`` giving
    rows [start, stop) in the model's layout and dtype (built a chunk at a time)."""

    count: int
    make: Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class InputGradientPlan:
    """How K rows run: ``runs`` session runs of ``batch_size`` rows each."""

    rows: int
    batch_size: int

    @property
    def runs(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    @property
    def passes(self) -> int:
        """Forward+backward passes, the padding of the last chunk included."""
        return self.runs * self.batch_size


class InputGradientRunner:
    """Builds, keeps and runs the input backward models of one analysed model."""

    def __init__(
        self,
        analysis: ModelAnalysis,
        sessions: SessionCache,
        heads: ScoreHeads,
        batch_cap: BatchCap,
    ) -> None:
        self.analysis = analysis
        self.sessions = sessions
        self.heads = heads  # T is the score head's sum: the same spec as the other heads
        self.batch_cap = batch_cap  # shared with the model's other runs
        self._models: OrderedDict[tuple, InputGradientModel] = OrderedDict()

    @functools.cached_property
    def bytes_per_item(self) -> int | None:
        """One row's cost in a backward run (None: unknown), from the forward activations."""
        forward = activation_bytes_per_item(self.analysis.model.proto, self.analysis.tensors)
        return BACKWARD_FACTOR * forward if forward else None

    def plan(
        self,
        rows: int,
        memory_budget: int | None,
        whole_process: bool,
        cache_bytes: int | None = None,
    ) -> InputGradientPlan:
        """Rows per run: what the budget (and on the CPU ``cache_bytes``) holds, 1 for a model
        whose batch is fixed or seen to mix its rows, evened out over the runs."""
        largest = self.batch_cap.apply(
            chunk_size(
                rows,
                self.bytes_per_item,
                memory_budget,
                not self.analysis.input.dynamic_batch,
                whole_process=whole_process,
                cache_bytes=cache_bytes,
            )
        )
        runs = math.ceil(rows / largest)
        return InputGradientPlan(rows, math.ceil(rows / runs))

    def mean_gradient(
        self,
        inputs: GradientInputs,
        target: ResolvedTarget,
        region: np.ndarray | None,
        plan: InputGradientPlan,
        progress: Progress,
    ) -> tuple[np.ndarray, InputGradientPlan, int]:
        """(1/K) Σ_i ∂T/∂x at each row, in the model's layout with a batch axis of 1, float64;
        T's region is ``region`` (None: all voxels) for every row. Also returns the plan that
        ran (one row at a time when a batch failed) and the backward model's node count."""
        if plan.batch_size > 1:
            try:
                return self._mean_gradient(inputs, target, region, plan, progress)
            except (ModelRunError, ModelFileError, ShapeInferenceError):
                # Some exports declare a free batch but hard-code 1 inside: the batched model
                # does not load, or its first run fails. Rule or target errors are the same
                # at every batch size, and pass.
                warnings.warn(
                    f"the backward model fails on a batch of {plan.batch_size} although the "
                    "model's batch dim is free (it likely hard-codes batch 1 inside); running "
                    "one input at a time",
                    BatchFallbackWarning,
                    stacklevel=4,  # the caller of Explainer.explain
                )
                self.batch_cap.limit = 1
                plan = InputGradientPlan(plan.rows, 1)
        return self._mean_gradient(inputs, target, region, plan, progress)

    def _mean_gradient(
        self,
        inputs: GradientInputs,
        target: ResolvedTarget,
        region: np.ndarray | None,
        plan: InputGradientPlan,
        progress: Progress,
    ) -> tuple[np.ndarray, InputGradientPlan, int]:
        batch = plan.batch_size
        model, spec, gradient = self.model(target, batch)
        # As for the layer gradients (runtime/gradients.py): the NCHWc layout transform costs
        # the backward graph more than it saves.
        session = self.sessions.get(
            ("input-gradients", spec, batch),
            lambda: model,
            disabled_optimizers=("NchwcTransformer",),
        )
        runner = ChunkedRunner(session)
        feeds = target_feeds(self.analysis, spec, target, region)
        total: np.ndarray | None = None
        for start in range(0, plan.rows, batch):
            stop = min(start + batch, plan.rows)
            rows = np.asarray(inputs.make(start, stop))
            if stop - start < batch:  # the last chunk: padded to the model's batch
                padding = np.repeat(rows[-1:], batch - (stop - start), axis=0)
                rows = np.concatenate([rows, padding])
            values = runner.run({self.analysis.input.name: rows, **feeds}, [gradient])
            kept = values[gradient][: stop - start].astype(np.float64)
            part = kept.sum(axis=0, keepdims=True)
            total = part if total is None else total + part
            progress.update(batch)
        assert total is not None
        return total / plan.rows, plan, len(model.graph.node)

    def target_score(
        self, x: np.ndarray, target: ResolvedTarget, region: np.ndarray | None
    ) -> tuple[float, int]:
        """T = Σ_R P of one input (batch axis of 1) from one run of the unmodified model, and
        that model's node count."""
        model = self.analysis.model.proto
        session = self.sessions.get(("full", None), lambda: model)
        output = ChunkedRunner(session).run({self.analysis.input.name: x}, [target.output])
        probabilities = target.probabilities(output[target.output])
        return float(region_sum(probabilities, region)[0]), len(model.graph.node)

    def model(self, target: ResolvedTarget, batch: int) -> InputGradientModel:
        """The model plus T per row and ∂T/∂x for ``batch`` rows; also the head's spec and
        the gradient's output name. Built once per (target head, batch size)."""
        image = self.analysis.tensors.get(self.analysis.input.name)
        if image is not None and not image.is_float:
            raise GradientRuleError(
                f"the model's input {self.analysis.input.name!r} holds {image.numpy_dtype} "
                "values, which have no gradient; explain it with a layer method (gradcam, "
                "kwc, scorecam, ablationcam)"
            )
        spec = self.heads.spec(target)
        key = (spec, batch)
        if key in self._models:
            self._models.move_to_end(key)
        else:
            model, gradient, _score = build_input_gradient_model(self.analysis, target, spec, batch)
            self._models[key] = (model, spec, gradient)
            while len(self._models) > INPUT_GRADIENT_MODELS_KEPT:
                self._models.popitem(last=False)
        return self._models[key]

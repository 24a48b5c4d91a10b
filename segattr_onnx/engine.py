"""Plans what methods ask for: which graph each request runs, in which batches, and what is reused.

A case starts with one observation pass of the full model (``runtime/observation.py``), or
with the backward graph's one run when that can observe too (``runtime/gradients.py``). Each
ablation request then runs only the sub-graph after its layer, fed from the observation; each
masked-input request runs the full model; gradient requests share one backward run. The plan
counts only the rows the case memo (``runtime/memo.py``) does not already hold, sizes batches
to the memory budget, and runs the batch-consistency check (``runtime/batch_check.py``) before
the first batched request. ``dispatch.py`` runs the plan through ``executor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from segattr_onnx.dispatch import Dispatcher, PlannedWork
from segattr_onnx.errors import TargetError
from segattr_onnx.explanation import RunRecord
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.heads import ScoreHeadSpec
from segattr_onnx.graph.shapes import activation_bytes_per_item
from segattr_onnx.methods.base import (
    AblationRequest,
    Case,
    GradientRequest,
    MaskedInputRequest,
    Request,
)
from segattr_onnx.progress import Progress
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.batch_check import BatchCheck
from segattr_onnx.runtime.chunks import chunk_size, planned_runs
from segattr_onnx.runtime.gradients import GradientRunner
from segattr_onnx.runtime.memo import CaseMemo, ablation_key, case_key, row_keys
from segattr_onnx.runtime.observation import Observation, boundary_names, observe
from segattr_onnx.runtime.score_heads import ScoreHeads
from segattr_onnx.runtime.work import Executor, LocalExecutor
from segattr_onnx.target import ResolvedTarget
from segattr_onnx.text import setting

__all__ = ["AttributionEngine", "CaseMemo", "Observation", "PlannedWork", "case_key"]


class AttributionEngine:
    """Plans, then has run, the observation, ablation, masked-input and gradient work of one
    analysed model (one input size)."""

    def __init__(
        self,
        analysis: ModelAnalysis,
        ablation: AblationRunner,
        reduce_in_graph: bool = True,
    ) -> None:
        self.analysis = analysis
        self.ablation = ablation
        # What runs the ablations' work items: this process's sessions unless replaced.
        self.executor: Executor = LocalExecutor(ablation)
        self.sessions = ablation.sessions
        self.batch_check = BatchCheck(analysis, ablation)
        self.heads = ScoreHeads(analysis, ablation.sessions, enabled=reduce_in_graph)
        self.gradients = GradientRunner(analysis, ablation.sessions, self.heads)
        self.dispatch = Dispatcher(analysis, ablation, self.heads, self.gradients)
        self._full_bytes_per_item = activation_bytes_per_item(
            analysis.model.proto, analysis.tensors
        )

    # ------------------------------------------------------------------ before a case
    def check_batch_consistency(self, seed: int = 0) -> None:
        """Make sure, before the first batched run, that the model keeps the cases of a batch
        apart. The check costs three forward passes of the full model and only batched runs
        depend on it, so it runs when the first of those is planned, not here."""
        self.batch_check.schedule(seed)

    # ------------------------------------------------------------------ observation
    def boundary_names(self, layers: Sequence[KernelLayer], form: str | None) -> list[str]:
        """Tensors of the original graph that the suffixes of ``layers`` read from outside."""
        return boundary_names(self.ablation, layers, form)

    def observe(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        boundaries: Sequence[str] = (),
    ) -> Observation:
        """One full pass exposing activations and suffix inputs; ``boundaries`` may be empty."""
        return observe(self.analysis, self.sessions, x, layers, target, boundaries)

    def can_observe_with_gradients(self, target: ResolvedTarget) -> bool:
        """True when the backward graph's one run can also be the observation: the seed of T
        is known before the prediction is."""
        return self.gradients.can_observe(target)

    def observe_with_gradients(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        memo: CaseMemo,
    ) -> Observation:
        """The observation and ∂T/∂A of every layer (kept in ``memo``) from one run of the
        backward graph: a gradient method's one and only pass."""
        return self.gradients.observe(x, layers, target, memo.gradients)

    def gradient_model(
        self, target: ResolvedTarget, layer_names: Sequence[str]
    ) -> tuple[onnx.ModelProto, ScoreHeadSpec, dict[str, str]]:
        """The model plus T = Σ_R P and ∂T/∂A_ℓ of each layer's raw output, as outputs."""
        return self.gradients.model(target, layer_names)

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        requests: Sequence[Request],
        memo: CaseMemo,
        use_suffix: bool,
        observed_boundaries: set[str],
        target: ResolvedTarget,
        memory_budget: int,
    ) -> list[PlannedWork]:
        """How every request will run, counting only rows the memo does not already hold."""
        work: list[PlannedWork] = []
        self.ablation.tables.forget_expected()  # this plan announces its own tables
        if any(isinstance(r, AblationRequest | MaskedInputRequest) for r in requests):
            self.batch_check.settle()  # batch sizes below depend on its verdict
        for request in requests:
            if isinstance(request, AblationRequest):
                work.append(
                    self._plan_ablation(
                        request, memo, use_suffix, observed_boundaries, target, memory_budget
                    )
                )
            elif isinstance(request, MaskedInputRequest):
                work.append(self._plan_masked(request, memory_budget))
            elif isinstance(request, GradientRequest):
                work.append(self._plan_gradient(request, requests, memo, work))
            else:
                raise TypeError(f"unknown request type {type(request).__name__}")
        return work

    def _plan_ablation(
        self,
        request: AblationRequest,
        memo: CaseMemo,
        use_suffix: bool,
        observed_boundaries: set[str],
        target: ResolvedTarget,
        memory_budget: int,
    ) -> PlannedWork:
        """The suffix after the layer (or the whole rewritten model), for the rows not yet in
        the memo; one prefix run when the observation lacks the suffix's inputs."""
        ablated = self.ablation.ablated(request.layer, request.form)
        if use_suffix and target.output not in ablated.suffix.outputs:
            raise TargetError(
                f"output {target.output!r} does not depend on layer {request.layer!r}; "
                f"select layers that feed it ({setting('--layers', 'layers=')}) or another output "
                f"({setting('--output-name', 'Target(output=...)')})"
            )
        stored = memo.rows.get(ablation_key(request, use_suffix), {})
        missing = np.array(
            [i for i, key in enumerate(row_keys(request.masks)) if key not in stored],
            dtype=np.int64,
        )
        batch = self.ablation.batch_size(ablated, max(len(missing), 1), use_suffix, memory_budget)
        extra_runs = 0
        if use_suffix:
            needs_prefix = len(missing) > 0 and not set(ablated.suffix.boundary_inputs) <= (
                observed_boundaries
            )
            graph, nodes = "suffix", ablated.suffix.node_count
            # Rows that start after the layer's linear readers (runtime/linear_ablation.py);
            # a record saying "suffix" is a layer that fell back to the whole suffix.
            schedule = self.ablation.linear_schedule(
                ablated, request.masks[missing], memory_budget, announce=len(missing) > 0
            )
            if len(missing) and schedule is not None:
                graph, nodes = "linear", schedule.plan.node_count
                extra_runs = schedule.layer_runs
                batch = self.ablation.batch_size(
                    ablated, len(missing), True, memory_budget, linear=True
                )
            elif len(missing) and ablated.suffix_hoisted is not None:
                extra_runs = 1  # the suffix's part that reads only shared tensors, once
        else:
            needs_prefix = False
            graph, nodes = "full", len(ablated.model.graph.node)
        return PlannedWork(
            request=request,
            missing=missing,
            graph=graph,
            graph_nodes=nodes,
            batch_size=batch,
            session_runs=(
                schedule.session_runs(batch)
                if graph == "linear"
                else planned_runs(len(missing), batch) + extra_runs
            ),
            prefix_runs=int(needs_prefix),
            extra_runs=extra_runs,
        )

    def _plan_masked(self, request: MaskedInputRequest, memory_budget: int) -> PlannedWork:
        """Every masked input through the full model, in batches the budget holds."""
        streams = self.ablation.streams_for(self._full_bytes_per_item, memory_budget)
        batch = self.ablation.batch_cap.apply(
            chunk_size(
                request.count,
                self._full_bytes_per_item,
                memory_budget,
                not self.analysis.input.dynamic_batch,
                whole_process=self.ablation.bounds_process,
                cache_bytes=self.ablation.cache_bytes,
                streams=streams,
            )
        )
        return PlannedWork(
            request=request,
            missing=np.arange(request.count),
            graph="full",
            graph_nodes=len(self.analysis.model.proto.graph.node),
            batch_size=batch,
            session_runs=planned_runs(request.count, batch),
            prefix_runs=0,
            streams=streams,
        )

    def _plan_gradient(
        self,
        request: GradientRequest,
        requests: Sequence[Request],
        memo: CaseMemo,
        planned: list[PlannedWork],
    ) -> PlannedWork:
        """The first gradient request carries the one backward pass for all of them."""
        # Keyed on every requested layer, not just the missing ones, so the same selection
        # always reuses the same backward model and session.
        layers = tuple(dict.fromkeys(r.layer for r in requests if isinstance(r, GradientRequest)))
        missing = any(layer not in memo.gradients for layer in layers)
        first = missing and not any(w.gradient_layers for w in planned)
        return PlannedWork(
            request=request,
            missing=np.arange(1 if first else 0),
            graph="backward",
            graph_nodes=0,
            batch_size=1,
            session_runs=1 if first else 0,
            prefix_runs=0,
            gradient_layers=layers if first else (),
        )

    # ------------------------------------------------------------------ running the plan
    def execute(
        self,
        work: PlannedWork,
        case: Case,
        memo: CaseMemo,
        observation: Observation,
        use_suffix: bool,
        progress: Progress,
        memory_budget: int,
        upcoming: PlannedWork | None = None,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        """The request's statistic rows (all of them, memo included) and what ran; ablation
        and masked-input work go through ``executor``. ``upcoming``: the work that runs next,
        whose start the executor may make while this one runs."""
        if upcoming is not None:
            self.dispatch.announce(
                work, upcoming, case, observation, use_suffix, memory_budget, self.executor
            )
        return self.dispatch.run(
            work, case, memo, observation, use_suffix, progress, memory_budget, self.executor
        )

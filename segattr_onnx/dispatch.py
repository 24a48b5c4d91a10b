"""Runs what the engine planned: each request's missing rows, through its path, as statistic rows.

``engine.py`` decides what runs (graphs, batches, reuse); this module only runs it.
Ablation and masked-input work go to the engine's executor as plain work items
(``runtime/work.py``) and come back chunk by chunk; each chunk is reduced to rows at once, in
the graph's score head or on the host. Ablation rows are kept in the case memo, so a request's
result is its memo rows and its new ones, in order. Gradient work is the one backward run.
Every path also says what ran, as run records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segattr_onnx.explanation import RunRecord
from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.methods.base import (
    AblationRequest,
    Case,
    GradientRequest,
    MaskedInputRequest,
    Request,
)
from segattr_onnx.progress import Progress
from segattr_onnx.runtime.ablation import AblationRunner, PrefixResult
from segattr_onnx.runtime.chunks import OutputHead
from segattr_onnx.runtime.gradients import GradientRunner
from segattr_onnx.runtime.memo import CaseMemo, ablation_key, row_keys
from segattr_onnx.runtime.observation import Observation
from segattr_onnx.runtime.score_heads import ScoreHeads, statistic_rows
from segattr_onnx.runtime.work import AblationWork, Executor, InputsWork


@dataclass(frozen=True)
class PlannedWork:
    """One request, the rows of it still to compute, and how they will run."""

    request: Request
    missing: np.ndarray  # indices of request rows not in the memo
    graph: str
    graph_nodes: int
    batch_size: int
    session_runs: int
    prefix_runs: int  # 1 when the suffix's inputs were not in the observation pass
    gradient_layers: tuple[str, ...] = ()  # layers the one backward pass computes
    # Runs besides the chunks: a linear tail's readers and per-reader contributions, once
    extra_runs: int = 0
    streams: int = 1  # chunks in flight at once (runtime/cpu_streams.py)

    @property
    def passes(self) -> int:
        return len(self.missing) + self.prefix_runs


class Dispatcher:
    """Runs each planned request of one analysed model by its kind."""

    def __init__(
        self,
        analysis: ModelAnalysis,
        ablation: AblationRunner,
        heads: ScoreHeads,
        gradients: GradientRunner,
    ) -> None:
        self.analysis = analysis
        self.ablation = ablation
        self.heads = heads
        self.gradients = gradients

    def run(
        self,
        work: PlannedWork,
        case: Case,
        memo: CaseMemo,
        observation: Observation,
        use_suffix: bool,
        progress: Progress,
        memory_budget: int,
        executor: Executor,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        """The request's statistic rows (all of them, memo included) and what ran."""
        request = work.request
        if isinstance(request, GradientRequest):
            return self._gradient(work, request, case, memo, progress)
        head = self.heads.head(case, request.statistic)
        if isinstance(request, MaskedInputRequest):
            return self._masked(work, request, case, progress, head, executor)
        assert isinstance(request, AblationRequest)
        return self._ablation(
            work,
            request,
            case,
            memo,
            observation,
            use_suffix,
            progress,
            head,
            memory_budget,
            executor,
        )

    def announce(
        self,
        current: PlannedWork,
        work: PlannedWork,
        case: Case,
        observation: Observation,
        use_suffix: bool,
        memory_budget: int,
        executor: Executor,
    ) -> None:
        """Tell an executor that can start work ahead (this process's) which ablation rows run
        after ``current``: those whose suffix inputs the observation pass already holds. Only
        when ``current`` runs ablation rows there itself: its loop is what starts the next
        one (any other work would leave the announcement to whichever loop comes next)."""
        expect = getattr(executor, "expect_ablation", None)
        request = work.request
        if expect is None or not getattr(executor, "starts_ahead", False):
            return
        if not isinstance(current.request, AblationRequest) or not len(current.missing):
            return
        if not isinstance(request, AblationRequest):
            return
        if not use_suffix or work.prefix_runs or not len(work.missing):
            return
        ablated = self.ablation.ablated(request.layer, request.form)
        names = ablated.suffix.boundary_inputs
        if not set(names) <= set(observation.boundaries):
            return
        expect(
            AblationWork(
                layer=request.layer,
                form=request.form,
                masks=request.masks[work.missing],
                x=case.x,
                boundary={n: observation.boundaries[n] for n in names},
                head=self.heads.head(case, request.statistic),
                memory_budget=memory_budget,
            )
        )

    def _ablation(
        self,
        work: PlannedWork,
        request: AblationRequest,
        case: Case,
        memo: CaseMemo,
        observation: Observation,
        use_suffix: bool,
        progress: Progress,
        head: OutputHead | None,
        memory_budget: int,
        executor: Executor,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        stored = memo.rows.setdefault(ablation_key(request, use_suffix), {})
        keys = row_keys(request.masks)
        records: list[RunRecord] = []
        runs = largest = 0
        if len(work.missing):
            prefix = self._boundary(work, request, case, observation, use_suffix, records)
            if work.prefix_runs:
                progress.update(1)
            item = AblationWork(
                layer=request.layer,
                form=request.form,
                masks=request.masks[work.missing],
                x=case.x,
                boundary=prefix.boundary if prefix is not None else None,
                head=head,
                memory_budget=memory_budget,
            )
            for chunk in executor.run_ablation(item, progress.update):
                runs += 1
                largest = max(largest, chunk.stop - chunk.start)
                rows = statistic_rows(head, request.statistic, case, chunk.outputs)
                for offset, row in enumerate(rows):
                    stored[keys[work.missing[chunk.start + offset]]] = row
        records.append(
            RunRecord(
                "ablation",
                request.layer,
                work.graph,
                work.graph_nodes,
                passes=len(work.missing),
                session_runs=runs + (work.extra_runs if runs else 0),
                batch_size=largest,  # what ran: a batch fallback can make it smaller than planned
                reused_rows=len(keys) - len(work.missing),
                layer_runs=work.extra_runs if runs else 0,
            )
        )
        return np.stack([stored[key] for key in keys]), records

    def _boundary(
        self,
        work: PlannedWork,
        request: AblationRequest,
        case: Case,
        observation: Observation,
        use_suffix: bool,
        records: list[RunRecord],
    ) -> PrefixResult | None:
        """The suffix's inputs: from the observation pass, or one prefix run when it lacks
        them (P1's Glorot outputs exist only in the rewritten model)."""
        if not use_suffix:
            return None
        ablated = self.ablation.ablated(request.layer, request.form)
        if work.prefix_runs:
            nodes = len(ablated.boundary_model.graph.node)
            records.append(RunRecord("prefix", request.layer, "boundary", nodes, 1, 1, 1))
            return self.ablation.prefix(case.x, request.layer, request.form, boundary_only=True)
        names = ablated.suffix.boundary_inputs
        return PrefixResult(outputs={}, boundary={n: observation.boundaries[n] for n in names})

    def _masked(
        self,
        work: PlannedWork,
        request: MaskedInputRequest,
        case: Case,
        progress: Progress,
        head: OutputHead | None,
        executor: Executor,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        item = InputsWork(
            make_inputs=request.make_inputs,
            count=request.count,
            outputs=tuple(head.outputs) if head is not None else (case.target.output,),
            batch_size=work.batch_size,
            head=head,
            streams=work.streams,
        )
        parts = []
        runs = largest = 0
        for chunk in executor.run_inputs(item, progress.update):
            runs += 1
            largest = max(largest, chunk.stop - chunk.start)
            parts.append(statistic_rows(head, request.statistic, case, chunk.outputs))
        record = RunRecord(
            "masked-input",
            request.layer,
            "full",
            work.graph_nodes,
            request.count,
            runs,
            largest,
        )
        return np.concatenate(parts), [record]

    def _gradient(
        self,
        work: PlannedWork,
        request: GradientRequest,
        case: Case,
        memo: CaseMemo,
        progress: Progress,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        records: list[RunRecord] = []
        if work.gradient_layers:
            layers = [self.analysis.layer(name) for name in work.gradient_layers]
            _, nodes = self.gradients.run(case.x, layers, case.target, case.region, memo.gradients)
            progress.update(1)
            records.append(RunRecord("gradient", None, "backward", nodes, 1, 1, 1))
        return memo.gradients[request.layer], records

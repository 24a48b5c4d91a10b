"""Plans and runs what methods ask for, through the cheapest graph, in memory-bounded chunks.

One observation pass of the full model gives P, every selected layer's activation and every
tensor the ablation suffixes read from outside (skip connections), so no layer needs its own
prefix pass. Each ablation request then runs only the sub-graph after its layer; each
masked-input request runs the full model. Both go through ``ChunkedRunner``, the single
batching loop, and are reduced chunk by chunk to the rows of statistics methods consume.
Rows already computed for the same case (another method, same masks) are reused.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from segattr_onnx.errors import GradientRuleError, SegattrError, TargetError
from segattr_onnx.explanation import RunRecord
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.gradient_model import build_gradient_model
from segattr_onnx.graph.heads import (
    HEAD_COLUMNS,
    MIN_OPSET,
    ScoreHeadSpec,
    append_score_head,
    unused_prefix,
)
from segattr_onnx.graph.index import opset_of
from segattr_onnx.graph.rewrite import expose
from segattr_onnx.graph.shapes import (
    activation_bytes_per_item,
    fully_known,
)
from segattr_onnx.methods.base import (
    AblationRequest,
    Case,
    GradientRequest,
    MaskedInputRequest,
    PredictionStatistic,
    Request,
)
from segattr_onnx.progress import Progress
from segattr_onnx.runtime.ablation import AblationRunner, PrefixResult
from segattr_onnx.runtime.executor import (
    BatchFallbackWarning,
    ChunkedRunner,
    OutputHead,
    chunk_size,
    planned_runs,
)
from segattr_onnx.runtime.work import AblationWork, Executor, InputsWork, LocalExecutor
from segattr_onnx.target import ResolvedTarget
from segattr_onnx.text import setting

GRADIENT_MODELS_KEPT = 4  # backward models (and their sessions' keys) kept per input size


@dataclass(frozen=True)
class Observation:
    """What one full pass of the unmodified model yields."""

    outputs: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]  # layer → (C, *S_ℓ) float32
    boundaries: dict[str, np.ndarray]  # tensors the ablation suffixes read, batch 1
    graph_nodes: int


@dataclass
class CaseMemo:
    """Statistic rows already computed for one case, keyed by what produced them."""

    key: tuple
    rows: dict[tuple, dict[bytes, np.ndarray]] = field(default_factory=dict)
    gradients: dict[str, np.ndarray] = field(default_factory=dict)  # layer → ∂T/∂A_ℓ


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

    @property
    def passes(self) -> int:
        return len(self.missing) + self.prefix_runs


def case_key(x: np.ndarray, target: ResolvedTarget, seed: int) -> tuple:
    """Identifies a case for the memo: the input's bytes, the target and the Glorot seed."""
    region = target.region
    region_digest = (
        hashlib.sha1(np.ascontiguousarray(region.mask).tobytes()).hexdigest()
        if region.mask is not None
        else None
    )
    digest = hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
    return (
        x.shape,
        str(x.dtype),
        digest,
        target.output,
        target.channel_axis,
        target.class_index,
        target.activation,
        target.exclusive_classes,
        region.kind,
        region_digest,
        seed,
    )


def _row_keys(masks: np.ndarray) -> list[bytes]:
    binary = (np.asarray(masks) != 0).astype(np.uint8)
    return [row.tobytes() for row in binary]


class AttributionEngine:
    """Runs observation, ablation and masked-input work for one analysed model."""

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
        self.reduce_in_graph = reduce_in_graph
        self._checked_heads: set[ScoreHeadSpec] = set()
        self._batch_check_seed: int | None = None  # a batch check still to run, with its seed
        self._gradient_models: OrderedDict[tuple, tuple] = OrderedDict()
        proto = analysis.model.proto
        names = {n for node in proto.graph.node for n in (*node.input, *node.output)}
        names |= {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
        self._head_prefix = unused_prefix(frozenset(names))
        self._full_bytes_per_item = activation_bytes_per_item(
            analysis.model.proto, analysis.tensors
        )

    # ------------------------------------------------------------------ batching
    def check_batch_consistency(self, seed: int = 0) -> None:
        """Make sure, before the first batched run, that the model keeps the cases of a batch
        apart (see ``_check_batch_now``). The check costs three forward passes of the full
        model, more than a gradient method's whole explanation needs, and only batched runs
        (ablations, masked inputs) depend on it, so it runs when the first of those is planned,
        not here."""
        self._batch_check_seed = seed

    def _settle_batch_check(self) -> None:
        """Run the pending batch check, once per engine (i.e. per input size)."""
        seed = self._batch_check_seed
        if seed is not None:
            self._batch_check_seed = None
            self._check_batch_now(seed)

    def _check_batch_now(self, seed: int) -> None:
        """Run two different cases as one batch and one by one; if the rows differ (or the
        batch fails), the model hard-codes a batch of 1 inside although it declares a free
        one, and every later run goes one at a time. Costs three passes, once per input size."""
        cap = self.ablation.batch_cap
        if not self.analysis.input.dynamic_batch or cap.limit == 1:
            return
        model = self.analysis.model.proto
        session = self.sessions.get(("full", None), lambda: model)
        name = self.analysis.input.name
        (declared,) = [i for i in model.graph.input if i.name == name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(declared.type.tensor_type.elem_type))
        rng = np.random.default_rng(seed)
        shape = self.analysis.input.shape
        if np.issubdtype(dtype, np.integer):
            rows = [rng.integers(0, 2, shape).astype(dtype) for _ in range(2)]
        else:
            rows = [rng.uniform(0, 1, shape).astype(dtype) for _ in range(2)]
        try:
            together = session.run(None, {name: np.concatenate(rows)})
            alone = [session.run(None, {name: row}) for row in rows]
            consistent = all(
                value.shape[:1] == (2,)
                and all(
                    np.allclose(
                        value[k],
                        single[position][0],
                        rtol=1e-3,
                        atol=1e-5 * max(float(np.abs(value).max()), 1.0),
                    )
                    for k, single in enumerate(alone)
                )
                for position, value in enumerate(together)
            )
        except Exception:  # ORT's own exception types: the batch does not even run
            consistent = False
        if not consistent:
            warnings.warn(
                "the model's output for a case changes with the batch it runs in, although its "
                "batch dim is free (a batch of 1 is likely hard-coded inside); running one "
                "case at a time",
                BatchFallbackWarning,
                stacklevel=5,  # the caller of Explainer.explain
            )
            cap.limit = 1

    # ------------------------------------------------------------------ observation
    def boundary_names(self, layers: Sequence[KernelLayer], form: str | None) -> list[str]:
        """Tensors of the original graph that the suffixes of ``layers`` read from outside."""
        if form is None:
            return []
        known = set(self.analysis.tensors)
        names: list[str] = []
        for layer in layers:
            boundary = self.ablation.ablated(layer.name, form).suffix.boundary_inputs
            if all(name in known for name in boundary):
                names.extend(n for n in boundary if n not in names)
        return names

    def observe(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        boundaries: Sequence[str] = (),
    ) -> Observation:
        """One full pass exposing activations and suffix inputs; ``boundaries`` may be empty."""
        activation_names = [layer.output for layer in layers]
        extra = list(dict.fromkeys([*activation_names, *boundaries]))
        key = ("observe", tuple(extra))
        model = self.analysis.model.proto
        session = self.sessions.get(key, lambda: expose(model, extra, self.analysis.tensors))
        names = list(dict.fromkeys([target.output, *extra]))
        values = ChunkedRunner(session).run({self.analysis.input.name: x}, names)
        activations = {
            layer.name: self._channel_first(layer, values[layer.output]) for layer in layers
        }
        return Observation(
            outputs={target.output: values[target.output]},
            activations=activations,
            boundaries={name: values[name] for name in boundaries},
            graph_nodes=len(model.graph.node),
        )

    def _channel_first(self, layer: KernelLayer, value: np.ndarray) -> np.ndarray:
        """A_ℓ as (C, *S_ℓ) float32; a QLinearConv output is dequantised with its own scale."""
        values = np.moveaxis(np.asarray(value), layer.channel_axis, 1)[0]
        if np.issubdtype(values.dtype, np.floating):
            return values.astype(np.float32, copy=False)
        node = self.analysis.index.nodes[layer.node_index]
        if layer.op == "QLinearConv":
            scale = self.analysis.index.constant_value(node.input[6])
            zero = self.analysis.index.constant_value(node.input[7])
            scale = 1.0 if scale is None else float(np.asarray(scale).reshape(-1)[0])
            zero = 0.0 if zero is None else float(np.asarray(zero).reshape(-1)[0])
            return ((values.astype(np.float32) - zero) * scale).astype(np.float32)
        # ConvInteger: integer accumulators are the real values up to a positive scale.
        return values.astype(np.float32)

    # ------------------------------------------------------------------ score head
    def score_head(self, case: Case, statistic: PredictionStatistic) -> OutputHead | None:
        """The in-graph reduction for ``statistic``, or None to reduce chunks on the host."""
        if not self.reduce_in_graph or statistic.head_columns is None:
            return None
        target = case.target
        info = self.analysis.tensors.get(target.output)
        if info is None or info.shape is None or opset_of(self.analysis.model.proto) < MIN_OPSET:
            return None
        spec = self._head_spec(target)
        model = self.analysis.model.proto
        head = OutputHead(
            key=("score-head", spec),
            # A partial, not a lambda: work items carry the head to other processes.
            attach=functools.partial(append_score_head, spec=spec),
            outputs=spec.outputs,
            feeds=spec.feeds(case.prediction, case.region, target.class_index),
        )
        if spec not in self._checked_heads:
            # Build the full-model head once; a model it cannot extend falls back to the host.
            try:
                self.sessions.get(("full", head.key), lambda: head.attach(model))
            except SegattrError as exc:
                warnings.warn(
                    f"reducing predictions inside the graph failed ({exc}); reducing them on the "
                    "host instead",
                    stacklevel=2,
                )
                self.reduce_in_graph = False
                return None
            self._checked_heads.add(spec)
        return head

    def _head_spec(self, target: ResolvedTarget) -> ScoreHeadSpec:
        """The head for a target's output (class index fed at run time, not built in)."""
        info = self.analysis.tensors[target.output]
        assert info.shape is not None
        return ScoreHeadSpec(
            output=target.output,
            elem_type=info.elem_type,
            rank=len(info.shape),
            channel_axis=target.channel_axis,
            activation=target.activation,
            prefix=self._head_prefix,
        )

    @staticmethod
    def _head_rows(
        head: OutputHead, statistic: PredictionStatistic, outputs: dict[str, np.ndarray]
    ) -> np.ndarray:
        by_column = dict(zip(HEAD_COLUMNS, head.outputs, strict=True))  # same order by design
        assert statistic.head_columns is not None
        return np.stack([outputs[by_column[c]] for c in statistic.head_columns], axis=1)

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
        if any(isinstance(r, AblationRequest | MaskedInputRequest) for r in requests):
            self._settle_batch_check()  # batch sizes below depend on its verdict
        for request in requests:
            if isinstance(request, AblationRequest):
                work.append(
                    self._plan_ablation(
                        request, memo, use_suffix, observed_boundaries, target, memory_budget
                    )
                )
            elif isinstance(request, MaskedInputRequest):
                batch = self.ablation.batch_cap.apply(
                    chunk_size(
                        request.count,
                        self._full_bytes_per_item,
                        memory_budget,
                        not self.analysis.input.dynamic_batch,
                        whole_process=self.ablation.bounds_process,
                    )
                )
                work.append(
                    PlannedWork(
                        request=request,
                        missing=np.arange(request.count),
                        graph="full",
                        graph_nodes=len(self.analysis.model.proto.graph.node),
                        batch_size=batch,
                        session_runs=planned_runs(request.count, batch),
                        prefix_runs=0,
                    )
                )
            elif isinstance(request, GradientRequest):
                work.append(self._plan_gradient(request, requests, memo, work))
            else:
                raise TypeError(f"unknown request type {type(request).__name__}")
        return work

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

    def _plan_ablation(
        self,
        request: AblationRequest,
        memo: CaseMemo,
        use_suffix: bool,
        observed_boundaries: set[str],
        target: ResolvedTarget,
        memory_budget: int,
    ) -> PlannedWork:
        ablated = self.ablation.ablated(request.layer, request.form)
        if use_suffix and target.output not in ablated.suffix.outputs:
            raise TargetError(
                f"output {target.output!r} does not depend on layer {request.layer!r}; "
                f"select layers that feed it ({setting('--layers', 'layers=')}) or another output "
                f"({setting('--output-name', 'Target(output=...)')})"
            )
        stored = memo.rows.get(self._memo_key(request, use_suffix), {})
        missing = np.array(
            [i for i, key in enumerate(_row_keys(request.masks)) if key not in stored],
            dtype=np.int64,
        )
        batch = self.ablation.batch_size(ablated, max(len(missing), 1), use_suffix, memory_budget)
        if use_suffix:
            needs_prefix = len(missing) > 0 and not set(ablated.suffix.boundary_inputs) <= (
                observed_boundaries
            )
            graph, nodes = "suffix", ablated.suffix.node_count
        else:
            needs_prefix = False
            graph, nodes = "full", len(ablated.model.graph.node)
        return PlannedWork(
            request=request,
            missing=missing,
            graph=graph,
            graph_nodes=nodes,
            batch_size=batch,
            session_runs=planned_runs(len(missing), batch),
            prefix_runs=int(needs_prefix),
        )

    @staticmethod
    def _memo_key(request: AblationRequest, use_suffix: bool) -> tuple:
        return (request.layer, request.form, request.statistic.name, use_suffix)

    # ------------------------------------------------------------------ execution
    def execute(
        self,
        work: PlannedWork,
        case: Case,
        memo: CaseMemo,
        observation: Observation,
        use_suffix: bool,
        progress: Progress,
        memory_budget: int,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        """The request's statistic rows (all of them, memo included) and what ran."""
        request = work.request
        if isinstance(request, GradientRequest):
            return self._execute_gradient(work, request, case, memo, progress)
        head = self.score_head(case, request.statistic)
        if isinstance(request, MaskedInputRequest):
            return self._execute_masked(work, request, case, progress, head)
        assert isinstance(request, AblationRequest)
        return self._execute_ablation(
            work, request, case, memo, observation, use_suffix, progress, head, memory_budget
        )

    def _execute_ablation(
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
    ) -> tuple[np.ndarray, list[RunRecord]]:
        stored = memo.rows.setdefault(self._memo_key(request, use_suffix), {})
        keys = _row_keys(request.masks)
        records: list[RunRecord] = []
        runs = largest = 0
        if len(work.missing):
            prefix = self._prefix_for(work, request, case, observation, use_suffix, records)
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
            for chunk in self.executor.run_ablation(item, progress.update):
                runs += 1
                largest = max(largest, chunk.stop - chunk.start)
                if head is not None:
                    rows = self._head_rows(head, request.statistic, chunk.outputs)
                else:
                    probabilities = case.target.probabilities(chunk.outputs[case.target.output])
                    rows = request.statistic.reduce(probabilities, case)
                for offset, row in enumerate(rows):
                    stored[keys[work.missing[chunk.start + offset]]] = row
        records.append(
            RunRecord(
                "ablation",
                request.layer,
                work.graph,
                work.graph_nodes,
                passes=len(work.missing),
                session_runs=runs,
                batch_size=largest,  # what ran: a batch fallback can make it smaller than planned
                reused_rows=len(keys) - len(work.missing),
            )
        )
        return np.stack([stored[key] for key in keys]), records

    def _execute_gradient(
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
            _, nodes = self._run_gradients(case.x, layers, case.target, case.region, memo)
            progress.update(1)
            records.append(RunRecord("gradient", None, "backward", nodes, 1, 1, 1))
        return memo.gradients[request.layer], records

    def can_observe_with_gradients(self, target: ResolvedTarget) -> bool:
        """True when the seed of the backward pass is known before the prediction is: the
        region does not depend on P (all voxels, or a mask the user gives), and the output's
        size is known to shape the region's feed."""
        info = self.analysis.tensors.get(target.output)
        return target.region.kind in ("all", "mask") and info is not None and fully_known(info)

    def observe_with_gradients(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        memo: CaseMemo,
    ) -> Observation:
        """The observation and ∂T/∂A of every layer from one run of the backward graph, which
        computes the whole forward pass anyway: a gradient method's one and only pass."""
        region = None if target.region.kind == "all" else target.region.mask
        values, nodes = self._run_gradients(x, layers, target, region, memo)
        return Observation(
            outputs={target.output: values[target.output]},
            activations={
                layer.name: self._channel_first(layer, values[layer.output]) for layer in layers
            },
            boundaries={},
            graph_nodes=nodes,
        )

    def _run_gradients(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        region: np.ndarray | None,
        memo: CaseMemo,
    ) -> tuple[dict[str, np.ndarray], int]:
        """One run of the backward graph for ``layers``: the gradients go to ``memo``; the
        run's values (the target output and the raw activations too) are returned."""
        names = tuple(layer.name for layer in layers)
        model, spec, outputs = self.gradient_model(target, names)
        # ORT's NCHWc layout transform reorders every tensor the backward graph reads outside
        # a convolution (a fifth of the run) and re-packs the weights on the first run of
        # each new session: without it a fresh explanation's one gradient run is ~1.5× faster.
        session = self.sessions.get(
            ("gradients", spec, names), lambda: model, disabled_optimizers=("NchwcTransformer",)
        )
        info = self.analysis.tensors[target.output]
        assert info.shape is not None
        spatial = tuple(
            int(d) for axis, d in enumerate(info.shape) if axis not in (0, target.channel_axis)
        )
        shape = spec.feed_shape(spatial)
        if region is not None and np.asarray(region).size != int(np.prod(shape)):
            raise TargetError(
                f"the region mask has shape {np.asarray(region).shape} but the prediction of "
                f"{target.output!r} has spatial shape {spatial}; give a mask of that shape"
            )
        feeds = {
            spec.region_input: (
                np.ones(shape, np.float32)
                if region is None
                else np.asarray(region, np.float32).reshape(shape)
            )
        }
        if spec.class_input is not None:
            feeds[spec.class_input] = np.array([target.class_index], np.int64)
        exposed = [target.output, *(layer.output for layer in layers), *outputs.values()]
        wanted = list(dict.fromkeys(exposed))
        values = ChunkedRunner(session).run({self.analysis.input.name: x, **feeds}, wanted)
        for layer in layers:
            memo.gradients[layer.name] = self._channel_first(layer, values[outputs[layer.name]])
        return values, len(model.graph.node)

    def gradient_model(
        self, target: ResolvedTarget, layer_names: Sequence[str]
    ) -> tuple[onnx.ModelProto, ScoreHeadSpec, dict[str, str]]:
        """The model plus T = Σ_R P and ∂T/∂A_ℓ of each layer's raw output, as outputs."""
        for name in layer_names:
            layer = self.analysis.layer(name)
            activation = self.analysis.tensors.get(layer.output)
            if activation is not None and not activation.is_float:
                raise GradientRuleError(
                    f"layer {name!r} ({layer.op}) outputs integers, which have no gradient; "
                    "explain it with a gradient-free method (kwc, scorecam, ablationcam) or "
                    "choose float layers"
                )
        spec = self._head_spec(target)
        key = (spec, tuple(layer_names))
        if key in self._gradient_models:
            self._gradient_models.move_to_end(key)
        else:
            model, outputs = build_gradient_model(self.analysis, target, spec, layer_names)
            self._gradient_models[key] = (model, spec, outputs)
            while len(self._gradient_models) > GRADIENT_MODELS_KEPT:
                self._gradient_models.popitem(last=False)
        return self._gradient_models[key]

    def _prefix_for(
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

    def _execute_masked(
        self,
        work: PlannedWork,
        request: MaskedInputRequest,
        case: Case,
        progress: Progress,
        head: OutputHead | None,
    ) -> tuple[np.ndarray, list[RunRecord]]:
        item = InputsWork(
            make_inputs=request.make_inputs,
            count=request.count,
            outputs=tuple(head.outputs) if head is not None else (case.target.output,),
            batch_size=work.batch_size,
            head=head,
        )
        parts = []
        runs = largest = 0
        for chunk in self.executor.run_inputs(item, progress.update):
            runs += 1
            largest = max(largest, chunk.stop - chunk.start)
            if head is not None:
                parts.append(self._head_rows(head, request.statistic, chunk.outputs))
            else:
                probabilities = case.target.probabilities(chunk.outputs[case.target.output])
                parts.append(request.statistic.reduce(probabilities, case))
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

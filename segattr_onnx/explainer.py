"""The public entry point: explain one case with one method, reusing sessions across cases.

``Explainer`` is the reusable model object a validation pipeline keeps: the model is read once,
each input size is analysed once, and every ONNX Runtime session (observation, suffixes, full
model) is built once and reused for every case, method and layer that needs it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from segattr_onnx.engine import AttributionEngine, CaseMemo, Observation, case_key
from segattr_onnx.errors import InputDataError, InputShapeError, MethodError, NumericalError
from segattr_onnx.explanation import Explanation, LayerAttribution, RunRecord
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis, analyse_model
from segattr_onnx.graph.loading import LoadedModel, as_loaded_model
from segattr_onnx.graph.shapes import declared_dims
from segattr_onnx.methods.base import VARIANTS, AttributionMethod, Case, Request
from segattr_onnx.methods.input_gradients import (
    InputGradientMethod,
    attribution_map,
    channel_first_input,
    warn_if_incomplete,
)
from segattr_onnx.methods.layers import is_group_selection, select_layers
from segattr_onnx.methods.registry import create_method
from segattr_onnx.progress import make_progress
from segattr_onnx.runtime.ablation import TABLE_MEMORY_KEPT, AblationRunner, run_bytes_per_item
from segattr_onnx.runtime.backends import ExecutorBackend
from segattr_onnx.runtime.chunks import BatchCap, available_memory_bytes, default_memory_budget
from segattr_onnx.runtime.gradients import GradientRunner
from segattr_onnx.runtime.input_gradients import InputGradientRunner
from segattr_onnx.runtime.memory import MemoryBudgetWarning, format_bytes, resident_bytes
from segattr_onnx.runtime.optimised_cache import active_disk_cache
from segattr_onnx.runtime.providers import probe_device
from segattr_onnx.runtime.recipe_cache import RecipeContext, model_digest
from segattr_onnx.runtime.sessions import OPTIMIZATION_LEVELS, SessionCache
from segattr_onnx.runtime.work import LocalExecutor
from segattr_onnx.target import Target, default_output, region_sum
from segattr_onnx.text import setting

SIZES_KEPT = 4


@dataclass(frozen=True)
class PreparedCase:
    """One case set up on a model (``Explainer.case``), ready for ``Explainer.run``.

    ``case`` is what methods read (input, resolved target, prediction, region, base score,
    observed activations); the rest is how its runs reuse the observation and earlier rows.
    """

    case: Case
    layers: tuple[KernelLayer, ...]
    observation: Observation
    fused: bool  # the observation pass also ran the backward graph
    use_suffix: bool
    sized: _SizedModel = field(repr=False)
    memo: CaseMemo = field(repr=False)
    reused: bool = False  # the observation is an earlier backward run's, from the memo

    def observation_record(self) -> RunRecord:
        """The observation pass, as an explanation's run records list it."""
        if self.reused:
            return RunRecord(
                "observation+gradient", None, "backward", self.observation.graph_nodes, 0, 0, 1,
                reused_rows=1,
            )  # fmt: skip
        return RunRecord(
            "observation+gradient" if self.fused else "observation",
            None,
            "backward" if self.fused else "observed",
            self.observation.graph_nodes,
            1,
            1,
            1,
        )


@dataclass
class _SizedModel:
    """Everything tied to one input size: the analysis, its sessions and its engine."""

    analysis: ModelAnalysis
    engine: AttributionEngine
    pass_bytes: int | None = None  # one input's cost in a whole-model run; 0 when unknown
    input_gradients: InputGradientRunner | None = None  # made when a method first needs it

    def input_gradient_runner(self) -> InputGradientRunner:
        """What runs ∂T/∂x for this size, on the engine's sessions and batch cap."""
        if self.input_gradients is None:
            engine = self.engine
            self.input_gradients = InputGradientRunner(
                self.analysis, engine.sessions, engine.heads, engine.ablation.batch_cap
            )
        return self.input_gradients


class Explainer:
    """A model ready to explain many cases; sessions are built once and reused."""

    def __init__(
        self,
        model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
        provider: str = "auto",
        memory_budget: int | None = None,
        seed: int = 0,
        optimization: str = "all",
        reduce_in_graph: bool = True,
        executor: ExecutorBackend | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        """``executor`` runs each input size's work items (kernel ablations, masked inputs;
        ``runtime.backends``): None, this process's sessions; a cluster's backend spreads
        them over its workers. ``intra_op_threads`` caps ONNX Runtime's threads per session,
        so that workers sharing a machine do not oversubscribe it; with it, chunks run one at
        a time. None: every core, and on the CPU two chunks at once, each on half of them
        (``runtime/cpu_streams.py``).
        """
        if optimization not in OPTIMIZATION_LEVELS:
            raise MethodError(
                f"optimization {optimization!r} is unknown; use one of "
                f"{', '.join(OPTIMIZATION_LEVELS)}"
            )
        self.model = as_loaded_model(model)
        self.provider = provider
        self.device = probe_device(provider)
        self.memory_budget = memory_budget
        self.seed = seed
        self.optimization = optimization
        self.reduce_in_graph = reduce_in_graph
        self.executor = executor
        self.intra_op_threads = intra_op_threads
        # A few input sizes keep their sessions; 3D validation volumes vary in size, and every
        # size holds its own sessions, so the least recently used size is let go.
        self._sized: OrderedDict[tuple[int, ...], _SizedModel] = OrderedDict()
        self._memo: CaseMemo | None = None
        self._batch_cap = BatchCap()  # one per model: a batch-1-only model is so at every size

    def run_budget(self) -> int:
        """The budget this explanation's batches are sized against (``runtime.memory``).

        A user's ``memory_budget`` bounds the whole process on the CPU: batches get what the
        process does not hold already (``runtime.memory``). When the process alone holds more,
        batches run one at a time and a ``MemoryBudgetWarning`` says how much the model takes.
        Without one, a batch may take a quarter of free memory (one snapshot per explanation,
        so a plan's batches stay consistent). On CUDA it is the GPU memory a batch may take.
        """
        if self.device != "cpu":
            return (
                self.memory_budget
                if self.memory_budget is not None
                else default_memory_budget(self.device)
            )
        if self.memory_budget is None:
            return default_memory_budget("cpu")
        held = resident_bytes()
        if held is not None and held >= self.memory_budget:
            warnings.warn(
                f"the process already holds {format_bytes(held)} (the interpreter, the model, "
                f"its rewritten graphs and sessions), more than the memory budget of "
                f"{format_bytes(self.memory_budget)}; batches run one item at a time, and the "
                "peak will pass the budget — give a budget above this footprint",
                MemoryBudgetWarning,
                stacklevel=3,
            )
        return self.memory_budget

    def _check_one_pass_fits(self, sized: _SizedModel, gradients: bool) -> None:
        """Refuse, before anything runs, an input whose single pass cannot fit: the budget can
        split batches, never one pass (a 2D model of free size given a huge image once took
        7 GB under a 1 GB budget). The bound is the user's budget on the CPU, else the memory
        free now; a gradient pass keeps the forward activations for the backward one (x2)."""
        if self.device != "cpu":
            return
        if sized.pass_bytes is None:
            analysis = sized.analysis
            estimate = run_bytes_per_item(
                analysis.model.proto, analysis.tensors, [analysis.input.name]
            )
            sized.pass_bytes = estimate or 0
        need = sized.pass_bytes * (2 if gradients else 1)
        if not need:
            return
        if self.memory_budget is not None:  # what the model itself holds is reported apart
            limit = self.memory_budget
            what = f"the memory budget ({format_bytes(self.memory_budget)})"
        else:
            limit, what = available_memory_bytes(), "the free memory"
        if need > limit:
            shape = "x".join(map(str, sized.analysis.input.shape))
            raise InputShapeError(
                f"one pass of the model on this {shape} input needs about {format_bytes(need)}, "
                f"more than {what}; give a smaller input (a model card's resize) or a larger "
                f"{setting('--memory-budget', 'memory_budget')}"
            )

    def forget_case(self) -> None:
        """Drop the rows kept from the latest case, so explaining it again runs everything.

        Rows are kept so that a second method on the same case reuses the first one's runs;
        a benchmark timing whole explanations, or a pipeline done with a large 3D case, lets
        them go.
        """
        self._memo = None

    def analysis(self, input_shape: Sequence[int] | None = None) -> ModelAnalysis:
        """The model's analysis for one input size (with batch axis); cached."""
        return self._for_shape(input_shape).analysis

    def local_executor(self, input_shape: Sequence[int]) -> LocalExecutor:
        """What runs work items of this input size (with batch axis) on this process's
        sessions: a cluster worker runs the items it is sent with it.

        The batch check runs first, as it would before planning: a model that mixes the
        cases of a batch must run them one at a time on a worker too.
        """
        engine = self._for_shape(input_shape).engine
        engine.batch_check.settle()
        return LocalExecutor(engine.ablation)

    def gradient_runner(self, input_shape: Sequence[int]) -> GradientRunner:
        """What runs the backward graphs of this input size (with batch axis): a windowed
        explanation seeds each window's backward run itself."""
        return self._for_shape(input_shape).engine.gradients

    def input_gradient_runner(self, input_shape: Sequence[int]) -> InputGradientRunner:
        """What runs ∂T/∂x, the input-gradient methods' backward graphs, for this input size
        (with batch axis)."""
        return self._for_shape(input_shape).input_gradient_runner()

    def _for_shape(self, input_shape: Sequence[int] | None) -> _SizedModel:
        key = tuple(input_shape) if input_shape is not None else ()
        if key in self._sized:
            self._sized.move_to_end(key)
        else:
            analysis = analyse_model(self.model, input_shape)
            sessions = SessionCache(
                self.provider,
                external_data_dir=self.model.external_data_dir,
                optimization=self.optimization,
                intra_op_threads=self.intra_op_threads,
                fallback_reported=self.device == "cpu" and self.provider == "auto",
                recipe=self._recipe(analysis),
            )
            runner = AblationRunner(
                analysis,
                self.provider,
                self.memory_budget,
                self.seed,
                sessions=sessions,
                batch_cap=self._batch_cap,
                device=self.device,
            )
            engine = AttributionEngine(analysis, runner, reduce_in_graph=self.reduce_in_graph)
            if self.executor is not None:
                engine.executor = self.executor.case_executor(self, runner)
            engine.check_batch_consistency()
            self._sized[key] = _SizedModel(analysis, engine)
            while len(self._sized) > SIZES_KEPT:
                self._sized.popitem(last=False)
        return self._sized[key]

    def _recipe(self, analysis: ModelAnalysis) -> RecipeContext | None:
        """What names this size's graphs in the disk cache (``runtime/recipe_cache.py``), when
        one is in use and could hold them: CPU sessions of a model without external data.
        The model's digest is taken now, beside its analysis."""
        if self.device != "cpu" or self.model.external_data_dir is not None:
            return None
        if active_disk_cache() is None:
            return None
        digest = model_digest(self.model.proto)
        return RecipeContext(digest, tuple(analysis.input.shape), self.seed)

    def place_channels(self, image: np.ndarray) -> np.ndarray:
        """A channels-first image (C, *spatial), as a model card prepares it, with its
        channels where the model takes them: moved last for a channels-last (NHWC) model.

        The declared input says where: the axis whose fixed size is C (axis 1, or the last).
        A channel count the model does not take is refused here, before any work.
        """
        values = np.asarray(image)
        name, declared = _declared_input(self.model)
        channels = values.shape[0]
        if declared is None or len(declared) != values.ndim + 1:
            return values
        first, last = declared[1], declared[-1]
        if isinstance(last, int) and last == channels and first != channels:
            return np.moveaxis(values, 0, -1)
        if isinstance(first, int) and first != channels:
            raise InputShapeError(
                f"the image has {channels} channel(s) but the model's input {name!r} takes "
                f"{first}; convert the image (e.g. to greyscale) to what the model was trained on"
            )
        return values

    def input_channel_axis(self) -> int:
        """The input's channel axis (with batch) from its declared dims alone, before any
        size is analysed: the last for a channels-last model (its last dim fixed and the
        second free, or the smaller of the two fixed ones), else 1."""
        _, declared = _declared_input(self.model)
        if declared is None or len(declared) < 3:
            return 1
        first, last = declared[1], declared[-1]
        if isinstance(last, int) and (not isinstance(first, int) or last < first):
            return len(declared) - 1
        return 1

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` as the model takes it: batch (and a one-channel model's channel) axis added,
        checked and cast to the input's type."""
        return self._prepare_input(x)[0]

    def _prepare_input(self, x: np.ndarray) -> tuple[np.ndarray, _SizedModel]:
        """One case as the model takes it, batch axis added; its size picks the analysis."""
        array = self.shaped_input(x)
        name, _ = _declared_input(self.model)
        try:
            sized = self._for_shape(array.shape)
        except InputShapeError as exc:
            raise InputDataError(
                f"the input array has shape {'x'.join(map(str, array.shape))} (batch axis "
                f"included), which the model's input {name!r} does not take: {exc}"
            ) from exc
        return array, sized

    def shaped_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the model's axes (batch, and a one-channel model's channel, added) and
        its input's number type, checked, at any size: a volume that a sliding window will
        cover patch by patch is never analysed whole."""
        array = np.asarray(x)
        name, declared = _declared_input(self.model)
        if array.dtype.kind not in "biuf":
            raise InputDataError(
                f"the input array holds {array.dtype} values; give numbers as the model takes them"
            )
        if declared and isinstance(declared[0], int) and declared[0] > 1:
            raise InputDataError(
                f"the model's input {name!r} has a fixed batch of {declared[0]}; segattr-onnx "
                "explains one case at a time — export the model with batch 1 or a dynamic batch"
            )
        rank = len(declared) if declared is not None else array.ndim
        single_channel_axis = _single_channel_axis(declared)
        if array.ndim == rank - 2 and single_channel_axis is not None:
            # A bare (H, W) or (D, H, W) image for a one-channel model: add both axes.
            array = np.expand_dims(array[None], single_channel_axis)
        if array.ndim == rank - 1:
            array = array[None]
        if array.ndim != rank:
            raise InputDataError(
                f"the input has {array.ndim} dims {array.shape} but the model's input {name!r} "
                f"takes {rank} (with batch) or {rank - 1} (without)"
                + (f", or {rank - 2} for a bare one-channel image" if single_channel_axis else "")
            )
        if array.shape[0] != 1:
            raise InputDataError(
                f"the input holds a batch of {array.shape[0]} cases; explain one case at a time"
            )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(_input_elem_type(self.model, name)))
        return np.ascontiguousarray(_cast_checked(array, dtype))

    def case(
        self,
        x: np.ndarray,
        target: Target | None = None,
        layers: str | Sequence[str] | None = None,
        variant: str = "p2",
        *,
        gradients: bool = False,
        ablation_form: str | None = None,
        use_suffix: bool = True,
    ) -> PreparedCase:
        """Set up one case for requests: the input checked and cast, the target resolved, the
        layers selected (a group, names or ``re:REGEX``; None: none, as scoring needs), and one
        observation pass.

        Every consumer (methods through ``explain``, the metrics' scoring, audits) starts a
        case here, so the checks and the reuse of earlier rows (the latest case's memo) are
        the same for all. ``gradients`` lets the observation pass also run the backward graph
        when the layers' gradients are still missing; ``ablation_form`` makes it expose the
        tensors the ablation suffixes of the layers read.
        """
        x, sized = self._prepare_input(x)
        analysis, engine = sized.analysis, sized.engine
        self._check_one_pass_fits(sized, gradients)
        target = target or Target()
        if layers is None:
            chosen: list = []
        else:
            if target.output is None and is_group_selection(layers):
                # Groups depend on the output explained: fix it first, then take its groups.
                target = replace(target, output=default_output(analysis))
            chosen = select_layers(analysis, layers, target.output)
        resolved = target.resolve(analysis, chosen)
        key = case_key(x, resolved, self.seed)
        if self._memo is None or self._memo.key != key:
            self._memo = CaseMemo(key)  # only the latest case is kept: memory stays bounded
        memo = self._memo
        fused = (
            gradients
            and ablation_form is None
            and bool(chosen)
            and engine.can_observe_with_gradients(resolved)
            and any(layer.name not in memo.gradients for layer in chosen)
        )
        names = tuple(layer.name for layer in chosen)
        kept = memo.observations.get(names) if gradients and ablation_form is None else None
        reused = kept is not None and all(name in memo.gradients for name in names)
        if reused:  # this case's backward run observed these layers already
            assert kept is not None
            observation = kept
        elif fused:  # the backward graph's one run also observes: no separate forward pass
            observation = engine.observe_with_gradients(x, chosen, resolved, memo)
            memo.observations[names] = observation
        else:
            boundaries = engine.boundary_names(chosen, ablation_form)
            observation = engine.observe(x, chosen, resolved, boundaries)
        output = observation.outputs[resolved.output]
        prediction = resolved.probabilities(output)[0]
        region = resolved.region_mask(output)
        base_score = float(region_sum(prediction[None], region)[0])
        if not np.isfinite(base_score):
            raise InputDataError(
                f"the model's prediction for this input is not finite ({base_score:g}); it "
                "overflows — check the input's scaling, or use a float32 export"
            )
        if not base_score > 0:
            raise InputDataError(
                f"the target score is {base_score:g}: the model predicts nothing for class "
                f"{resolved.class_index} in the region; pick another class or region"
            )
        case = Case(
            analysis=analysis,
            x=x,
            target=resolved,
            prediction=prediction,
            region=region,
            base_score=base_score,
            activations=observation.activations,
            variant=variant,
        )
        return PreparedCase(
            case, tuple(chosen), observation, fused, use_suffix, sized, memo, reused
        )

    def run(
        self,
        prepared: PreparedCase,
        requests: Sequence[Request],
        progress: bool | object = False,
        label: str = "runs",
        observation_pass: bool = False,
    ) -> tuple[list[np.ndarray], list[RunRecord]]:
        """The rows of each request on a prepared case, in order, and a record per run.

        Rows already computed for the same case (by another method, or an earlier call) are
        reused. ``observation_pass`` counts the case's observation in the progress bar.
        """
        engine, case = prepared.sized.engine, prepared.case
        budget = self.run_budget()
        work = engine.plan(
            list(requests),
            prepared.memo,
            prepared.use_suffix,
            set(prepared.observation.boundaries),
            case.target,
            budget,
        )
        total = int(observation_pass) + sum(item.passes for item in work)
        bar = make_progress(progress, total, f"{label}, {total} forward passes")
        results: list[np.ndarray] = []
        records: list[RunRecord] = []
        try:
            bar.update(int(observation_pass))
            for position, item in enumerate(work):
                rows, ran = engine.execute(
                    item,
                    case,
                    prepared.memo,
                    prepared.observation,
                    prepared.use_suffix,
                    bar,
                    budget,
                    upcoming=work[position + 1] if position + 1 < len(work) else None,
                )
                results.append(rows)
                records.extend(ran)
        finally:
            bar.close()
            # Kept for the next call unless large, or a budget bounds what the process holds.
            ablation = engine.ablation
            ablation.release_tables(keep=0 if ablation.bounds_process else TABLE_MEMORY_KEPT)
        return results, records

    def explain(
        self,
        x: np.ndarray,
        method: str | AttributionMethod = "kwc",
        layers: str | Sequence[str] | None = "decoder",
        target: Target | None = None,
        variant: str = "p2",
        progress: bool | object = False,
        use_suffix: bool = True,
        **method_options,
    ) -> Explanation:
        """Explain one case; see ``segattr_onnx.explain`` for the arguments."""
        started = time.perf_counter()
        if variant not in VARIANTS:
            raise MethodError(f"variant {variant!r} is unknown; use 'p1' or 'p2'")
        if isinstance(method, str):
            method = create_method(method, **method_options)
        elif method_options:
            raise MethodError("options are given to the method instance, not to explain()")
        if isinstance(method, InputGradientMethod):  # no layers: ``layers`` does not apply
            return self._explain_input(x, method, target, variant, progress, started)
        form = method.ablation_form(variant) if use_suffix else None
        prepared = self.case(
            x,
            target,
            layers if layers is not None else "decoder",
            variant,
            gradients=method.uses_gradients,
            ablation_form=form,
            use_suffix=use_suffix,
        )
        case, chosen, resolved = prepared.case, prepared.layers, prepared.case.target
        analysis = case.analysis
        requests = {layer.name: list(method.requests(case, layer)) for layer in chosen}
        flat = [r for layer_requests in requests.values() for r in layer_requests]
        results, ran = self.run(
            prepared,
            flat,
            progress,
            f"{method.name}: {len(chosen)} layers",
            observation_pass=not prepared.reused,
        )
        records = [prepared.observation_record(), *ran]

        # Each layer's group for the output explained (a layer's own field is the primary's).
        explained = analysis.groupings.get(resolved.output)
        groups = explained.groups if explained is not None else {}
        attributions = []
        position = 0
        for layer in chosen:
            count = len(requests[layer.name])
            rows = results[position : position + count]
            position += count
            group = groups.get(layer.name, layer.group)
            attributions.append(attribute_layer(method, case, layer, rows, group))
        combined = method.combine(case, [a.map for a in attributions])
        final = np.clip(combined, 0.0, 1.0).astype(np.float32)
        return Explanation(
            map=final,
            method=method.name,
            variant=variant,
            layers=tuple(attributions),
            target=resolved.describe(),
            base_score=case.base_score,
            prediction=case.prediction,
            runs=tuple(records),
            seconds=time.perf_counter() - started,
            provider=self.device,
        )

    def _explain_input(
        self,
        x: np.ndarray,
        method: InputGradientMethod,
        target: Target | None,
        variant: str,
        progress: bool | object,
        started: float,
    ) -> Explanation:
        """An input-gradient method: one observation pass (P, the region, S0), then ∂T/∂x at
        the method's rows, batched, and their mean reduced to per-voxel attributions; for
        Integrated Gradients one more pass gives T(x′), to check that they add up."""
        prepared = self.case(x, target, None, variant, gradients=True)
        case, sized = prepared.case, prepared.sized
        inputs = method.gradient_inputs(case, self.seed)
        if inputs.count > 1:
            sized.engine.batch_check.settle()  # batch sizes depend on its verdict
        runner = sized.input_gradient_runner()
        ablation = sized.engine.ablation
        plan = runner.plan(
            inputs.count,
            self.run_budget(),
            ablation.bounds_process,
            cache_bytes=ablation.cache_bytes,
        )
        reference = method.reference_input(case)
        total = 1 + plan.passes + int(reference is not None)
        label = f"{method.name}: {inputs.count} gradients, {total} forward passes"
        bar = make_progress(progress, total, label)
        records = [prepared.observation_record()]
        reference_score = None
        try:
            bar.update(1)
            mean, plan, nodes = runner.mean_gradient(inputs, case.target, case.region, plan, bar)
            records.append(
                RunRecord("input-gradient", None, "backward", nodes, plan.passes, plan.runs,
                          plan.batch_size)
            )  # fmt: skip
            if reference is not None:
                reference_score, full_nodes = runner.target_score(
                    reference, case.target, case.region
                )
                records.append(RunRecord("baseline", None, "full", full_nodes, 1, 1, 1))
                bar.update(1)
        finally:
            bar.close()
        signed = method.attributions(case, mean)
        attributions = channel_first_input(signed, case.analysis.input.channel_axis)
        if not np.all(np.isfinite(attributions)):
            raise NumericalError(
                f"{method.name} gave non-finite attributions: the model overflows on this "
                "input or near it (common with float16 exports); try the float32 model"
            )
        if reference_score is not None:
            warn_if_incomplete(
                method.name,
                float(attributions.sum(dtype=np.float64)),
                case.base_score - reference_score,
            )
        return Explanation(
            map=attribution_map(attributions),
            method=method.name,
            variant=variant,
            layers=(),
            target=case.target.describe(),
            base_score=case.base_score,
            prediction=case.prediction,
            runs=tuple(records),
            seconds=time.perf_counter() - started,
            provider=self.device,
            attributions=attributions,
        )


def attribute_layer(
    method: AttributionMethod,
    case: Case,
    layer: KernelLayer,
    rows: Sequence[np.ndarray],
    group: str,
) -> LayerAttribution:
    """A layer's kernel weights and map from its requests' rows, checked to be finite."""
    weights = method.kernel_weights(case, layer, rows)
    layer_map = method.layer_map(case, layer, weights)
    if not (np.all(np.isfinite(weights.weights)) and np.all(np.isfinite(layer_map))):
        raise NumericalError(
            f"layer {layer.name!r} gave non-finite kernel weights or map with "
            f"{method.name}: the model overflows on this input (common with float16 "
            "exports); try the float32 model or other layers"
        )
    return LayerAttribution(layer.name, group, weights.weights, weights.terms, layer_map)


def _single_channel_axis(declared: tuple | None) -> int | None:
    """Where a one-channel model's channel axis is (1, or last for channels-last), else None."""
    if declared is None or len(declared) < 3:
        return None
    if declared[1] == 1:
        return 1
    if declared[-1] == 1:
        return len(declared) - 1
    return None


def _cast_checked(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The input in the model's dtype, refusing values that the cast would change silently."""
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputDataError("the input contains NaN or infinite values; clean it first")
    if array.dtype == dtype:
        return array
    if dtype.kind in "iu":
        if array.dtype.kind not in "biu":
            raise InputDataError(
                f"the model takes {dtype} input but the array is {array.dtype}; convert it to "
                "the model's own integer encoding first"
            )
        limits = np.iinfo(dtype)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise InputDataError(
                f"the input's values span [{array.min()}, {array.max()}], outside the "
                f"[{limits.min}, {limits.max}] range of the model's {dtype} input"
            )
    elif dtype.kind == "f" and array.size:
        largest = float(np.abs(array).max())
        if largest > float(np.finfo(dtype).max):
            raise InputDataError(
                f"the input reaches {largest:g}, beyond the largest {dtype} value "
                f"({np.finfo(dtype).max:g}) the model takes; rescale it as the model expects"
            )
    return array.astype(dtype)


def _declared_input(model: LoadedModel) -> tuple[str, tuple | None]:
    """The image input's name and declared dims, read before any analysis needs a size."""
    graph = model.proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in initializers]
    if not inputs:
        return "?", None
    return inputs[0].name, declared_dims(inputs[0])


def _input_elem_type(model: LoadedModel, name: str) -> int:
    for value_info in model.proto.graph.input:
        if value_info.name == name:
            return value_info.type.tensor_type.elem_type
    raise InputDataError(f"the model has no input {name!r} to feed")


def explain(
    model: Explainer | LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    x: np.ndarray,
    method: str | AttributionMethod = "kwc",
    layers: str | Sequence[str] | None = "decoder",
    target: Target | None = None,
    variant: str = "p2",
    provider: str = "auto",
    progress: bool | object = False,
    **method_options,
) -> Explanation:
    """Which regions of ``x`` made ``model`` draw its mask, by ``method`` through ``layers``.

    ``model`` is a path, a ``ModelProto`` or, to reuse sessions across many cases, an
    ``Explainer``. ``x`` is one case exactly as the model takes it, with or without the batch
    axis. ``variant`` picks the paper's rules: ``"p2"`` (default) or ``"p1"``. The returned
    ``Explanation.map`` has the input's spatial shape, float32 in [0, 1].
    """
    explainer = model if isinstance(model, Explainer) else Explainer(model, provider=provider)
    return explainer.explain(
        x, method, layers, target, variant, progress=progress, **method_options
    )

"""Kernel ablation runs: one prefix pass, then only the graph after the layer, in chunks.

For a layer with C kernels KWC needs 2·C predictions with different masks. Everything before the
ablated tensor is the same in all of them, so it runs once (the *prefix*, which also yields the
unablated prediction P); the masks then run through the *suffix* graph in memory-bounded chunks,
with the skip tensors bound once. ``use_suffix=False`` re-runs the whole masked model instead
(the slow reference the tests and benchmarks compare against).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.rewrite import (
    AblationSite,
    SuffixGraph,
    cut_suffix,
    expose,
    insert_ablation,
    keep_only,
)
from segattr_onnx.graph.shapes import TensorInfo, activation_bytes_per_item
from segattr_onnx.runtime.executor import (
    BatchCap,
    Chunk,
    ChunkedRunner,
    OutputHead,
    chunk_size,
    planned_runs,
)
from segattr_onnx.runtime.sessions import SessionCache


@dataclass
class AblationVariant:
    """A layer's masked model and the pieces cut from it, built once and reused."""

    model: onnx.ModelProto
    site: AblationSite
    infos: dict[str, TensorInfo] = field(repr=False)
    dynamic_batch: bool

    @cached_property
    def suffix(self) -> SuffixGraph:
        batch_from = self.site.mask_input if self.dynamic_batch else None
        return cut_suffix(self.model, [self.site.mask_input], self.infos, batch_from=batch_from)

    @cached_property
    def prefix_model(self) -> onnx.ModelProto:
        """The masked model also exposing every tensor the suffix reads from outside."""
        return expose(self.model, self.suffix.boundary_inputs, self.infos)

    @cached_property
    def boundary_model(self) -> onnx.ModelProto:
        """Only what computes the suffix's inputs (no model output, nothing after the layer)."""
        exposed = expose(self.model, self.suffix.boundary_inputs, self.infos)
        return keep_only(exposed, self.suffix.boundary_inputs)

    @cached_property
    def suffix_bytes_per_item(self) -> int | None:
        per_item = activation_bytes_per_item(self.suffix.model, self.infos)
        if per_item is None:
            return None
        # Skip tensors broadcast to the batch inside the graph take room per item too.
        expanded = [self.infos[n].nbytes_per_item() for n in self.suffix.expanded_inputs]
        return None if None in expanded else per_item + sum(expanded)

    @cached_property
    def full_bytes_per_item(self) -> int | None:
        return activation_bytes_per_item(self.model, self.infos)


@dataclass(frozen=True)
class PrefixResult:
    """The unablated prediction and the boundary tensors the suffix runs will read."""

    outputs: dict[str, np.ndarray]
    boundary: dict[str, np.ndarray]


class AblationRunner:
    """Plans and runs kernel ablations of any layer of one model, reusing sessions."""

    def __init__(
        self,
        analysis: ModelAnalysis,
        provider: str = "auto",
        memory_budget: int | None = None,
        seed: int = 0,
        sessions: SessionCache | None = None,
        batch_cap: BatchCap | None = None,
    ) -> None:
        self.analysis = analysis
        self.memory_budget = memory_budget
        self.seed = seed
        if sessions is None:
            sessions = SessionCache(provider, external_data_dir=analysis.model.external_data_dir)
        self.sessions = sessions
        self._variants: dict[tuple[str, str], AblationVariant] = {}
        # Lowered for good once the model is seen to reject or mix batches; shared by the caller.
        self.batch_cap = batch_cap if batch_cap is not None else BatchCap()
        self.output_names = [o.name for o in analysis.outputs]

    def variant(self, layer: str | KernelLayer, form: str = "block") -> AblationVariant:
        name = layer if isinstance(layer, str) else layer.name
        key = (name, form)
        if key not in self._variants:
            model, site = insert_ablation(self.analysis, name, form=form, seed=self.seed)
            infos = {**self.analysis.tensors, **site.new_infos}
            self._variants[key] = AblationVariant(
                model, site, infos, dynamic_batch=self.analysis.input.dynamic_batch
            )
        return self._variants[key]

    def _runner(self, key: tuple, build: Callable[[], onnx.ModelProto]) -> ChunkedRunner:
        return ChunkedRunner(self.sessions.get(key, build), self.batch_cap)

    def batch_size(
        self,
        variant: AblationVariant,
        total: int,
        use_suffix: bool = True,
        memory_budget: int | None = None,
    ) -> int:
        """Masks per run; ``memory_budget`` overrides the runner's (a caller's snapshot)."""
        per_item = variant.suffix_bytes_per_item if use_suffix else variant.full_bytes_per_item
        budget = memory_budget if memory_budget is not None else self.memory_budget
        size = chunk_size(total, per_item, budget, not self.analysis.input.dynamic_batch)
        return self.batch_cap.apply(size)

    def planned_passes(self, layer: str, masks: int, form: str = "block", use_suffix=True) -> int:
        """Session runs an ablation of ``masks`` masks will take (prefix pass included)."""
        variant = self.variant(layer, form)
        runs = planned_runs(masks, self.batch_size(variant, masks, use_suffix))
        return runs + (1 if use_suffix else 0)

    def prefix(
        self, x: np.ndarray, layer: str, form: str = "block", boundary_only: bool = False
    ) -> PrefixResult:
        """One pass with every kernel kept: the suffix's inputs and (unless ``boundary_only``,
        which runs just the part of the graph they need) the prediction."""
        variant = self.variant(layer, form)
        keep_all = variant.site.masks_to_feed(np.ones((1, variant.site.channels)))
        boundary = list(variant.suffix.boundary_inputs)
        if boundary_only:
            runner = self._runner(("boundary", layer, form), lambda: variant.boundary_model)
            names = boundary
        else:
            runner = self._runner(("prefix", layer, form), lambda: variant.prefix_model)
            names = [*self.output_names, *boundary]
        used = {i.name for i in runner.session.get_inputs()}
        feeds = {self.analysis.input.name: x, variant.site.mask_input: keep_all}
        values = runner.run({k: v for k, v in feeds.items() if k in used}, names)
        return PrefixResult(
            outputs={} if boundary_only else {n: values[n] for n in self.output_names},
            boundary={n: values[n] for n in boundary},
        )

    def ablate(
        self,
        x: np.ndarray,
        layer: str,
        masks: np.ndarray,
        form: str = "block",
        use_suffix: bool = True,
        prefix: PrefixResult | None = None,
        progress: Callable[[int], None] | None = None,
        head: OutputHead | None = None,
        memory_budget: int | None = None,
    ) -> Iterator[Chunk]:
        """Predictions for each row of ``masks`` (K, C): 1 keeps a kernel, 0 ablates it.

        With a ``head``, each chunk holds the head's outputs instead of the model's.
        """
        variant = self.variant(layer, form)
        site = variant.site
        mask_feed = site.masks_to_feed(masks)
        batch = self.batch_size(variant, len(mask_feed), use_suffix, memory_budget)
        head_key = head.key if head is not None else None
        head_feeds = head.feeds if head is not None else {}
        if use_suffix:
            prefix = prefix or self.prefix(x, layer, form)
            suffix_model = variant.suffix.model
            runner = self._runner(
                ("suffix", layer, form, head_key),
                lambda: head.attach(suffix_model) if head is not None else suffix_model,
            )
            outputs: Sequence[str] = head.outputs if head is not None else variant.suffix.outputs
            yield from runner.iter_chunks(
                {**prefix.boundary, **head_feeds},
                {site.mask_input: mask_feed},
                outputs,
                batch,
                progress,
            )
            return
        full_model = variant.model
        runner = self._runner(
            ("full", layer, form, head_key),
            lambda: head.attach(full_model) if head is not None else full_model,
        )
        # A broadcast view: each chunk is made contiguous by the executor, never all K at once.
        tiled = np.broadcast_to(x, (len(mask_feed), *x.shape[1:])) if len(x) == 1 else x
        yield from runner.iter_chunks(
            dict(head_feeds),
            {self.analysis.input.name: tiled, site.mask_input: mask_feed},
            head.outputs if head is not None else self.output_names,
            batch,
            progress,
        )

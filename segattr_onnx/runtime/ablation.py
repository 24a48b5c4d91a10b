"""Kernel ablation runs: one prefix pass, then only the graph after the layer, in chunks.

For a layer with C kernels KWC needs 2·C predictions with different masks. Everything before the
ablated tensor is the same in all of them, so it runs once (the *prefix*, which also yields the
unablated prediction P); the masks then run through the *suffix* graph in memory-bounded chunks,
with the skip tensors bound once. ``use_suffix=False`` re-runs the whole masked model instead
(the slow reference the tests and benchmarks compare against).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from segattr_onnx.errors import SegattrError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.invariants import HoistedGraph, hoist_invariants
from segattr_onnx.graph.linearity import (
    CONTRIBUTION_SOURCE,
    CONTRIBUTION_WEIGHTS,
    KEEP_BASE,
    ROWS_BASE,
    ROWS_FORMED,
    ROWS_KEPT,
    LinearRead,
    contributions_model,
)
from segattr_onnx.graph.rewrite import (
    AblationSite,
    SuffixGraph,
    cut_suffix,
    expose,
    insert_ablation,
    keep_only,
)
from segattr_onnx.graph.shapes import TensorInfo, declared_dims, inferred_value_infos
from segattr_onnx.runtime.chunks import (
    BatchCap,
    Chunk,
    ChunkedRunner,
    OutputHead,
    available_memory_bytes,
    budget_holds,
    chunk_size,
    planned_runs,
)
from segattr_onnx.runtime.cpu_cache import batch_cache_bytes
from segattr_onnx.runtime.cpu_streams import chunk_streams, stream_threads
from segattr_onnx.runtime.layer_ahead import Announced, LayerAhead, LinearStart
from segattr_onnx.runtime.linear_ablation import (
    LinearPlan,
    LinearSchedule,
    LinearTail,
    TableRows,
    build_linear_tail,
    channel_group,
    group_balanced,
    row_forms,
    table_halves,
    table_rows,
    table_value_bytes,
)
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.runtime.table_memory import TableMemory, Tables


@dataclass
class AblatedLayer:
    """A layer's masked model and the pieces cut from it, built once and reused."""

    model: onnx.ModelProto
    site: AblationSite
    infos: dict[str, TensorInfo] = field(repr=False)
    dynamic_batch: bool
    external_data_dir: str | None = None

    @cached_property
    def suffix(self) -> SuffixGraph:
        batch_from = self.site.mask_input if self.dynamic_batch else None
        return cut_suffix(self.model, [self.site.mask_input], self.infos, batch_from=batch_from)

    @cached_property
    def suffix_hoisted(self) -> HoistedGraph | None:
        """The suffix split where part of it reads only the prefix's shared tensors (a skip
        half): that part runs once per layer, the rest per chunk (graph/invariants.py)."""
        return hoist_invariants(self.suffix.model, {self.site.mask_input})

    @cached_property
    def linear(self) -> LinearTail | None:
        """The readers after which rows can start, when they are linear in the mask."""
        if self.site.form != "block":
            return None
        return build_linear_tail(
            self.model,
            self.site,
            self.suffix,
            self.infos,
            self.dynamic_batch,
            self.external_data_dir,
        )

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
        """Memory one more mask takes in a suffix run (None: a shape is unknown): of the graph
        each chunk runs, without the part hoisted out of it."""
        hoisted = self.suffix_hoisted
        return run_bytes_per_item(
            hoisted.varying if hoisted is not None else self.suffix.model,
            self.infos,
            batched_inputs=[self.site.mask_input],
            broadcast=self.suffix.expanded_inputs,
        )

    @cached_property
    def linear_bytes_per_item(self) -> int | None:
        """Memory one more row takes in a run of the linear tail (its rows of the readers'
        outputs included, although they are views of the table: the estimate stays an upper
        bound)."""
        tail = self.linear
        assert tail is not None, "only a linear layer runs rows through its tail"
        return run_bytes_per_item(
            tail.per_row,
            self.infos,
            batched_inputs=[read.output for read in tail.reads],
            broadcast=tail.tail.expanded_inputs,
        )

    @cached_property
    def full_bytes_per_item(self) -> int | None:
        """Memory one more mask takes in a run of the whole masked model."""
        weights = {t.name for t in self.model.graph.initializer}
        batched = [i.name for i in self.model.graph.input if i.name not in weights]
        return run_bytes_per_item(self.model, self.infos, batched_inputs=batched)


# The most one group's row table (and its contributions in ONNX Runtime) takes, unless one
# channel alone takes more (a large 3D layer: its rows then run a channel at a time). Smaller
# groups cost time: each group's rows end with a drain of the two chunk streams and another
# grouped convolution. At 128 MB the benchmark U-Net's 6 layers ran in 28 segments instead of 6
# and KWC took 1.39x its multiply-add limit instead of 1.14x (benchmarks/kwc.py, same machine
# and hour), for a CLI peak of 280 MB instead of 630 MB; this bound only splits layers larger
# than that model's (264 MB of rows and 128 MB of K for its largest).
TABLE_BYTES = 512 << 20
# Row-table memory kept between calls (``AblationRunner.release_tables``): the benchmark
# U-Net's two buffers (264 and 136 MB: one layer's table read while the next one's is formed)
# are, so that a pipeline explaining case after case does not have the kernel zero them each
# time; the table of a layer whose one channel exceeds TABLE_BYTES may not be.
TABLE_MEMORY_KEPT = 512 << 20
# Each ablated layer holds whole copies of the model (masked, suffix, prefix), weights included: for
# every layer of a 15-layer decoder they took 540 MB of a 17 MB model. Rebuilding one costs a
# few milliseconds (25 ms on that model), so only the latest few are kept; a layer's sessions
# stay in the session cache either way. A small model keeps more, up to ABLATED_BYTES_KEPT of
# copies: rebuilding every layer's rewrites took 0.1 s of each 2 s explanation of the 0.5 MB
# benchmark U-Net.
ABLATED_LAYERS_KEPT = 2
ABLATED_BYTES_KEPT = 64 << 20
# Each kept layer holds about this many copies of the model (masked, suffix, prefix, boundary,
# tail, tail fed rows, readers).
_COPIES_PER_LAYER = 7
# Memory holds more than the tensors live at one time: blocks freed by one node serve the next
# only in part, kernels take scratch space, and on CPU the NCHWc rewrite adds reordered copies.
# Measured with the CPU arena off (as sessions.py creates sessions), RSS grew per extra batch
# item by 1.0-1.3x the live bytes on the benchmark 3D U-Net (64³, 128³) and up to 1.9x on the
# 2D one at 256²; with this factor the estimate is 0.85-1.8x the measured growth on both (up
# to 2.7x over on the smallest suffixes, a head and a few maps, where fixed costs dominate).
ALLOCATOR_SLACK = 1.6
# On CPU, ORT's NCHWc rewrite (optimisation level "all") runs a 2D Conv on copies of its input
# and output whose channels are padded to blocks of 16 (8 without AVX-512): while it runs, a
# 4-channel map takes the room of 16.
NCHWC_BLOCK = 16


def run_bytes_per_item(
    model: onnx.ModelProto,
    infos: dict[str, TensorInfo],
    batched_inputs: Collection[str] = (),
    broadcast: Collection[str] = (),
) -> int | None:
    """Bytes one more batch item takes while ONNX Runtime runs ``model`` (None: unknown dims).

    The peak, over the nodes in graph order, of the activations still needed later (not their
    sum: ORT frees a tensor after its last reader and reuses the room), times the allocator's
    slack, plus the host's copies of the batched inputs and of the outputs. ``broadcast`` names
    graph inputs that an Expand inside the graph tiles to the batch (the suffix's skip tensors).
    Tensors a rewrite added after the analysis take their shapes from onnx's inference on
    ``model``; those still unknown (shape arithmetic) are ignored.
    """
    graph = model.graph
    infos = {**infos, **_added_tensor_infos(model, infos, batched_inputs)}
    sizes: dict[str, int] = {}
    for node in graph.node:
        for name in node.output:
            if node.op_type == "Expand" and node.input[0] in broadcast:
                size = infos[node.input[0]].nbytes_per_item()
            else:
                info = infos.get(name)
                size = 0 if info is None or info.shape is None else info.nbytes_per_item()
            if size is None:
                return None
            sizes[name] = size
    last_reader: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            last_reader[name] = position
    outputs = {o.name for o in graph.output}
    live = peak = 0
    for position, node in enumerate(graph.node):
        live += sum(sizes[name] for name in node.output)
        peak = max(peak, live + _nchwc_padding_per_item(node, infos))
        for name in {*node.input, *node.output}:
            if name in sizes and name not in outputs and last_reader.get(name, -1) <= position:
                live -= sizes.pop(name)
    # The caller's chunk of inputs and the copies of the outputs it gets back live on the host.
    host = sum(sizes.get(name, 0) for name in outputs)
    for name in batched_inputs:
        size = infos[name].nbytes_per_item() if name in infos else 0
        if size is None:
            return None
        host += size
    return math.ceil(ALLOCATOR_SLACK * peak) + host


def _added_tensor_infos(
    model: onnx.ModelProto, infos: dict[str, TensorInfo], batched_inputs: Collection[str]
) -> dict[str, TensorInfo]:
    """Shapes of the tensors a rewrite added (a split Conv's halves), when they carry the batch.

    The halves computed once from the shared inputs (batch 1, or their batch symbol) and then
    broadcast take no room per item, so they are left out.
    """
    added = {o for node in model.graph.node for o in node.output if o and o not in infos}
    if not added:
        return {}
    shared = set()
    for graph_input in model.graph.input:
        dims = declared_dims(graph_input)
        if dims and graph_input.name not in batched_inputs and isinstance(dims[0], str):
            shared.add(dims[0])
    # A fixed first dim is a weight's (the batch is symbolic throughout a suffix).
    return {
        name: info
        for name, info in inferred_value_infos(model, added).items()
        if info.shape and not isinstance(info.shape[0], int) and info.shape[0] not in shared
    }


def _nchwc_padding_per_item(node: onnx.NodeProto, infos: dict[str, TensorInfo]) -> int:
    """Bytes a 2D Conv's input and output gain while padded to NCHWc channel blocks."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return 0
    total = 0
    for name in (node.input[0], node.output[0]):
        info = infos.get(name)
        if info is None or info.shape is None or len(info.shape) != 4 or not info.is_float:
            return 0
        size, channels = info.nbytes_per_item(), info.shape[1]
        if size is None or not isinstance(channels, int) or channels <= 0:
            return 0
        total += size // channels * (math.ceil(channels / NCHWC_BLOCK) * NCHWC_BLOCK - channels)
    return total


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
        device: str = "cpu",
    ) -> None:
        self.analysis = analysis
        # Where the sessions run: on the CPU a budget bounds the whole process (executor.chunk_size)
        self.device = device
        self.memory_budget = memory_budget
        self.seed = seed
        if sessions is None:
            sessions = SessionCache(provider, external_data_dir=analysis.model.external_data_dir)
        self.sessions = sessions
        self._ablated: OrderedDict[tuple[str, str], AblatedLayer] = OrderedDict()
        # Lowered for good once the model is seen to reject or mix batches; shared by the caller.
        self.batch_cap = batch_cap if batch_cap is not None else BatchCap()
        self.output_names = [o.name for o in analysis.outputs]
        # Rows start after a layer's first readers when they are linear in its mask
        # (runtime/linear_ablation.py): the readers run once per layer instead of once per row
        # (28 % fewer multiply-adds on the benchmark U-Net). False keeps the whole suffix, the
        # path the linear one is tested against.
        self.use_linearity = True
        # On the CPU a batch also stays within the last-level cache (runtime/cpu_cache.py);
        # None sizes batches by the memory budget alone. Shared with the engine's other runs.
        self.cache_bytes = batch_cache_bytes(device)
        # Chunks of a loop in flight at once, each on a share of the cores
        # (runtime/cpu_streams.py); 1 runs them one after another on every core.
        self.streams = chunk_streams(device, self.sessions.intra_op_threads)
        self._linear_plans: dict[tuple[str, str], LinearPlan | None] = {}
        # The most one group's row table takes while it is formed and read (TABLE_BYTES).
        self.table_bytes = TABLE_BYTES
        # The memory row tables are formed in, kept from one layer to the next and, up to
        # TABLE_MEMORY_KEPT, from one call to the next (``release_tables``).
        self.tables = TableMemory()
        # The next layer's start, made while this one's rows run (runtime/layer_ahead.py);
        # False makes every layer's start when it comes, the path the other is tested against.
        self.layers_ahead = True
        self.ahead = LayerAhead()

    def release_tables(self, keep: int = 0) -> None:
        """Free the row tables' memory beyond ``keep`` bytes (the next linear layer makes it
        again, once), and drop a next layer's start that no layer took."""
        self.ahead.drop()
        self.tables.release(keep)

    def linear_schedule(
        self,
        ablated: AblatedLayer,
        masks: np.ndarray,
        memory_budget: int | None = None,
        announce: bool = False,
    ) -> LinearSchedule | None:
        """How these masks' rows run through the layer's tail, or None for the ordinary
        suffix: a site that is not linear, rows of another shape, or not even one channel's
        rows fitting in a quarter of the budget (or of the free memory). The rows run in
        their order, a group of channels' table at a time: groups that fit in that and in
        ``table_bytes`` (one channel when not even one fits ``table_bytes``). ``announce``:
        these rows will run, so the table memory is told their tables' size."""
        if not self.use_linearity:
            return None
        key = (ablated.site.layer, ablated.site.form)
        if key not in self._linear_plans:  # the models stay with the (evictable) layer
            built = ablated.linear
            plan = None if built is None else LinearPlan.of(built, ablated.infos)
            self._linear_plans[key] = plan
        plan = self._linear_plans[key]
        rows = row_forms(masks) if plan is not None else None
        if plan is None or rows is None:
            return None
        budget = memory_budget if memory_budget is not None else self.memory_budget
        room = budget if budget is not None else available_memory_bytes()
        value_bytes = table_value_bytes(ablated.site.elem_type)
        channels = ablated.site.channels
        most = channel_group(plan, channels, room // 4, value_bytes)
        if most is None:
            return None
        # The byte cap bounds the group, never the path: one channel always fits in it.
        capped = channel_group(plan, channels, self.table_bytes, value_bytes) or 1
        group = group_balanced(channels, min(most, capped))
        schedule = LinearSchedule.of(plan, group, *rows)
        if announce and schedule.segments:
            # Planned before any row runs: the buffers are then made at the largest table's
            # size at once, and a later, larger table writes on in one instead of replacing it.
            self.tables.expect(schedule.table_bytes(_itemsize(ablated.site.elem_type)))
        return schedule

    def ablated(self, layer: str | KernelLayer, form: str = "block") -> AblatedLayer:
        name = layer if isinstance(layer, str) else layer.name
        key = (name, form)
        if key in self._ablated:
            self._ablated.move_to_end(key)
        else:
            model, site = insert_ablation(self.analysis, name, form=form, seed=self.seed)
            infos = {**self.analysis.tensors, **site.new_infos}
            folder = self.analysis.model.external_data_dir
            self._ablated[key] = AblatedLayer(
                model,
                site,
                infos,
                dynamic_batch=self.analysis.input.dynamic_batch,
                external_data_dir=str(folder) if folder is not None else None,
            )
            while len(self._ablated) > self._layers_kept:
                self._ablated.popitem(last=False)
        return self._ablated[key]

    @cached_property
    def _layers_kept(self) -> int:
        """Layers whose rewrites stay, by the weights' full size: a model loaded without its
        external data has a small proto, but its layers' linear tails hold real weights."""
        proto = self.analysis.model.proto
        weights = sum(
            math.prod(tensor.dims) * _itemsize(tensor.data_type)
            for tensor in proto.graph.initializer
        )
        model_bytes = max(proto.ByteSize() + weights, 1)
        return max(ABLATED_LAYERS_KEPT, ABLATED_BYTES_KEPT // (_COPIES_PER_LAYER * model_bytes))

    @property
    def bounds_process(self) -> bool:
        """Whether the budget bounds the whole process: a user's, on the CPU. Batches then get
        what the process does not hold already (``executor.chunk_size``)."""
        return self.device == "cpu" and self.memory_budget is not None

    def _runner(self, key: tuple, build: Callable[[], onnx.ModelProto]) -> ChunkedRunner:
        """A runner for single runs (once per layer or case): its session has every core."""
        return ChunkedRunner(self.sessions.get(key, build), self.batch_cap)

    def chunk_runner(
        self, key: tuple, build: Callable[[], onnx.ModelProto], streams: int
    ) -> ChunkedRunner:
        """A runner for a loop of chunks, ``streams`` at once (``streams_for``), its session
        with a stream's share of the cores."""
        session = self.sessions.get(key, build, intra_op_threads=stream_threads(streams))
        return ChunkedRunner(session, self.batch_cap, streams=streams)

    def streams_for(self, bytes_per_item: int | None, memory_budget: int | None = None) -> int:
        """Chunks at once for items of this size: ``streams`` while one item's activations fit
        the last-level cache and the budget (``memory_budget``, else the runner's) holds one
        item per stream, else 1. A bigger item streams through main memory already, and a
        second stream only competes for its bandwidth: Score-CAM's whole-model passes on the
        benchmark U-Net (103 MB an item against 32 MiB of cache) took 9 % longer in two.

        Under a user's whole-process budget, one chunk at a time: the budget's slack
        (``PROCESS_SLACK``) was measured for one, and two in flight fragment the shared arena
        beyond it (the 15-layer decoder of benchmarks/memory_budget.py at 256² peaked at
        1.01 of a 600M budget in two streams, 0.997 in one)."""
        if self.streams <= 1 or self.bounds_process:
            return 1
        if self.cache_bytes is None or not bytes_per_item:
            return 1
        if bytes_per_item > self.cache_bytes:
            return 1
        budget = memory_budget if memory_budget is not None else self.memory_budget
        if not budget_holds(self.streams, bytes_per_item, budget, self.bounds_process):
            return 1
        return self.streams

    def batch_size(
        self,
        ablated: AblatedLayer,
        total: int,
        use_suffix: bool = True,
        memory_budget: int | None = None,
        linear: bool = False,
        streams: int | None = None,
    ) -> int:
        """Masks per run; ``memory_budget`` overrides the runner's (a caller's snapshot).
        ``linear``: rows through the linear tail, whose row arithmetic takes room of its own.
        ``streams``: chunks in flight (a runner's), else ``streams_for`` these items."""
        per_item = self._bytes_per_item(ablated, use_suffix, linear)
        budget = memory_budget if memory_budget is not None else self.memory_budget
        if streams is None:
            streams = self.streams_for(per_item, budget)
        size = chunk_size(
            total,
            per_item,
            budget,
            not self.analysis.input.dynamic_batch,
            whole_process=self.bounds_process,
            cache_bytes=self.cache_bytes,
            streams=streams,
        )
        return self.batch_cap.apply(size)

    @staticmethod
    def _bytes_per_item(ablated: AblatedLayer, use_suffix: bool, linear: bool) -> int | None:
        if linear:
            return ablated.linear_bytes_per_item
        return ablated.suffix_bytes_per_item if use_suffix else ablated.full_bytes_per_item

    def _stream_runner(
        self,
        ablated: AblatedLayer,
        key: tuple,
        build: Callable[[], onnx.ModelProto],
        memory_budget: int | None,
        use_suffix: bool = True,
        linear: bool = False,
    ) -> ChunkedRunner:
        """The runner for a loop of rows, with as many streams as its items allow."""
        per_item = self._bytes_per_item(ablated, use_suffix, linear)
        return self.chunk_runner(key, build, self.streams_for(per_item, memory_budget))

    def _runner_batch(
        self,
        runner: ChunkedRunner,
        ablated: AblatedLayer,
        total: int,
        memory_budget: int | None,
        use_suffix: bool = True,
        linear: bool = False,
    ) -> int:
        """``runner``'s batch, sized once its session and the loop's shared values exist
        (under a whole-process budget their memory counts). A budget that no longer holds one
        item per stream then runs one chunk at a time."""
        per_item = self._bytes_per_item(ablated, use_suffix, linear)
        if runner.streams > 1 and self.streams_for(per_item, memory_budget) == 1:
            runner.streams = 1
        return self.batch_size(
            ablated, total, use_suffix, memory_budget, linear=linear, streams=runner.streams
        )

    def planned_passes(self, layer: str, masks: int, form: str = "block", use_suffix=True) -> int:
        """Session runs an ablation of ``masks`` masks will take through the whole suffix
        (prefix pass included); a linear layer's runs are its ``linear_schedule``'s."""
        ablated = self.ablated(layer, form)
        runs = planned_runs(masks, self.batch_size(ablated, masks, use_suffix))
        return runs + (1 if use_suffix else 0)

    def prefix(
        self, x: np.ndarray, layer: str, form: str = "block", boundary_only: bool = False
    ) -> PrefixResult:
        """One pass with every kernel kept: the suffix's inputs and (unless ``boundary_only``,
        which runs just the part of the graph they need) the prediction."""
        ablated = self.ablated(layer, form)
        keep_all = ablated.site.masks_to_feed(np.ones((1, ablated.site.channels)))
        boundary = list(ablated.suffix.boundary_inputs)
        if boundary_only:
            runner = self._runner(("boundary", layer, form), lambda: ablated.boundary_model)
            names = boundary
        else:
            runner = self._runner(("prefix", layer, form), lambda: ablated.prefix_model)
            names = [*self.output_names, *boundary]
        used = {i.name for i in runner.session.get_inputs()}
        feeds = {self.analysis.input.name: x, ablated.site.mask_input: keep_all}
        values = runner.run({k: v for k, v in feeds.items() if k in used}, names)
        return PrefixResult(
            outputs={} if boundary_only else {n: values[n] for n in self.output_names},
            boundary={n: values[n] for n in boundary},
        )

    def _ablate_linear(
        self,
        ablated: AblatedLayer,
        schedule: LinearSchedule,
        masks: np.ndarray,
        prefix: PrefixResult,
        progress: Callable[[int], None] | None,
        head: OutputHead | None,
        memory_budget: int | None,
    ) -> Iterator[Chunk]:
        """Rows through the tail, fed from each reader's table of formed rows."""
        site, plan = ablated.site, schedule.plan
        layer = site.layer
        found = row_forms(masks)
        assert found is not None
        forms, kernels = found
        start = self.ahead.take((layer, site.form), masks, prefix.boundary, schedule)
        if start is None:
            start = self._linear_start(ablated, schedule, prefix)
        try:
            runner = self._tail_runner(ablated, head, memory_budget)
            names = head.outputs if head is not None else plan.outputs
            batch = self._runner_batch(runner, ablated, len(masks), memory_budget, linear=True)
            feeds = {**start.shared, **(head.feeds if head is not None else {})}
            for first_row, stop, first in schedule.segments:
                rows = slice(first_row, stop)
                positions = table_rows(forms[rows], kernels[rows], first, schedule.group)
                tables, start.tables = start.tables, None  # the first segment's, made ahead
                if tables is None:
                    tables = self._formed_tables(ablated, schedule, start, forms[rows], first)
                # One group's rows held at a time, as planned.
                with tables as memory:
                    batched = {
                        read.output: TableRows(table, positions, shape)
                        for read, shape, table in zip(plan.reads, plan.shapes, memory, strict=True)
                    }
                    for chunk in runner.iter_chunks(feeds, batched, names, batch, progress):
                        yield Chunk(chunk.start + first_row, chunk.stop + first_row, chunk.outputs)
                    del batched
        finally:
            if start.tables is not None:
                start.tables.release()

    def _tail_runner(
        self, ablated: AblatedLayer, head: OutputHead | None, memory_budget: int | None
    ) -> ChunkedRunner:
        head_key = head.key if head is not None else None

        def tail_model() -> onnx.ModelProto:
            model = self._tail_of(ablated).per_row
            return head.attach(model) if head is not None else model

        return self._stream_runner(
            ablated,
            ("linear-tail", ablated.site.layer, ablated.site.form, head_key),
            tail_model,
            memory_budget,
            linear=True,
        )

    def _hoisted_runner(self, ablated: AblatedLayer) -> ChunkedRunner:
        return self._runner(
            ("linear-hoisted", ablated.site.layer, ablated.site.form),
            lambda: self._hoisted_of(ablated).invariant,
        )

    def _readers_runner(self, ablated: AblatedLayer) -> ChunkedRunner:
        return self._runner(
            ("linear-readers", ablated.site.layer, ablated.site.form),
            lambda: self._tail_of(ablated).readers,
        )

    def _contributions_runner(
        self, ablated: AblatedLayer, read: LinearRead, group: int, values: int, both: bool
    ) -> ChunkedRunner:
        """The grouped convolution forming one reader's rows: both halves of its table at
        once, or one (``_row_table``)."""
        site = ablated.site
        return self._runner(
            ("linear-contributions", site.layer, site.form, read.output, group, both),
            lambda: contributions_model(ablated.model, site, read, group, values, both),
        )

    def _linear_start(
        self, ablated: AblatedLayer, schedule: LinearSchedule, prefix: PrefixResult
    ) -> LinearStart:
        """The readers' Y(1) and B, and the feeds every chunk shares (the boundary tensors the
        tail reads, and its hoisted part's frontier, run once)."""
        site, plan = ablated.site, schedule.plan
        readers = self._readers_runner(ablated)
        used = {i.name for i in readers.session.get_inputs()}
        outputs = [read.output for read in plan.reads]
        bases = []
        for kept in (1.0, 0.0):  # Y(1), then B = Y(0)
            mask = site.masks_to_feed(np.full((1, site.channels), kept))
            feeds = {**prefix.boundary, site.mask_input: mask}
            bases.append(readers.run({k: v for k, v in feeds.items() if k in used}, outputs))
        shared = {name: prefix.boundary[name] for name in plan.boundary_inputs}
        if plan.frontier:  # the part no row reaches, once for all of them
            hoisted = self._hoisted_runner(ablated)
            shared.update(
                hoisted.run(
                    {name: prefix.boundary[name] for name in plan.invariant_inputs}, plan.frontier
                )
            )
        source = np.asarray(prefix.boundary[site.source])
        return LinearStart(bases, shared, source)

    def _formed_tables(
        self,
        ablated: AblatedLayer,
        schedule: LinearSchedule,
        start: LinearStart,
        forms: np.ndarray,
        first: int,
    ) -> Tables:
        """The tables of the segment of rows ``forms`` whose channels start at ``first``, in
        table memory the caller releases."""
        plan, group = schedule.plan, schedule.group
        channels = slice(first, min(first + group, ablated.site.channels))
        full_bases, rest_bases = start.bases
        dtype = full_bases[plan.reads[0].output].dtype
        shapes = [(2 * group + 2, values) for values in plan.values]
        halves = table_halves(forms)
        tables = self.tables.take(shapes, dtype)
        try:
            for read, values, weights, table in zip(
                plan.reads, plan.values, self._tail_of(ablated).weights, tables.views,
                strict=True,
            ):  # fmt: skip
                full, rest = full_bases[read.output], rest_bases[read.output]

                def runner_of(both: bool, read: LinearRead = read, values: int = values):
                    return self._contributions_runner(ablated, read, group, values, both)

                _row_table(
                    runner_of, weights, start.source, channels, group, full, rest, table, halves
                )
        except BaseException:
            tables.release()
            raise
        return tables

    def _hoisted_values(
        self,
        key: tuple,
        build: Callable[[], onnx.ModelProto],
        inputs: Sequence[str],
        frontier: Sequence[str],
        boundary: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """The frontier of a graph's hoisted part (graph/invariants.py): one run on the
        prefix's shared tensors, then fed to every chunk like them."""
        runner = self._runner(key, build)
        return runner.run({name: boundary[name] for name in inputs}, frontier)

    @classmethod
    def _hoisted_of(cls, ablated: AblatedLayer) -> HoistedGraph:
        hoisted = cls._tail_of(ablated).hoisted
        assert hoisted is not None, "a plan with a frontier has a hoisted part"
        return hoisted

    @staticmethod
    def _tail_of(ablated: AblatedLayer) -> LinearTail:
        tail = ablated.linear
        assert tail is not None, "a layer with a linear plan has a linear tail"
        return tail

    def expect(
        self,
        layer: str,
        masks: np.ndarray,
        boundary: dict[str, np.ndarray],
        form: str = "block",
        head: OutputHead | None = None,
        memory_budget: int | None = None,
    ) -> None:
        """Announce the layer whose rows the next ``ablate`` call will run, on these suffix
        inputs: once the coming call's rows are under way, that layer's start is made on a
        helper thread (runtime/layer_ahead.py)."""
        self.ahead.announce(Announced(layer, form, masks, dict(boundary), memory_budget, head))

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
        # Taken now: a loop closed before its rows got under way leaves nothing announced.
        announced = self.ahead.take_announced()
        chunks = self._chunks(
            x, layer, masks, form, use_suffix, prefix, progress, head, memory_budget
        )
        try:
            for count, chunk in enumerate(chunks):
                yield chunk
                # After the second chunk every stream has work queued (a first chunk of a
                # real batch runs alone): the announced layer's turn to start.
                if count == 1 and announced is not None:
                    try:
                        self._start_ahead(announced)
                    except SegattrError:  # that layer meets it again when it runs
                        self.ahead.drop()
        finally:
            chunks.close()

    @property
    def starts_ahead(self) -> bool:
        """Whether an announced layer's start may be made ahead: chunks run in streams (the
        CPU, no thread cap) and no whole-process budget applies (its slack was measured for
        one table and one chunk at a time)."""
        return self.layers_ahead and self.streams > 1 and not self.bounds_process

    def _start_ahead(self, announced: Announced) -> None:
        """Begin the announced layer's start on the helper thread, when its rows are linear
        and the table memory held then (both tables, each within ``table_bytes``, and the
        contributions the helper makes) stays within a quarter of the budget or of the free
        memory, as one table must. Its sessions are made here, on the calling thread (the
        warnings they may raise are the process's, not a helper's): the helper only runs
        them."""
        if not self.starts_ahead:
            return
        ablated = self.ablated(announced.layer, announced.form)
        schedule = self.linear_schedule(ablated, announced.masks, announced.memory_budget)
        found = row_forms(announced.masks)
        if schedule is None or found is None or not schedule.segments:
            return
        if set(ablated.suffix.boundary_inputs) - set(announced.boundary):
            return
        plan, group = schedule.plan, schedule.group
        first_row, stop, first = schedule.segments[0]
        next_table = schedule.table_bytes(_itemsize(ablated.site.elem_type))
        contributions = sum(group * values * 4 for values in plan.values)
        budget = (
            announced.memory_budget if announced.memory_budget is not None else self.memory_budget
        )
        room = budget if budget is not None else available_memory_bytes()
        if self.tables.bytes_after(next_table) + contributions > room // 4:
            return
        forms = found[0][first_row:stop]
        self._start_sessions(ablated, schedule, table_halves(forms))
        self._tail_runner(ablated, announced.head, announced.memory_budget)
        prefix = PrefixResult(outputs={}, boundary=announced.boundary)

        def job() -> LinearStart:
            start = self._linear_start(ablated, schedule, prefix)
            start.tables = self._formed_tables(ablated, schedule, start, forms, first)
            return start

        self.ahead.begin(announced, schedule, job)

    def _start_sessions(
        self, ablated: AblatedLayer, schedule: LinearSchedule, halves: tuple[bool, bool]
    ) -> None:
        """Every session a start made on the helper runs, made beforehand: exactly those
        ``_linear_start`` and ``_formed_tables`` ask for (the helper refuses to make one:
        ``SessionCache.get``)."""
        plan = schedule.plan
        self._readers_runner(ablated)
        if plan.frontier:
            self._hoisted_runner(ablated)
        if any(halves):
            for read, values in zip(plan.reads, plan.values, strict=True):
                self._contributions_runner(ablated, read, schedule.group, values, all(halves))

    def _chunks(
        self,
        x: np.ndarray,
        layer: str,
        masks: np.ndarray,
        form: str,
        use_suffix: bool,
        prefix: PrefixResult | None,
        progress: Callable[[int], None] | None,
        head: OutputHead | None,
        memory_budget: int | None,
    ) -> Iterator[Chunk]:
        ablated = self.ablated(layer, form)
        site = ablated.site
        mask_feed = site.masks_to_feed(masks)
        head_key = head.key if head is not None else None
        head_feeds = head.feeds if head is not None else {}
        if use_suffix:
            prefix = prefix or self.prefix(x, layer, form)
            schedule = self.linear_schedule(ablated, masks, memory_budget)
            if schedule is not None:
                yield from self._ablate_linear(
                    ablated, schedule, masks, prefix, progress, head, memory_budget
                )
                return
        self.ahead.drop()  # a start made for this layer's linear rows is of no use here
        if use_suffix:
            hoisted = ablated.suffix_hoisted
            suffix_model = hoisted.varying if hoisted is not None else ablated.suffix.model
            runner = self._stream_runner(
                ablated,
                ("suffix", layer, form, head_key),
                lambda: head.attach(suffix_model) if head is not None else suffix_model,
                memory_budget,
            )
            outputs: Sequence[str] = head.outputs if head is not None else ablated.suffix.outputs
            shared = {**prefix.boundary, **head_feeds}
            if hoisted is not None:  # the part no mask reaches, once for all of them
                shared.update(
                    self._hoisted_values(
                        ("suffix-hoisted", layer, form),
                        lambda: hoisted.invariant,
                        hoisted.invariant_inputs,
                        hoisted.frontier,
                        prefix.boundary,
                    )
                )
                read = {i.name for i in runner.session.get_inputs()}
                shared = {name: value for name, value in shared.items() if name in read}
            # Sized once the session exists: under a whole-process budget its memory counts.
            batch = self._runner_batch(runner, ablated, len(mask_feed), memory_budget)
            yield from runner.iter_chunks(
                shared,
                {site.mask_input: mask_feed},
                outputs,
                batch,
                progress,
            )
            return
        full_model = ablated.model
        runner = self._stream_runner(
            ablated,
            ("full", layer, form, head_key),
            lambda: head.attach(full_model) if head is not None else full_model,
            memory_budget,
            use_suffix=False,
        )
        batch = self._runner_batch(runner, ablated, len(mask_feed), memory_budget, use_suffix=False)
        # A broadcast view: each chunk is made contiguous by the executor, never all K at once.
        tiled = np.broadcast_to(x, (len(mask_feed), *x.shape[1:])) if len(x) == 1 else x
        yield from runner.iter_chunks(
            dict(head_feeds),
            {self.analysis.input.name: tiled, site.mask_input: mask_feed},
            head.outputs if head is not None else self.output_names,
            batch,
            progress,
        )


def _row_table(
    runner: Callable[[bool], ChunkedRunner],
    weights: np.ndarray,
    source: np.ndarray,
    channels: slice,
    group: int,
    full: np.ndarray,
    rest: np.ndarray,
    table: np.ndarray,
    halves: tuple[bool, bool] = (True, True),
) -> None:
    """Fill ``table``, (2·group + 2, O·V) in the reader's output type, with a reader's rows
    for Z's ``channels`` (at most ``group`` of them): [Y(1) − K_c; B + K_c; Y(1); B], the
    "drop" and "keep only" halves as ``halves`` asks. Both halves are one run of the grouped
    convolution on that slice of Z (``runner(True)``), padded with zero channels (the rows of
    a padding channel are never read), writing its rows in place; one half alone is one run
    of the one-half model (``runner(False)``), the "drop" half with the weights negated:
    Y(1) + (−K_c), which is Y(1) − K_c exactly."""
    per_channel = len(weights) // source.shape[1]  # O for a Conv's rows, 1 for a ConvTranspose
    taken = _padded(
        weights[channels.start * per_channel : channels.stop * per_channel],
        group * per_channel,
        axis=0,
    )
    values = full.size
    table[2 * group] = full.reshape(-1)
    table[2 * group + 1] = rest.reshape(-1)
    source_slice = _padded(source[:, channels], group, axis=1)
    dropped, kept = halves
    if dropped and kept:
        feeds = {
            CONTRIBUTION_SOURCE: source_slice,
            CONTRIBUTION_WEIGHTS: taken,
            ROWS_BASE: np.asarray(full, np.float32).reshape(1, values),
            KEEP_BASE: np.asarray(rest, np.float32).reshape(1, values),
        }
        runner(True).run_into(feeds, {ROWS_FORMED: table[:group], ROWS_KEPT: table[group:-2]})
        return
    for wanted, sign, base, rows in (
        (dropped, -1, full, table[:group]),
        (kept, 1, rest, table[group : 2 * group]),
    ):
        if wanted:
            feeds = {
                CONTRIBUTION_SOURCE: source_slice,
                CONTRIBUTION_WEIGHTS: np.negative(taken) if sign < 0 else taken,
                ROWS_BASE: np.asarray(base, np.float32).reshape(1, values),
            }
            runner(False).run_into(feeds, {ROWS_FORMED: rows})


def _padded(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``values`` with zeros appended along ``axis`` up to ``size`` (the last group of
    channels is usually short, and the grouped convolution's group count is fixed)."""
    missing = size - values.shape[axis]
    if missing == 0:
        return np.ascontiguousarray(values)
    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, missing)
    return np.pad(values, widths)


def _itemsize(elem_type: int) -> int:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize

"""Ablation rows through the graph after a layer's first (linear) readers.

When every reader of a layer's blended output is a convolution (``graph/linearity.py``), the
readers' output for a mask m is Σ_c m_c K_c + B. KWC's and Ablation-CAM's rows keep one kernel
or drop one, so each row's reader output is K_k + B or Y(1) − K_k. For a group of channels a
run of a grouped convolution makes K and forms one half of a table, [Y(1) − K_c; B + K_c;
Y(1); B] (the "drop" half from the negated weights), as the rows need; the rows are then fed
from that table, a view of it where they run in its order, to the *tail* (the part of the
graph after the readers), instead of re-running the readers for every row. Rows of any
other shape (or layers where not even one channel's rows fit the memory budget) keep the
ordinary suffix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx

from segattr_onnx.graph.invariants import HoistedGraph, hoist_invariants
from segattr_onnx.graph.linearity import (
    LinearRead,
    grouped_weights,
    linear_reads,
    rows_as_inputs,
)
from segattr_onnx.graph.rewrite import AblationSite, SuffixGraph, cut_suffix, expose, keep_only
from segattr_onnx.graph.shapes import TensorInfo

# Row shapes a mask can take: every kernel kept, none, only kernel k, all but kernel k.
FULL, NONE, KEEP, DROP = 0, 1, 2, 3


@dataclass
class LinearTail:
    """A layer's linear readers, the graph after them, and what computes their inputs."""

    reads: tuple[LinearRead, ...]
    tail: SuffixGraph  # the graph after the readers, reading their outputs
    fed: onnx.ModelProto = field(repr=False)  # the same, reading batches of rows of them
    # The suffix up to the readers' outputs, built when its session is first made (not when
    # the engine plans every layer: 0.045 s of a CLI call's start on the benchmark U-Net).
    make_readers: Callable[[], onnx.ModelProto] = field(repr=False)
    weights: tuple[np.ndarray, ...] = field(repr=False)  # each reader's, grouped per channel
    # ``fed`` split in two when part of it reads only the shared tensors (a skip half): that
    # part runs once per layer, the rest per chunk of rows (graph/invariants.py).
    hoisted: HoistedGraph | None = field(default=None, repr=False)

    @cached_property
    def readers(self) -> onnx.ModelProto:
        return self.make_readers()

    @property
    def per_row(self) -> onnx.ModelProto:
        """The graph each chunk of rows runs."""
        return self.hoisted.varying if self.hoisted is not None else self.fed


@dataclass(frozen=True)
class LinearPlan:
    """What running a layer's rows through its tail needs besides the models: the readers,
    and the tail's inputs, outputs and size. Kept per layer by the runner (a few names),
    where the models themselves go with the layer's other rewrites and are rebuilt only when
    a session must be built again."""

    reads: tuple[LinearRead, ...]
    boundary_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    node_count: int
    values: tuple[int, ...]  # each reader's output size per item, O·V
    shapes: tuple[tuple[int, ...], ...]  # each reader's output shape per item, (O, *S')
    invariant_inputs: tuple[str, ...] = ()  # what the hoisted part reads (none: no such part)
    frontier: tuple[str, ...] = ()  # what it gives the rows' runs

    @classmethod
    def of(cls, tail: LinearTail, infos: dict[str, TensorInfo]) -> LinearPlan:
        shapes = []
        for read in tail.reads:
            shape = infos[read.output].shape
            assert shape is not None
            shapes.append(tuple(int(d) for d in shape[1:]))
        hoisted = tail.hoisted
        boundary = tail.tail.boundary_inputs
        if hoisted is not None:
            kept = {i.name for i in hoisted.varying.graph.input}
            boundary = tuple(name for name in boundary if name in kept)
        return cls(
            tail.reads,
            boundary,
            tail.tail.outputs,
            tail.tail.node_count,
            tuple(math.prod(shape) for shape in shapes),
            tuple(shapes),
            hoisted.invariant_inputs if hoisted is not None else (),
            hoisted.frontier if hoisted is not None else (),
        )


@dataclass(frozen=True)
class LinearSchedule:
    """How a layer's rows run through its tail: the rows of ``group`` channels are
    held at once, and ``segments`` are the runs of rows, in their order, whose kernels lie in
    one such group: (start, stop, first channel)."""

    plan: LinearPlan
    group: int
    segments: tuple[tuple[int, int, int], ...]
    formations: int  # segments whose rows need a table formed ("drop" or "keep only" rows)

    @classmethod
    def of(
        cls, plan: LinearPlan, group: int, forms: np.ndarray, kernels: np.ndarray
    ) -> LinearSchedule:
        segments = row_segments(forms, kernels, group)
        formations = sum(any(table_halves(forms[start:stop])) for start, stop, _ in segments)
        return cls(plan, group, segments, formations)

    @property
    def layer_runs(self) -> int:
        """Runs besides the rows' chunks: the readers' Y(1) and B, the tail's hoisted part
        (if any), then each reader's table once per segment that needs one (both halves of
        it, or the one half its rows read, in one run)."""
        hoisted = 1 if self.plan.frontier else 0
        return 2 + hoisted + self.formations * len(self.plan.reads)

    def table_bytes(self, itemsize: int) -> int:
        """Bytes of one segment's table, every reader's rows of ``group`` channels and the
        two bases, in a type of ``itemsize`` bytes (``_row_table``)."""
        return sum((2 * self.group + 2) * values * itemsize for values in self.plan.values)

    def session_runs(self, batch_size: int) -> int:
        chunks = sum(-(-(stop - start) // batch_size) for start, stop, _ in self.segments)
        return chunks + self.layer_runs


def channel_group(plan: LinearPlan, channels: int, room: int, value_bytes: int = 12) -> int | None:
    """The most channels whose rows fit in ``room`` bytes with the bases and their host copies
    (C when all do), or None when not even one does. ``value_bytes``: what one channel takes
    per value while its rows are formed (``table_value_bytes``)."""
    per_channel = sum(values * value_bytes for values in plan.values)
    fixed = sum(values * 4 * 4 for values in plan.values)  # bases, and Y(1), B on the host
    if per_channel == 0 or room < fixed + per_channel:
        return None
    return int(min(channels, (room - fixed) // per_channel))


def table_halves(forms: np.ndarray) -> tuple[bool, bool]:
    """Which halves of a group's table a segment of rows reads: ("drop k" rows, "keep only k"
    rows). Rows keeping all or none read only the bases, which every table holds."""
    return bool(DROP in forms), bool(KEEP in forms)


def group_balanced(channels: int, most: int) -> int:
    """The group size that splits ``channels`` into as few groups of at most ``most`` as
    possible, as evenly as possible (32 channels at most 12 a group: three groups of 11, not
    12 + 12 + 8), so the last group's padding is small."""
    groups = -(-channels // max(most, 1))
    return -(-channels // groups)


def row_segments(
    forms: np.ndarray, kernels: np.ndarray, group: int
) -> tuple[tuple[int, int, int], ...]:
    """Consecutive rows whose kernels share a group of ``group`` channels. A row that keeps
    every kernel or none needs no contribution and joins the segment it is in (the next one,
    when it comes first)."""
    segments: list[list[int]] = []
    pending_from = None  # rows needing no contribution before any segment
    for position, (form, kernel) in enumerate(zip(forms, kernels, strict=True)):
        if form in (FULL, NONE):
            if segments:
                segments[-1][1] = position + 1
            elif pending_from is None:
                pending_from = position
            continue
        first = int(kernel) // group * group
        if segments and first == segments[-1][2]:
            segments[-1][1] = position + 1
        else:
            start = position if pending_from is None else pending_from
            segments.append([start, position + 1, first])
            pending_from = None
    if pending_from is not None:  # only rows that need no contribution: any group serves
        segments.append([pending_from, len(kernels), 0])
    return tuple((start, stop, first) for start, stop, first in segments)


def build_linear_tail(
    model: onnx.ModelProto,
    site: AblationSite,
    suffix: SuffixGraph,
    infos: dict[str, TensorInfo],
    dynamic_batch: bool,
    base_dir: str | None,
) -> LinearTail | None:
    """The tail after the readers, or None when the site is not linear, a reader's output
    shape is not known, or the tail would read a tensor the suffix's own inputs do not hold.
    Readers composed with the convolution after them are tried first, then the readers alone
    (a skip joined to a composed ConvTranspose's output may itself depend on Z)."""

    def tail_for(reads: tuple[LinearRead, ...]) -> LinearTail | None:
        outputs = [read.output for read in reads]
        if set(outputs) & {o.name for o in model.graph.output}:
            return None  # a reader is the model's last layer: nothing runs after it
        shapes = {}
        for name in outputs:
            info = infos.get(name)
            if info is None or info.shape is None or not _known(info.shape[1:]):
                return None
            shapes[name] = tuple(int(d) for d in info.shape[1:])
        tail = cut_suffix(model, outputs, infos, batch_from=outputs[0] if dynamic_batch else None)
        if not set(tail.boundary_inputs) <= set(suffix.boundary_inputs):
            return None

        def readers() -> onnx.ModelProto:
            return keep_only(expose(suffix.model, outputs, infos), outputs)

        weights = tuple(grouped_weights(model, site, read, base_dir) for read in reads)
        fed = rows_as_inputs(tail.model, reads, shapes)
        hoisted = hoist_invariants(fed, set(outputs))
        return LinearTail(reads, tail, fed, readers, weights, hoisted)

    composed = linear_reads(model, site, compose=True, infos=infos)
    if composed is None:
        return None
    tail = tail_for(composed)
    if tail is None and any(read.after is not None for read in composed):
        plain = linear_reads(model, site, compose=False, infos=infos)
        if plain is not None:
            tail = tail_for(plain)
    return tail


def _known(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def row_forms(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's form (FULL, NONE, KEEP or DROP) and its kernel k, or None when a row keeps
    some kernels other than all, none, one or all but one, or keeps a fraction of one."""
    values = np.asarray(masks)
    if not np.isin(values, (0, 1)).all():
        return None  # a fraction of a kernel is not one of the four forms
    binary = values != 0
    channels = binary.shape[1]
    kept = binary.sum(axis=1)
    forms = np.full(len(binary), -1, dtype=np.int64)
    forms[kept == channels] = FULL
    forms[kept == 0] = NONE
    forms[(kept == 1) & (channels > 1)] = KEEP
    forms[(kept == channels - 1) & (channels > 1)] = DROP
    if (forms < 0).any():
        return None
    kernels = np.where(forms == KEEP, binary.argmax(axis=1), (~binary).argmax(axis=1))
    return forms, kernels


def table_value_bytes(elem_type: int) -> int:
    """What one channel takes per value while its rows are formed: its two rows in the table
    (Y(1) − K_c and B + K_c, in the model's type) and K_c in ONNX Runtime's memory, plus the
    float32 copies of all three when the model's type is not float32."""
    item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    return 3 * item + (0 if elem_type == onnx.TensorProto.FLOAT else 3 * 4)


def table_rows(forms: np.ndarray, kernels: np.ndarray, first: int, group: int) -> np.ndarray:
    """Each row's position in the table of the group of channels from ``first``:
    [Y(1) − K_c for its ``group`` channels; B + K_c for them; Y(1); B]."""
    offsets = np.asarray(kernels, dtype=np.int64) - first
    return np.select(
        [forms == DROP, forms == KEEP, forms == FULL],
        [offsets, group + offsets, 2 * group],
        2 * group + 1,
    ).astype(np.int64)


class TableRows:
    """A segment's rows of one reader's output, (rows, *shape), taken from its table a chunk at
    a time as the chunk loop slices them: rows in table order come as views, others are
    copied one chunk at a time (what a chunk's inputs may take), never the whole segment."""

    def __init__(self, table: np.ndarray, positions: np.ndarray, shape: tuple[int, ...]) -> None:
        self.table = table
        self.positions = positions
        self.shape = shape

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, rows: slice) -> np.ndarray:
        taken = take_rows(self.table, self.positions[rows])
        return taken.reshape(len(taken), *self.shape)


def take_rows(table: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``table[positions]``: a view when the positions run consecutively, as KWC's and
    Ablation-CAM's rows do (every "drop k" of a group, then every "keep only k"), so the rows
    reach ONNX Runtime without a copy; a copy otherwise."""
    count = len(positions)
    if count and np.array_equal(positions, np.arange(positions[0], positions[0] + count)):
        return table[positions[0] : positions[0] + count]
    return table[positions]

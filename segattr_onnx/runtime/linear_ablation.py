"""Ablation rows through the graph after a layer's first (linear) readers.

When every reader of a layer's blended output is a convolution (``graph/linearity.py``), the
readers' output for a mask m is Σ_c m_c K_c + B. KWC's and Ablation-CAM's rows keep one kernel
or drop one, so each row's reader output is K_k + B or Y(1) − K_k: formed here from the
contributions K (one grouped convolution per reader, once per layer) instead of re-running the
readers for every row, and fed to the *tail*, the part of the graph after the readers. Rows of
any other shape (or contributions that do not fit the memory budget) keep the ordinary suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from segattr_onnx.graph.linearity import LinearRead, contributions_model, linear_reads
from segattr_onnx.graph.rewrite import AblationSite, SuffixGraph, cut_suffix, expose, keep_only
from segattr_onnx.graph.shapes import TensorInfo

# Row shapes a mask can take: every kernel kept, none, only kernel k, all but kernel k.
FULL, NONE, KEEP, DROP = 0, 1, 2, 3


@dataclass
class LinearTail:
    """A layer's linear readers, the graph after them, and what computes their inputs."""

    reads: tuple[LinearRead, ...]
    tail: SuffixGraph
    readers: onnx.ModelProto = field(repr=False)  # the suffix up to the readers' outputs
    contributions: tuple[onnx.ModelProto, ...] = field(repr=False)


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

    @classmethod
    def of(cls, tail: LinearTail) -> LinearPlan:
        return cls(tail.reads, tail.tail.boundary_inputs, tail.tail.outputs, tail.tail.node_count)


def build_linear_tail(
    model: onnx.ModelProto,
    site: AblationSite,
    suffix: SuffixGraph,
    infos: dict[str, TensorInfo],
    dynamic_batch: bool,
    base_dir: str | None,
) -> LinearTail | None:
    """The tail after the readers, or None when the site is not linear or the tail would read
    a tensor the suffix's own inputs do not hold."""
    reads = linear_reads(model, site)
    if reads is None:
        return None
    outputs = [read.output for read in reads]
    if set(outputs) & {o.name for o in model.graph.output}:
        return None  # a reader is the model's last layer: nothing runs after it
    tail = cut_suffix(model, outputs, infos, batch_from=outputs[0] if dynamic_batch else None)
    if not set(tail.boundary_inputs) <= set(suffix.boundary_inputs):
        return None
    readers = keep_only(expose(suffix.model, outputs, infos), outputs)
    built = tuple(contributions_model(model, site, read, base_dir) for read in reads)
    return LinearTail(reads, tail, readers, built)


def row_forms(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's form (FULL, NONE, KEEP or DROP) and its kernel k, or None when a row keeps
    some kernels other than all, none, one or all but one."""
    binary = np.asarray(masks) != 0
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


@dataclass
class LinearRows:
    """One reader's output for rows [start, stop), made when a chunk asks for it (a batched
    feed of ``ChunkedRunner.iter_chunks``): K_k + B, Y(1) − K_k, Y(1) or B.

    Each row is one float32 add into the chunk's own buffer: the rows are as large as the
    reader's output, so a float64 detour would cost more memory traffic than the convolution
    the row replaces."""

    contributions: np.ndarray = field(repr=False)  # (C, O, V) float32
    full: np.ndarray = field(repr=False)  # Y(1) as (O, V), float32
    rest: np.ndarray = field(repr=False)  # B = Y(1) − Σ_c K_c, (O, V), float32
    forms: np.ndarray
    kernels: np.ndarray
    shape: tuple[int, ...]  # one row's shape, (O, *S')
    dtype: np.dtype

    def __len__(self) -> int:
        return len(self.forms)

    def __getitem__(self, rows: slice) -> np.ndarray:
        forms, kernels = self.forms[rows], self.kernels[rows]
        result = np.empty((len(forms), *self.full.shape), dtype=np.float32)
        for position, (form, k) in enumerate(zip(forms, kernels, strict=True)):
            if form == FULL:
                result[position] = self.full
            elif form == NONE:
                result[position] = self.rest
            elif form == KEEP:
                np.add(self.rest, self.contributions[k], out=result[position])
            else:
                np.subtract(self.full, self.contributions[k], out=result[position])
        rows_out = result.reshape(len(forms), *self.shape)
        return rows_out if self.dtype == np.float32 else rows_out.astype(self.dtype)


def contribution_bytes(tail: LinearPlan, infos: dict[str, TensorInfo], channels: int) -> int:
    """Memory the contributions take at once: C × O × V values per reader, float64 included
    for the row arithmetic's copies of Y(1) and B."""
    total = 0
    for read in tail.reads:
        info = infos[read.output]
        assert info.shape is not None
        values = int(np.prod([int(d) for d in info.shape[1:]]))
        total += channels * values * 4 + 2 * values * 8
    return total

"""Ablation rows through the graph after a layer's first (linear) readers.

When every reader of a layer's blended output is a convolution (``graph/linearity.py``), the
readers' output for a mask m is Σ_c m_c K_c + B. KWC's and Ablation-CAM's rows keep one kernel
or drop one, so each row's reader output is K_k + B or Y(1) − K_k: formed inside the *tail* (the
part of the graph after the readers) from the contributions K, computed by one grouped
convolution per reader once per layer, instead of re-running the readers for every row. Rows of
any other shape (or contributions that do not fit the memory budget) keep the ordinary suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from segattr_onnx.graph.linearity import (
    ROW_BASE,
    ROW_KERNEL,
    ROW_SIGN,
    LinearRead,
    bases_input,
    contributions_input,
    contributions_model,
    forming_rows,
    linear_reads,
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
    formed: onnx.ModelProto = field(repr=False)  # the same, forming those outputs from rows
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
    """The tail after the readers, or None when the site is not linear, a reader's output
    shape is not known, or the tail would read a tensor the suffix's own inputs do not hold."""
    reads = linear_reads(model, site)
    if reads is None:
        return None
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
    readers = keep_only(expose(suffix.model, outputs, infos), outputs)
    built = tuple(contributions_model(model, site, read, base_dir) for read in reads)
    return LinearTail(reads, tail, forming_rows(tail.model, reads, shapes), readers, built)


def _known(dims) -> bool:
    return all(isinstance(d, int) for d in dims)


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


def row_feeds(masks: np.ndarray) -> dict[str, np.ndarray] | None:
    """The tail's per-row inputs for these masks (kernel, base, sign), or None when a row is
    not of one of the four forms."""
    found = row_forms(masks)
    if found is None:
        return None
    forms, kernels = found
    base = np.where((forms == FULL) | (forms == DROP), 0, 1).astype(np.int64)
    sign = np.select([forms == KEEP, forms == DROP], [1.0, -1.0], 0.0).astype(np.float32)
    return {
        ROW_KERNEL: np.ascontiguousarray(kernels, dtype=np.int64),
        ROW_BASE: base,
        ROW_SIGN: sign.reshape(-1, 1),
    }


def reader_feeds(
    read: LinearRead, contributions: np.ndarray, full: np.ndarray
) -> dict[str, np.ndarray]:
    """A reader's shared tail inputs: K as (C, O·V) and the bases [Y(1); B], float32.

    B = Y(1) − Σ_c K_c is summed in float64 (C terms of similar size would otherwise lose the
    last bits of the bias); Y(1) is the reader's own output, so unablated rows equal it.
    """
    flat_full = np.asarray(full, dtype=np.float64).reshape(1, -1)
    flat = np.asarray(contributions, dtype=np.float32).reshape(len(contributions), -1)
    rest = flat_full - flat.sum(axis=0, dtype=np.float64)
    bases = np.concatenate([flat_full, rest]).astype(np.float32)
    return {contributions_input(read): flat, bases_input(read): bases}


def contribution_bytes(tail: LinearPlan, infos: dict[str, TensorInfo], channels: int) -> int:
    """Memory the contributions take at once: C × O × V values per reader, plus the bases and
    their float64 arithmetic on the host."""
    total = 0
    for read in tail.reads:
        info = infos[read.output]
        assert info.shape is not None
        values = int(np.prod([int(d) for d in info.shape[1:]]))
        total += channels * values * 4 + 2 * values * 4 + 2 * values * 8
    return total

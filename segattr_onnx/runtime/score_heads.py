"""The score head: a statistic's reduction appended to the graph, so only rows leave ORT.

Without it every chunk's whole prediction comes back to the host to be reduced to statistic
rows; with it each run returns a few numbers per row. A head depends only on the target's
output (the class index and region are fed at run time), so one serves every request of a
target. A model the head cannot extend is reported once, and its rows are reduced on the host
from then on. This module builds heads and turns a chunk's outputs into rows either way.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

import numpy as np

from segattr_onnx.errors import SegattrError
from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.graph.heads import (
    HEAD_COLUMNS,
    MIN_OPSET,
    ScoreHeadSpec,
    append_score_head,
    unused_prefix,
)
from segattr_onnx.graph.index import opset_of
from segattr_onnx.runtime.chunks import OutputHead
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.target import ResolvedTarget

if TYPE_CHECKING:
    from segattr_onnx.methods.base import Case, PredictionStatistic


class ScoreHeads:
    """The heads of one analysed model, and whether its rows are still reduced in the graph."""

    def __init__(
        self, analysis: ModelAnalysis, sessions: SessionCache, enabled: bool = True
    ) -> None:
        self.analysis = analysis
        self.sessions = sessions
        self.enabled = enabled
        self._checked: set[ScoreHeadSpec] = set()  # heads the full model is known to take
        proto = analysis.model.proto
        names = {n for node in proto.graph.node for n in (*node.input, *node.output)}
        names |= {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
        self._prefix = unused_prefix(frozenset(names))

    def spec(self, target: ResolvedTarget) -> ScoreHeadSpec:
        """The head for a target's output (class index fed at run time, not built in)."""
        info = self.analysis.tensors[target.output]
        assert info.shape is not None
        return ScoreHeadSpec(
            output=target.output,
            elem_type=info.elem_type,
            rank=len(info.shape),
            channel_axis=target.channel_axis,
            activation=target.activation,
            prefix=self._prefix,
            classes=_static_size(info.shape, target.channel_axis),
        )

    def head(self, case: Case, statistic: PredictionStatistic) -> OutputHead | None:
        """The in-graph reduction for ``statistic``, or None to reduce chunks on the host."""
        if not self.enabled or statistic.head_columns is None:
            return None
        target = case.target
        info = self.analysis.tensors.get(target.output)
        if info is None or info.shape is None or opset_of(self.analysis.model.proto) < MIN_OPSET:
            return None
        spec = self.spec(target)
        model = self.analysis.model.proto
        head = OutputHead(
            key=("score-head", spec),
            # A partial, not a lambda: work items carry the head to other processes.
            attach=functools.partial(append_score_head, spec=spec),
            outputs=spec.outputs,
            feeds=spec.feeds(case.prediction, case.region, target.class_index),
        )
        if spec not in self._checked:
            # Build the full-model head once; a model it cannot extend falls back to the host.
            try:
                self.sessions.get(("full", head.key), lambda: head.attach(model))
            except SegattrError as exc:
                warnings.warn(
                    f"reducing predictions inside the graph failed ({exc}); reducing them on the "
                    "host instead",
                    stacklevel=2,
                )
                self.enabled = False
                return None
            self._checked.add(spec)
        return head


def statistic_rows(
    head: OutputHead | None,
    statistic: PredictionStatistic,
    case: Case,
    outputs: dict[str, np.ndarray],
) -> np.ndarray:
    """One chunk's rows of ``statistic``: read from the head's outputs, or reduced on the host
    from the chunk's predictions when it ran without a head."""
    if head is None:
        probabilities = case.target.probabilities(outputs[case.target.output])
        return statistic.reduce(probabilities, case)
    by_column = dict(zip(HEAD_COLUMNS, head.outputs, strict=True))  # same order by design
    assert statistic.head_columns is not None
    return np.stack([outputs[by_column[c]] for c in statistic.head_columns], axis=1)


def _static_size(shape: tuple, axis: int | None) -> int | None:
    """The size of ``axis`` when the graph fixes it (an int), else None."""
    if axis is None:
        return None
    size = shape[axis]
    return size if isinstance(size, int) and not isinstance(size, bool) else None

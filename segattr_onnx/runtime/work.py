"""Work items as plain data, and the executor that runs them in this process.

A case's kernel ablations are the bulk of KWC's and Ablation-CAM's time (thousands of passes
for a 3D decoder). To spread them over other processes or machines, what one batch needs must
travel: an ``AblationWork`` holds it as plain, picklable data (which layer and form, the rows
of masks, the suffix's boundary tensors, the score head's spec and feeds). The graphs do not
travel: a worker rebuilds the same ones, deterministically, from the model and the input size.

``LocalExecutor`` runs work items on this process's sessions; another executor (a cluster's)
implements the same ``run_ablation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from segattr_onnx.graph.heads import ScoreHeadSpec, append_score_head
from segattr_onnx.runtime.ablation import AblationRunner, PrefixResult
from segattr_onnx.runtime.executor import Chunk, OutputHead


@dataclass(frozen=True)
class AblationWork:
    """One layer's kernel ablations for one case, as data any executor can run.

    ``boundary`` holds the tensors the layer's suffix graph reads from before the layer (batch
    1), ``None`` when the runs take the whole model (then ``x`` is what they read).
    ``head_spec`` and ``head_feeds`` describe the in-graph reduction, when there is one.
    """

    layer: str
    form: str
    masks: np.ndarray  # (K, C): 1 keeps a kernel, 0 ablates it
    x: np.ndarray = field(repr=False)
    boundary: dict[str, np.ndarray] | None = field(default=None, repr=False)
    head_spec: ScoreHeadSpec | None = None
    head_feeds: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    memory_budget: int | None = None

    @property
    def use_suffix(self) -> bool:
        return self.boundary is not None

    def head(self) -> OutputHead | None:
        """The score head to append to the graphs that run this work."""
        spec = self.head_spec
        if spec is None:
            return None
        return OutputHead(
            key=("score-head", spec),
            attach=lambda graph: append_score_head(graph, spec),
            outputs=spec.outputs,
            feeds=self.head_feeds,
        )


class Executor(Protocol):
    """What runs work items: this process's sessions, or a cluster's workers."""

    def run_ablation(
        self, work: AblationWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        """The chunks of ``work``'s rows, in order, as they finish."""
        ...


class LocalExecutor:
    """Runs work items on this process's ONNX Runtime sessions (an ``AblationRunner``)."""

    def __init__(self, runner: AblationRunner) -> None:
        self.runner = runner

    def run_ablation(
        self, work: AblationWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        prefix = (
            PrefixResult(outputs={}, boundary=work.boundary) if work.boundary is not None else None
        )
        yield from self.runner.ablate(
            work.x,
            work.layer,
            work.masks,
            form=work.form,
            use_suffix=work.use_suffix,
            prefix=prefix,
            progress=progress,
            head=work.head(),
            memory_budget=work.memory_budget,
        )

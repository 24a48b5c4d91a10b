"""Work items as plain data, and the executor that runs them in this process.

A case's kernel ablations are the bulk of KWC's and Ablation-CAM's time (thousands of passes
for a 3D decoder). To spread them over other processes or machines, what one batch needs must
travel: an ``AblationWork`` holds it as plain, picklable data (which layer and form, the rows
of masks, the suffix's boundary tensors, the score head). The graphs do not
travel: a worker rebuilds the same ones, deterministically, from the model and the input size.

``LocalExecutor`` runs work items on this process's sessions; another executor (a cluster's)
implements the same ``run_ablation``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from segattr_onnx.runtime.ablation import AblationRunner, PrefixResult
from segattr_onnx.runtime.chunks import Chunk, OutputHead


@dataclass(frozen=True)
class AblationWork:
    """One layer's kernel ablations for one case, as data any executor can run.

    ``boundary`` holds the tensors the layer's suffix graph reads from before the layer (batch
    1), ``None`` when the runs take the whole model (then ``x`` is what they read).
    ``head`` is the in-graph reduction, when there is one (picklable: its ``attach`` is a
    partial of ``graph.heads.append_score_head``).
    """

    layer: str
    form: str
    masks: np.ndarray  # (K, C): 1 keeps a kernel, 0 ablates it
    x: np.ndarray = field(repr=False)
    boundary: dict[str, np.ndarray] | None = field(default=None, repr=False)
    head: OutputHead | None = field(default=None, repr=False)
    memory_budget: int | None = None

    @property
    def use_suffix(self) -> bool:
        return self.boundary is not None


@dataclass(frozen=True)
class InputsWork:
    """Re-predictions of ``count`` modified inputs of the whole model, as data.

    ``make_inputs(start, stop)`` builds rows in the model's layout (the built-in ones are
    picklable dataclasses); ``outputs`` are what comes back: the head's, or the model output.
    """

    make_inputs: Callable[[int, int], np.ndarray] = field(repr=False)
    count: int
    outputs: tuple[str, ...]
    batch_size: int
    head: OutputHead | None = field(default=None, repr=False)
    streams: int = 1  # chunks in flight at once, when run in this process (cpu_streams.py)


class Executor(Protocol):
    """What runs work items: this process's sessions, or a cluster's workers."""

    def run_ablation(
        self, work: AblationWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        """The chunks of ``work``'s rows, in order, as they finish."""
        ...

    def run_inputs(
        self, work: InputsWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        """The chunks of ``work``'s re-predictions, in order, as they finish."""
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
            head=work.head,
            memory_budget=work.memory_budget,
        )

    @property
    def starts_ahead(self) -> bool:
        """Whether announcing work (``expect_ablation``) can start it ahead here."""
        return self.runner.starts_ahead

    def expect_ablation(self, work: AblationWork) -> None:
        """The ablation that runs after the next one: its layer's start is made while the
        next one's rows run (runtime/layer_ahead.py)."""
        if work.boundary is not None:
            self.runner.expect(
                work.layer,
                work.masks,
                work.boundary,
                form=work.form,
                head=work.head,
                memory_budget=work.memory_budget,
            )

    def run_inputs(
        self, work: InputsWork, progress: Callable[[int], None] | None = None
    ) -> Iterator[Chunk]:
        analysis = self.runner.analysis
        model = analysis.model.proto
        head = work.head
        # The planner's streams, within this process's own: a cluster worker capped to its
        # CPUs runs one chunk at a time whatever the driver planned.
        streams = min(work.streams, self.runner.streams)
        if head is not None:
            runner = self.runner.chunk_runner(
                ("full", head.key), lambda: head.attach(model), streams
            )
        else:
            runner = self.runner.chunk_runner(("full", None), lambda: model, streams)
        feed = LazyRows(work.count, work.make_inputs)
        shared = dict(head.feeds) if head is not None else {}
        yield from runner.iter_chunks(
            shared, {analysis.input.name: feed}, work.outputs, work.batch_size, progress
        )


class LazyRows:
    """Rows of a stack built only when a chunk asks for them (K masked inputs never coexist)."""

    def __init__(self, count: int, make: Callable[[int, int], np.ndarray]) -> None:
        self._count = count
        self._make = make

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self._count)
        if step != 1:
            raise IndexError("rows are built in contiguous chunks only")
        return self._make(start, stop)

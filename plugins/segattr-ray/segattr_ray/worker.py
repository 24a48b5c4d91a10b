"""What runs inside one Ray actor: an explainer rebuilt from its recipe, once per actor.

ONNX Runtime sessions cannot be pickled and should not be: each actor builds its own from the
model bytes it receives once (through the object store), and keeps them for every item it is
sent. Errors the user must act on (a ``SegattrError``) come back as values, so the driver
raises the same class with the same one-line message instead of a remote traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from segattr_onnx.errors import SegattrError
from segattr_onnx.runtime.backends import ExplainerRecipe
from segattr_onnx.runtime.chunks import Chunk
from segattr_onnx.runtime.providers import CpuFallbackWarning
from segattr_onnx.runtime.work import AblationWork, InputsWork


@dataclass(frozen=True)
class Failed:
    """A ``SegattrError`` raised on a worker, to be raised again on the driver."""

    error: type[SegattrError]
    message: str

    def raise_again(self) -> None:
        raise self.error(self.message)


@dataclass(frozen=True)
class RowsFrom:
    """``make(start + i, ...)``: a slice of a masked-input builder, as its own builder."""

    make: Callable
    offset: int

    def __call__(self, start: int, stop: int):
        return self.make(self.offset + start, self.offset + stop)


class SegattrWorker:
    """One actor's explainer and the three kinds of work it runs.

    Every call carries the recipe's object reference (``shipped``: in a list, so that Ray
    hands over the reference, not a copy); the explainer is built on the first call. A
    restarted actor thus rebuilds it from the next call alone, with no constructor state.
    """

    def __init__(self) -> None:
        # The driver says once that "auto" found no GPU; each worker saying it again is noise
        # (other warnings, a memory budget's, still reach the driver's terminal).
        warnings.filterwarnings("ignore", category=CpuFallbackWarning)
        self._explainer = None
        self._folder: str | None = None
        self.items = 0  # items run since this process started, for tests and benchmarks

    def _explainer_for(self, shipped: list):
        if self._explainer is None:
            import ray

            recipe: ExplainerRecipe = ray.get(shipped[0])
            if recipe.model.has_external_data:  # ONNX Runtime reads those files from disk
                self._folder = tempfile.mkdtemp(prefix="segattr-ray-")
            self._explainer = recipe.build(Path(self._folder) if self._folder else None)
        return self._explainer

    def cleanup(self) -> None:
        """Delete the unpacked model files, before the actor is killed (a killed process
        runs no finaliser)."""
        self._explainer = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def pid(self) -> int:
        return os.getpid()

    def items_run(self) -> int:
        return self.items

    def run(self, shipped: list, job: Callable, item):
        """``job(explainer, item)``: one audit case run."""
        self.items += 1
        try:
            return job(self._explainer_for(shipped), item)
        except SegattrError as exc:
            return Failed(type(exc), str(exc))

    def ablate(
        self, shipped: list, work: AblationWork, start: int, stop: int
    ) -> list[Chunk] | Failed:
        """Rows ``start:stop`` of ``work``'s kernel ablations, numbered as in ``work``."""
        self.items += 1
        try:
            local = self._explainer_for(shipped).local_executor(work.x.shape)
            part = replace(work, masks=work.masks[start:stop])
            return [_shifted(c, start) for c in local.run_ablation(part)]
        except SegattrError as exc:
            return Failed(type(exc), str(exc))

    def predict(
        self, shipped: list, work: InputsWork, start: int, stop: int, input_shape: tuple[int, ...]
    ) -> list[Chunk] | Failed:
        """Re-predictions ``start:stop`` of ``work``'s masked inputs, numbered as in ``work``."""
        self.items += 1
        try:
            local = self._explainer_for(shipped).local_executor(input_shape)
            part = replace(work, make_inputs=RowsFrom(work.make_inputs, start), count=stop - start)
            return [_shifted(c, start) for c in local.run_inputs(part)]
        except SegattrError as exc:
            return Failed(type(exc), str(exc))


def _shifted(chunk: Chunk, offset: int) -> Chunk:
    return Chunk(chunk.start + offset, chunk.stop + offset, chunk.outputs)

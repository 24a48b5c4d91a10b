"""Where work runs: this process, or the workers of a cluster (``--executor``).

Users outgrow one process in two ways, and an executor backend serves both:

- **dataset scale**: ``map(explainer, job, items)`` runs ``job(worker_explainer, item)`` for
  every item (an audit's case × method runs) and yields ``(index, result)`` as each finishes;
- **case scale**: ``case_executor(explainer, runner)`` is the ``runtime.work.Executor`` that
  runs one input size's work items (kernel ablations, masked inputs, curve steps).

"local" is built in; plugins register others (``registry.add_executor``; ``segattr-ray``
adds "ray"). A worker never receives a session or a graph: it rebuilds the same explainer from
an ``ExplainerRecipe`` (the model's file bytes, keyed by their digest, and the settings), so
what a worker computes is what this process would.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import onnx

from segattr_onnx.errors import SegattrError
from segattr_onnx.graph.loading import LoadedModel, external_location, iter_all_tensors
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.work import Executor, LocalExecutor
from segattr_onnx.text import setting

if TYPE_CHECKING:
    from segattr_onnx.explainer import Explainer

Item = TypeVar("Item")
Result = TypeVar("Result")

MODEL_FILE = "model.onnx"
LOCAL = "local"
# Where each registered executor's plugin comes from, for the error that says how to get it.
KNOWN_PLUGINS = {"ray": "segattr-ray"}


class ExecutorError(SegattrError):
    """An executor that is not installed, or options it cannot take."""


@dataclass(frozen=True)
class ExecutorOptions:
    """What a cluster executor is told; None leaves a choice to the executor.

    ``workers``: how many worker processes; ``worker_cpus``/``worker_gpus``: what each one
    reserves (a GPU may be shared: 0.5), and ``worker_cpus`` is also each worker's number of
    ONNX Runtime threads, so workers on one machine do not oversubscribe its cores.
    """

    address: str | None = None
    workers: int | None = None
    worker_cpus: float | None = None
    worker_gpus: float | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ExecutorError(f"workers must be a whole number ≥ 1, not {self.workers!r}")
        for name in ("worker_cpus", "worker_gpus"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                raise ExecutorError(f"{name} must be a number ≥ 0, not {value!r}")
        if self.worker_cpus is not None and self.worker_cpus == 0:
            raise ExecutorError("worker_cpus must be above 0: a worker runs on at least a share")

    @property
    def given(self) -> list[str]:
        return [name for name, value in vars(self).items() if value is not None]


@dataclass(frozen=True)
class ModelShipment:
    """A model's file and its external data files, as bytes, to rebuild it on a worker.

    Keyed by ``digest`` (of every file's name and content), which a worker checks after
    unpacking: a worker computes on exactly the bytes this process loaded.
    """

    files: dict[str, bytes] = field(repr=False)
    digest: str

    @classmethod
    def of(cls, model: LoadedModel) -> ModelShipment:
        """The model's bytes (its file, or its proto when built in memory) and every external
        data file it names, under the name the model uses (checked when it was loaded)."""
        if model.path is not None:
            files = {MODEL_FILE: Path(model.path).read_bytes()}
            folder: Path | None = Path(model.path).parent
        else:
            files = {MODEL_FILE: model.proto.SerializeToString()}
            folder = model.external_data_dir
        locations = {external_location(t) for t in iter_all_tensors(model.proto)} - {None}
        if locations and folder is None:
            raise ExecutorError("the model names external data but no folder holds it")
        for name in sorted(locations):
            files[name] = (Path(os.path.realpath(folder / name))).read_bytes()
        return cls.from_files(files)

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> ModelShipment:
        return cls(files, _digest(files))

    @property
    def has_external_data(self) -> bool:
        return len(self.files) > 1

    def model_proto(self) -> onnx.ModelProto:
        """The model itself, for a model without external data: nothing goes to disk."""
        self._check_digest()
        return onnx.load_from_string(self.files[MODEL_FILE])

    def unpack(self, folder: Path) -> Path:
        """Write the files into ``folder`` (a fresh private one), each created exclusively
        and never through a link; returns the model's path.

        A name may walk through a folder (``sub/../w.bin``, which loads beside the model):
        the folders it names are made, and the file lands where the name resolves, which must
        stay inside ``folder``.
        """
        self._check_digest()
        written: dict[str, bytes] = {}
        for name, content in self.files.items():
            resolved = posixpath.normpath(name)
            if PurePosixPath(name).is_absolute() or resolved == ".." or resolved.startswith("../"):
                raise ExecutorError(f"a shipped model file has an unsafe name {name!r}")
            if resolved in written:  # "./w.bin" and "w.bin": one file
                if written[resolved] != content:
                    raise ExecutorError(f"two shipped model files resolve to {resolved!r}")
                continue
            os.makedirs(folder.joinpath(*PurePosixPath(name).parent.parts), exist_ok=True)
            target = folder.joinpath(*PurePosixPath(resolved).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with os.fdopen(os.open(target, flags, 0o600), "wb") as handle:
                handle.write(content)
            written[resolved] = content
        return folder / MODEL_FILE

    def _check_digest(self) -> None:
        if _digest(self.files) != self.digest:
            raise ExecutorError("the model shipped to this worker does not match its digest")


def _digest(files: dict[str, bytes]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(files):
        hasher.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return hasher.hexdigest()


@dataclass(frozen=True)
class ExplainerRecipe:
    """What a worker needs to build the same explainer: the model and every setting that
    shapes a result (the memory budget included, so batches split the same way)."""

    model: ModelShipment
    provider: str
    memory_budget: int | None
    seed: int
    optimization: str
    reduce_in_graph: bool
    intra_op_threads: int | None = None

    @classmethod
    def of(cls, explainer: Explainer, intra_op_threads: int | None = None) -> ExplainerRecipe:
        return cls(
            model=ModelShipment.of(explainer.model),
            provider=explainer.provider,
            memory_budget=explainer.memory_budget,
            seed=explainer.seed,
            optimization=explainer.optimization,
            reduce_in_graph=explainer.reduce_in_graph,
            intra_op_threads=intra_op_threads,
        )

    def build(self, folder: Path | None = None) -> Explainer:
        """The explainer; a model with external data is unpacked into ``folder`` (kept while
        the explainer is in use), any other is rebuilt in memory and ``folder`` is not used."""
        from segattr_onnx.explainer import Explainer

        if self.model.has_external_data:
            if folder is None:
                raise ExecutorError("a model with external data needs a folder to unpack into")
            model = self.model.unpack(folder)
        else:
            model = self.model.model_proto()
        return Explainer(
            model,
            provider=self.provider,
            memory_budget=self.memory_budget,
            seed=self.seed,
            optimization=self.optimization,
            reduce_in_graph=self.reduce_in_graph,
            intra_op_threads=self.intra_op_threads,
        )


class ExecutorBackend(Protocol):
    """Runs an audit's case runs and a case's work items, here or on a cluster."""

    name: str

    def map(
        self,
        explainer: Explainer,
        job: Callable[[Explainer, Item], Result],
        items: Iterable[Item],
    ) -> Iterator[tuple[int, Result]]:
        """``(index, job(an explainer like this one, item))`` for each item, as each finishes.

        ``items`` may be lazy: a backend draws the next one when it has room for it. ``job``
        must be picklable (a module-level function) for a backend with workers.
        """
        ...

    def case_executor(self, explainer: Explainer, runner: AblationRunner) -> Executor:
        """What runs the work items of ``runner``'s input size."""
        ...

    def close(self) -> None:
        """Release the workers (a backend may be used again after, starting new ones)."""
        ...


class LocalBackend:
    """Everything in this process, one item after another."""

    name = LOCAL

    def map(
        self,
        explainer: Explainer,
        job: Callable[[Explainer, Item], Result],
        items: Iterable[Item],
    ) -> Iterator[tuple[int, Result]]:
        for index, item in enumerate(items):
            yield index, job(explainer, item)

    def case_executor(self, explainer: Explainer, runner: AblationRunner) -> Executor:
        return LocalExecutor(runner)

    def close(self) -> None:
        return None


BackendFactory = Callable[[ExecutorOptions], Any]
_OPTION_OF_FIELD = {"address": "ray-address"}  # the rest: the field's name, dashed


def option_name(field_name: str) -> str:
    """An ``ExecutorOptions`` field as the user gave it: an option, or the field."""
    flag = "--" + _OPTION_OF_FIELD.get(field_name, field_name.replace("_", "-"))
    return setting(flag, field_name)


def executor_backend(name: str, options: ExecutorOptions | None = None) -> ExecutorBackend:
    """The backend called ``name``, built with ``options``; a clear error when it is not
    installed (with the command that installs it) or cannot take the options."""
    options = options or ExecutorOptions()
    if name == LOCAL:
        if options.given:
            named = ", ".join(option_name(name) for name in options.given)
            cluster = setting("--executor ray", 'executor="ray"')
            raise ExecutorError(
                f"{named} only apply to a cluster executor (e.g. {cluster}); the local "
                "executor runs in this process"
            )
        return LocalBackend()
    from segattr_onnx.plugins import registry

    factories = registry().executors
    if name not in factories:
        known = ", ".join([LOCAL, *sorted(factories)])
        plugin = KNOWN_PLUGINS.get(name)
        if plugin is not None:
            raise ExecutorError(
                f"executor {name!r} needs the {plugin} plugin, which is not installed; install "
                f"it with: pip install ./plugins/{plugin} (from the segattr-onnx source tree)"
            )
        raise ExecutorError(f"executor {name!r} is unknown; installed executors: {known}")
    return factories[name](options)

"""Plugins: packages that add methods, image readers and map writers without touching the core.

A plugin is an installed package declaring, in its pyproject::

    [project.entry-points."segattr_onnx.plugins"]
    medical = "segattr_medical:register"

where ``register(registry: PluginRegistry)`` adds what the package provides. The core keeps
only numpy I/O; medical formats (NIfTI, DICOM), with their heavier dependencies, live in the
first-party ``plugins/segattr-medical``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

ENTRY_POINT_GROUP = "segattr_onnx.plugins"


@dataclass(frozen=True)
class ImageData:
    """An image as read from a file, with what is needed to write a map back beside it."""

    array: np.ndarray
    meta: dict = field(default_factory=dict)  # e.g. the NIfTI affine, the DICOM spacing
    source: Path | None = None
    # The array's axis of colour channels, when the reader knows it (a colour PNG: 0); None
    # for a single-channel image, or an array whose layout only the model card can tell.
    channel_axis: int | None = None


Reader = Callable[[Path], ImageData]
Writer = Callable[[Path, np.ndarray, ImageData | None], None]


@dataclass
class PluginInfo:
    name: str
    source: str
    provides: list[str] = field(default_factory=list)
    error: str | None = None


class PluginRegistry:
    """What installed plugins provide: readers and writers by file suffix, methods, targets,
    provider lists and executors."""

    def __init__(self) -> None:
        self.readers: dict[str, tuple[str, Reader]] = {}
        self.writers: dict[str, tuple[str, Writer]] = {}
        self.providers: dict[str, list] = {}  # name → ONNX Runtime providers (with options)
        self.targets: dict[str, Callable[[], object]] = {}  # name → a Target factory
        self.executors: dict[str, Callable[..., object]] = {}  # name → a backend factory
        self.plugins: list[PluginInfo] = []
        self._current: PluginInfo | None = None

    def add_reader(self, suffixes: list[str], reader: Reader) -> None:
        """``suffixes`` like ".nii.gz"; "/" stands for a directory (a DICOM series)."""
        for suffix in suffixes:
            self.readers[suffix.lower()] = (self._owner(), reader)
        self._note(f"reader {', '.join(suffixes)}")

    def add_writer(self, suffixes: list[str], writer: Writer) -> None:
        for suffix in suffixes:
            self.writers[suffix.lower()] = (self._owner(), writer)
        self._note(f"writer {', '.join(suffixes)}")

    def add_provider(self, name: str, providers: list) -> None:
        """A named ONNX Runtime provider list (e.g. TensorRT with its options, then CUDA and
        CPU), selected with ``--provider NAME``."""
        self.providers[name] = list(providers)
        self._note(f"provider {name}")

    def add_executor(self, name: str, factory: Callable[..., object]) -> None:
        """A named executor backend (``--executor NAME``): ``factory(options)`` takes a
        ``runtime.backends.ExecutorOptions`` and returns an ``ExecutorBackend`` that runs
        work on other processes or machines. Import heavy dependencies inside ``factory``.
        """
        if isinstance(factory, list | tuple):
            # The provider lists this hook once took are add_provider's now.
            raise TypeError(
                "add_executor(name, factory) registers an executor backend; a list of ONNX "
                "Runtime providers is registered with add_provider(name, providers)"
            )
        self.executors[name] = factory
        self._note(f"executor {name}")

    def add_target(self, name: str, factory: Callable[[], object]) -> None:
        """A named target (output, class, activation, region), selected with
        ``--target-preset NAME``; ``factory()`` returns a ``segattr_onnx.Target``."""
        self.targets[name] = factory
        self._note(f"target {name}")

    def add_method(self, method_class: type) -> None:
        from segattr_onnx.methods.registry import register_method

        register_method(method_class)
        self._note(f"method {method_class.name}")

    def _owner(self) -> str:
        return self._current.name if self._current else "core"

    def _note(self, what: str) -> None:
        if self._current is not None:
            self._current.provides.append(what)

    def reader_for(self, path: Path) -> Reader | None:
        if path.is_dir():
            entry = self.readers.get("/")
            return entry[1] if entry else None
        entry = self.readers.get(_suffix(path, self.readers))
        return entry[1] if entry else None

    def writer_for(self, path: Path) -> Writer | None:
        entry = self.writers.get(_suffix(path, self.writers))
        return entry[1] if entry else None


def describe_formats(table: dict[str, tuple[str, object]]) -> str:
    """``.nii, .nii.gz (segattr-medical); DICOM series folders (segattr-medical)``: the
    formats a reader or writer table adds, by plugin, for ``--help``."""
    by_owner: dict[str, list[str]] = {}
    for suffix, (owner, _) in sorted(table.items()):
        by_owner.setdefault(owner, []).append("DICOM series folders" if suffix == "/" else suffix)
    return "; ".join(f"{', '.join(names)} ({owner})" for owner, names in by_owner.items())


def _suffix(path: Path, known: dict) -> str:
    """The longest registered suffix the name ends with (".nii.gz" before ".gz")."""
    name = path.name.lower()
    matches = [s for s in known if s != "/" and name.endswith(s)]
    return max(matches, key=len) if matches else path.suffix.lower()


_registry: PluginRegistry | None = None


def registry() -> PluginRegistry:
    """The registry, with every installed plugin loaded once (a broken one warns)."""
    global _registry
    if _registry is None:
        _registry = PluginRegistry()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            info = PluginInfo(entry.name, entry.value)
            _registry.plugins.append(info)
            _registry._current = info
            try:
                entry.load()(_registry)
            except Exception as exc:  # a broken plugin must not break the core
                info.error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"plugin {entry.name!r} failed to load: {exc}", stacklevel=2)
            finally:
                _registry._current = None
    return _registry

"""ONNX Runtime's optimised graphs, kept on disk between processes.

Every CLI call is a new process: it rewrites the model (suffixes, tails, heads) and ONNX
Runtime optimises each rewritten graph again (fusions, layout changes, constant folding),
although nothing in them changed since the last call. Here a session's optimised graph is
stored in the user's ``DiskCache`` (``runtime/disk_cache.py``: verified with a per-user MAC,
bounded, least recently used evicted) and the next process loads it with optimisation off.

The key is the content of the graph handed to ONNX Runtime (its serialised bytes, weights
included), ONNX Runtime's version and build, this package's version, the providers, the
optimisation level, the transformers left out and the session settings that change the
graph (``GRAPH_SETTINGS``), and the CPU (an optimised CPU graph is
specific to the instruction set it was made for). Only CPU sessions of models without
external data are cached: an optimised graph of an external-data model still points at the
original weight files by path, and a CUDA graph is specific to the GPU.

A session whose graph is named by a recipe (``recipe_cache.py``: the model, the input size, the
seed and the session's key) also gets a small entry under the recipe's key pointing at the
optimised graph's, so the next process finds it before rewriting anything.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnxruntime as ort

from segattr_onnx.runtime.disk_cache import HEADER_BYTES, DiskCache, cache_key, is_cache_key

FORMAT = "ort-optimised-v1"
POINTER_FORMAT = "ort-optimised-pointer-v1"
# Session config entries that change the optimised graph, so they are part of the key.
GRAPH_SETTINGS = ("session.disable_quant_qdq",)
# The process's cache, or how to open it on first use (so a command that builds no session,
# ``--help`` included, never creates the folder).
_active: DiskCache | Callable[[], DiskCache | None] | None = None


def use_disk_cache(
    cache: DiskCache | Callable[[], DiskCache | None] | None,
) -> DiskCache | Callable[[], DiskCache | None] | None:
    """Make ``cache`` (or a function opening it) the process's cache of optimised graphs
    (None: none); returns the previous setting. The CLI opens the user's cache unless told
    ``--no-cache``; a library user opts in here (a long-lived process keeps its sessions
    anyway)."""
    global _active
    previous, _active = _active, cache
    return previous


def active_disk_cache() -> DiskCache | None:
    global _active
    if callable(_active) and not isinstance(_active, DiskCache):
        _active = _active()
    return _active


@functools.cache
def cpu_signature() -> str:
    """The machine, CPU model and instruction-set flags an optimised graph may depend on
    (x86's "model name" and "flags", ARM's "CPU implementer", "CPU part" and "Features")."""
    wanted = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    found = dict.fromkeys(wanted, "")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in found and not found[name]:
                found[name] = value.strip()
    except OSError:
        pass
    return "|".join([platform.machine(), platform.processor(), *found.values()])


@functools.cache
def runtime_signature() -> str:
    """ONNX Runtime's version and build (the same version is built for CPU, CUDA, OpenVINO…)
    and where it is installed."""
    build = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
    return "|".join([ort.__version__, build, ort.get_device(), str(Path(ort.__file__).parent)])


def _session_parts(
    providers: Sequence,
    optimisation: ort.GraphOptimizationLevel,
    disabled_optimizers: Sequence[str],
    settings: Sequence[tuple[str, str]],
) -> tuple:
    """What an optimised graph depends on besides the graph handed to ONNX Runtime."""
    from segattr_onnx import __version__

    return (
        runtime_signature(),
        __version__,
        repr(list(providers)),
        int(optimisation),
        tuple(sorted(disabled_optimizers)),
        tuple(settings),
        cpu_signature(),
    )


def entry_key(
    serialised: bytes,
    providers: Sequence,
    optimisation: ort.GraphOptimizationLevel,
    disabled_optimizers: Sequence[str],
    settings: Sequence[tuple[str, str]] = (),
) -> str:
    parts = _session_parts(providers, optimisation, disabled_optimizers, settings)
    return cache_key(FORMAT, hashlib.sha256(serialised).digest(), *parts)


def recipe_entry_key(
    recipe: tuple,
    providers: Sequence,
    optimisation: ort.GraphOptimizationLevel,
    disabled_optimizers: Sequence[str],
    settings: Sequence[tuple[str, str]] = (),
) -> str:
    """The key of the entry pointing from a recipe to its optimised graph: the recipe plus
    everything else ``entry_key`` holds, so that a pointer is only followed by a process that
    would have computed the very entry it names."""
    parts = _session_parts(providers, optimisation, disabled_optimizers, settings)
    return cache_key(POINTER_FORMAT, recipe, *parts)


def session_from_recipe(
    cache: DiskCache, recipe_key: str, options: ort.SessionOptions, providers: Sequence
) -> ort.InferenceSession | None:
    """The session of the optimised graph ``recipe_key`` points to, or None: no pointer, a
    pointer that is not a key, a graph that is gone or fails verification, or one ONNX
    Runtime refuses. The caller then builds the graph, exactly as on a first call."""
    pointer = cache.load(recipe_key)
    if pointer is None:
        return None
    target = pointer.decode("ascii", "replace")
    if not is_cache_key(target):
        return None
    optimised = cache.load(target)
    if optimised is None:
        return None
    level = options.graph_optimization_level
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(optimised, options, providers=list(providers))
    except Exception:  # ORT raises its own types; the graph is then built and checked again
        return None
    finally:
        options.graph_optimization_level = level


def graph_settings(options: ort.SessionOptions) -> tuple[tuple[str, str], ...]:
    """The ``GRAPH_SETTINGS`` entries ``options`` sets, with their values."""
    found = []
    for name in GRAPH_SETTINGS:
        try:
            found.append((name, options.get_session_config_entry(name)))
        except RuntimeError:  # ORT raises for an entry never set
            continue
    return tuple(found)


def cached_session(
    cache: DiskCache,
    serialised: bytes,
    options: ort.SessionOptions,
    providers: Sequence,
    disabled_optimizers: Sequence[str],
    recipe_key: str | None = None,
) -> ort.InferenceSession:
    """A session from the cached optimised graph, or one that stores it for the next call;
    with ``recipe_key``, a pointer to that graph is stored under it too.

    A cached graph that ONNX Runtime refuses (an entry that passed the MAC but not the
    loader: written by another build of ORT under the same version, say) is rebuilt.
    """
    key = entry_key(
        serialised,
        providers,
        options.graph_optimization_level,
        disabled_optimizers,
        graph_settings(options),
    )
    optimised = cache.load(key)
    if optimised is not None:
        level = options.graph_optimization_level
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(optimised, options, providers=list(providers))
        except Exception:  # ORT raises its own types; the original graph then decides
            options.graph_optimization_level = level
        else:
            if recipe_key is not None:
                cache.store(recipe_key, key.encode("ascii"))
            return session
    if cache.max_bytes <= HEADER_BYTES:  # nothing could be stored: no optimised copy to write
        return ort.InferenceSession(
            serialised,
            options,
            providers=list(providers),
            disabled_optimizers=list(disabled_optimizers) or None,
        )
    folder = tempfile.mkdtemp(prefix="segattr-ort-")  # private (0700), removed below
    try:
        target = Path(folder) / "optimised.onnx"
        options.optimized_model_filepath = str(target)
        session = ort.InferenceSession(
            serialised,
            options,
            providers=list(providers),
            disabled_optimizers=list(disabled_optimizers) or None,
        )
        # Read only what the bound can hold (``store`` would refuse it after the read).
        if target.is_file() and target.stat().st_size + HEADER_BYTES <= cache.max_bytes:
            # The pointer first: the graph's own store then evicts it last, never the graph
            # (a pointer whose graph did not make it in is a miss, nothing worse).
            if recipe_key is not None:
                cache.store(recipe_key, key.encode("ascii"))
            cache.store(key, target.read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return session

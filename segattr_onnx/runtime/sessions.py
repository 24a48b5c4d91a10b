"""Creating ONNX Runtime sessions in one place, once per model variant.

Sessions are expensive (graph optimisation, kernel selection, CUDA context); a method that
explains many cases or ablates many layers must reuse them, so every session comes from a
``SessionCache`` keyed by the variant it runs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from segattr_onnx.errors import ModelFileError
from segattr_onnx.graph.narrow_pointwise import pointwise_as_matmul
from segattr_onnx.runtime.layer_ahead import on_helper_thread
from segattr_onnx.runtime.optimised_cache import (
    active_disk_cache,
    cached_session,
    graph_settings,
    recipe_entry_key,
    session_from_recipe,
)
from segattr_onnx.runtime.providers import (
    CPU,
    CpuFallbackWarning,
    check_session_provider,
    requested_providers,
)
from segattr_onnx.runtime.recipe_cache import RecipeContext, sources_unchanged

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
OPTIMIZATION_LEVELS = tuple(_OPTIMIZATION)
# ORT's CPU arena never gives memory back, and by default each session has its own: a process
# that runs the suffix sessions of many layers kept the sum of all their peaks (KWC over the
# benchmark 3D U-Net's decoder at 64³: 17 GB peak RSS). Without any arena the peak is that of the
# largest chunk, but every run faults in fresh pages: KWC took 1.55x the CPU time on the 2D
# benchmark U-Net at 256² (7.3 s against 4.7 s). One arena shared by every session of the process
# (registered once in ORT's environment; sessions opt in with "session.use_env_allocators") keeps
# the arena's speed, and holds the largest peak of any session rather than their sum (2D 256²:
# 2.1 GB; the 2D fixture: 0.72 CPU s at 0.72 GB, against 0.65 s at 1.76 GB with per-session
# arenas and 1.25 s at 0.64 GB without). "off" is kept for processes that must return memory.
CPU_MEMORY_ARENA = "shared"
ARENA_CHOICES = ("shared", "per-session", "off")
# ONNX Runtime's intra-op worker threads busy-wait ("spin") for new work after each run, and
# every session has its own pool. An explanation runs several sessions in turn (observation,
# backward graph, suffixes) with numpy work in between, so the idle pools' spinning threads took
# the cores from the session running and from the host work: on 2 cores, Grad-CAM on the 2D
# fixture at 512² took 7.3 forward passes with spinning and 4.4 without, KWC at 128² 5x longer
# (a loaded machine; the plain forward pass itself is no slower without it). Results are the same.
CPU_SPINNING = False


QDQ_AS_SPECIFIED = ("session.disable_quant_qdq", "1")


@functools.cache
def _shared_cpu_arena() -> bool:
    """Register one CPU arena in ORT's environment (once per process); False if that fails."""
    info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    except Exception:  # ORT raises its own types; sessions then keep their own arenas
        return False
    return True


def release_free_arena() -> bool:
    """Give the shared CPU arena's free pages back to the system; False if there is none.

    ORT shrinks an arena at the end of a run that asks for it, and the shared arena belongs to
    every session, so a run of a one-node graph is enough. Tensors still held are untouched.
    """
    if CPU_MEMORY_ARENA != "shared" or not _shared_cpu_arena():
        return False
    session, options = _arena_releaser()
    session.run(None, {"x": np.zeros(1, np.float32)}, options)
    return True


@functools.cache
def _arena_releaser() -> tuple[ort.InferenceSession, ort.RunOptions]:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "segattr_arena_release",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7
    )
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return create_session(model, "cpu"), options


def create_session(
    model: onnx.ModelProto | Callable[[], onnx.ModelProto],
    provider: str = "auto",
    external_data_dir: Path | None = None,
    optimization: str = "all",
    intra_op_threads: int | None = None,
    cpu_memory_arena: str | None = None,
    disabled_optimizers: Sequence[str] = (),
    recipe: tuple | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for an in-memory model whose external weights stay on disk.

    ``cpu_memory_arena`` trades memory for speed: see ``CPU_MEMORY_ARENA``.
    ``disabled_optimizers`` names ONNX Runtime graph transformers to leave out. With a disk
    cache in use (``runtime/optimised_cache.py``), a CPU session of a model without external
    data starts from the optimised graph a previous process stored; given the ``recipe`` of
    its graph (``runtime/recipe_cache.py``) and a function for ``model``, the graph is not
    even built when that process stored it under the recipe.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION[optimization]
    cpu_memory_arena = cpu_memory_arena or CPU_MEMORY_ARENA
    if cpu_memory_arena not in ARENA_CHOICES:
        raise ValueError(
            f"cpu_memory_arena must be one of {ARENA_CHOICES}, not {cpu_memory_arena!r}"
        )
    options.enable_cpu_mem_arena = cpu_memory_arena != "off"
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(CPU_SPINNING)))
    # QuantizeLinear/DequantizeLinear pairs stay as the ONNX spec computes them (a float op
    # between them) instead of being fused into ORT's integer kernels. Those kernels saturate on
    # CPUs without VNNI (u8s8 through VPMADDUBSW): on an AVX2-only EPYC the benchmark QDQ U-Net's
    # fused logits differ from the unfused ones by 11 % of their range, and a suffix whose cut
    # breaks one fusion would then compute another function than the observation pass. Unfused,
    # every rewritten graph computes the same arithmetic on every machine.
    options.add_session_config_entry(*QDQ_AS_SPECIFIED)
    if cpu_memory_arena == "shared" and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    # ORT's own log lines stay quiet: failures reach the user as exceptions with the message,
    # and provider fallbacks as our own warnings.
    options.log_severity_level = 4
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if external_data_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_dir)
        )
    providers = requested_providers(provider)
    cache = active_disk_cache()
    cached = cache is not None and external_data_dir is None and providers == [CPU]
    recipe_key = None
    if cached and recipe is not None:
        recipe_key = recipe_entry_key(
            recipe,
            providers,
            options.graph_optimization_level,
            disabled_optimizers,
            graph_settings(options),
        )
        assert cache is not None
        found = session_from_recipe(cache, recipe_key, options, providers)
        if found is not None:
            check_session_provider(found, provider)
            return found
        if not sources_unchanged():  # the graph built now may not be the fingerprint's
            recipe_key = None
    if callable(model):
        model = model()
    if providers == [CPU]:
        model = pointwise_as_matmul(model)
    serialised = model.SerializeToString()
    try:
        if cached:
            assert cache is not None
            session = cached_session(
                cache, serialised, options, providers, disabled_optimizers, recipe_key
            )
        else:
            session = ort.InferenceSession(
                serialised,
                options,
                providers=providers,
                disabled_optimizers=list(disabled_optimizers) or None,
            )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"ONNX Runtime cannot load the model: {message[:300]}; check that it runs with "
            "onnxruntime on its own"
        ) from exc
    check_session_provider(session, provider)
    return session


class SessionCache:
    """Sessions for the variants of one model (full, exposed, ablated, suffix), built lazily."""

    def __init__(
        self,
        provider: str = "auto",
        external_data_dir: Path | None = None,
        optimization: str = "all",
        intra_op_threads: int | None = None,
        fallback_reported: bool = False,
        recipe: RecipeContext | None = None,
    ) -> None:
        """``recipe``: what this model's graphs are rewritten from at this size, so that a
        session of a known kind of key is looked up on disk before its graph is built."""
        self.provider = provider
        self.recipe = recipe
        self.external_data_dir = external_data_dir
        self.optimization = optimization
        self.intra_op_threads = intra_op_threads
        self._sessions: dict[Hashable, ort.InferenceSession] = {}
        self._warned = fallback_reported  # the caller already told the user about the CPU

    def get(
        self,
        key: Hashable,
        build: Callable[[], onnx.ModelProto],
        disabled_optimizers: Sequence[str] = (),
        intra_op_threads: int | None = None,
    ) -> ort.InferenceSession:
        """The session for ``key``, creating it from ``build()`` the first time;
        ``intra_op_threads`` overrides the cache's own for that session (a chunk stream's
        share of the cores, ``cpu_streams.py``)."""
        if key not in self._sessions:
            if on_helper_thread():  # catch_warnings below is process-wide: not from a helper
                raise RuntimeError(f"session {key!r} was not made before the helper ran it")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CpuFallbackWarning)
                self._sessions[key] = create_session(
                    build,
                    self.provider,
                    self.external_data_dir,
                    self.optimization,
                    intra_op_threads or self.intra_op_threads,
                    disabled_optimizers=disabled_optimizers,
                    recipe=self.recipe.parts(key) if self.recipe is not None else None,
                )
            fallbacks = [w for w in caught if issubclass(w.category, CpuFallbackWarning)]
            for other in caught:
                if other not in fallbacks:
                    warnings.warn_explicit(
                        other.message, other.category, other.filename, other.lineno
                    )
            if fallbacks and not self._warned:
                self._warned = True
                warnings.warn(fallbacks[0].message, CpuFallbackWarning, stacklevel=2)
        return self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)

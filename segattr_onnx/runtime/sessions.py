"""Creating ONNX Runtime sessions in one place, once per model variant.

Sessions are expensive (graph optimisation, kernel selection, CUDA context); a method that
explains many cases or ablates many layers must reuse them, so every session comes from a
``SessionCache`` keyed by the variant it runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from pathlib import Path

import onnx
import onnxruntime as ort

from segattr_onnx.errors import ModelFileError
from segattr_onnx.runtime.providers import (
    CpuFallbackWarning,
    check_session_provider,
    requested_providers,
)

_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
OPTIMIZATION_LEVELS = tuple(_OPTIMIZATION)


def create_session(
    model: onnx.ModelProto,
    provider: str = "auto",
    external_data_dir: Path | None = None,
    optimization: str = "all",
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for an in-memory model whose external weights stay on disk."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION[optimization]
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
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
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
    ) -> None:
        self.provider = provider
        self.external_data_dir = external_data_dir
        self.optimization = optimization
        self.intra_op_threads = intra_op_threads
        self._sessions: dict[Hashable, ort.InferenceSession] = {}
        self._warned = fallback_reported  # the caller already told the user about the CPU

    def get(self, key: Hashable, build: Callable[[], onnx.ModelProto]) -> ort.InferenceSession:
        """The session for ``key``, creating it from ``build()`` the first time."""
        if key not in self._sessions:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CpuFallbackWarning)
                self._sessions[key] = create_session(
                    build(),
                    self.provider,
                    self.external_data_dir,
                    self.optimization,
                    self.intra_op_threads,
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

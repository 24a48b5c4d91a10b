"""Runs segattr-onnx audits and large cases on a Ray cluster: ``--executor ray``.

Registering imports nothing from Ray; the backend (and Ray) load only when a run asks for
``--executor ray``, so an installed plugin costs the other commands nothing.
"""

from __future__ import annotations

from segattr_onnx.plugins import PluginRegistry
from segattr_onnx.runtime.backends import ExecutorError, ExecutorOptions

INSTALL = "pip install 'ray~=2.60.0'"


def register(registry: PluginRegistry) -> None:
    registry.add_executor("ray", make_backend)


def make_backend(options: ExecutorOptions):
    """The Ray backend for ``options``; without Ray, the command that installs it."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed: {INSTALL}") from exc
    from segattr_ray.backend import RayBackend

    return RayBackend(options)

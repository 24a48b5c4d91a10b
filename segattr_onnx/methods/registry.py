"""Method names → method classes, including those plugins register through entry points.

A plugin package declares ``[project.entry-points."segattr_onnx.methods"]`` with
``name = "package.module:MethodClass"``; the class extends ``AttributionMethod``.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, TypeVar

from segattr_onnx.errors import MethodError

ENTRY_POINT_GROUP = "segattr_onnx.methods"
_REGISTRY: dict[str, type] = {}
_plugins_loaded = False

MethodClass = TypeVar("MethodClass", bound=type)


def register_method(cls: MethodClass) -> MethodClass:
    """Class decorator: make a method available by its ``name``."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"method name {name!r} is already taken by {existing.__name__}")
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue
        try:
            register_method(entry.load())
        except Exception as exc:  # a broken plugin must not break the built-in methods
            warnings.warn(
                f"plugin method {entry.name!r} ({entry.value}) failed to load: {exc}",
                stacklevel=2,
            )


def method_names() -> list[str]:
    """Every registered method name, built-in first, then plugins."""
    _load_plugins()
    return list(_REGISTRY)


def create_method(name: str, **options: Any):
    """A method instance by name, with its options (e.g. ``uniform_weights`` for scorecam)."""
    _load_plugins()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise MethodError(f"method {name!r} is unknown; choose one of: {', '.join(_REGISTRY)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise MethodError(f"method {name!r} does not take these options: {exc}") from exc

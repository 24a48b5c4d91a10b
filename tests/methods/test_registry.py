"""Plugins add methods through the ``segattr_onnx.methods`` entry-point group."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from segattr_onnx.errors import MethodError
from segattr_onnx.methods import registry
from segattr_onnx.methods.scorecam import ScoreCAM


class PluginCAM(ScoreCAM):
    name = "plugin-cam"


@pytest.fixture
def fake_plugins(monkeypatch):
    def install(*entries: EntryPoint) -> None:
        monkeypatch.setattr(registry, "entry_points", lambda group: list(entries))
        monkeypatch.setattr(registry, "_plugins_loaded", False)
        monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    return install


def test_entry_point_methods_are_found_by_name(fake_plugins) -> None:
    fake_plugins(EntryPoint("plugin-cam", f"{__name__}:PluginCAM", registry.ENTRY_POINT_GROUP))
    assert "plugin-cam" in registry.method_names()
    method = registry.create_method("plugin-cam", uniform_weights=True)
    assert isinstance(method, PluginCAM) and method.uniform_weights


def test_a_broken_plugin_warns_and_leaves_the_built_in_methods_working(fake_plugins) -> None:
    fake_plugins(EntryPoint("broken", "no_such_module_xyz:Thing", registry.ENTRY_POINT_GROUP))
    with pytest.warns(UserWarning, match="'broken'.*failed to load"):
        names = registry.method_names()
    assert {"kwc", "scorecam", "ablationcam"} <= set(names) and "broken" not in names


def test_unknown_names_and_options_are_user_errors() -> None:
    with pytest.raises(MethodError, match="choose one of"):
        registry.create_method("no-such-method")
    with pytest.raises(MethodError, match="does not take"):
        registry.create_method("kwc", uniform_weights=True)

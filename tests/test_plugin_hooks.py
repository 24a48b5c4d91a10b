"""What a plugin can add: provider lists and target presets, used from the CLI."""

from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target, plugins
from segattr_onnx.cli import main
from tests.conftest import fixture


def register_demo(registry: plugins.PluginRegistry) -> None:
    registry.add_provider("cpu-single-thread", [("CPUExecutionProvider", {})])
    registry.add_target("background", lambda: Target(class_index=0))


def register_broken(registry: plugins.PluginRegistry) -> None:
    raise RuntimeError("missing dependency")


@pytest.fixture
def demo_plugins(monkeypatch):
    entries = [
        EntryPoint("demo", f"{__name__}:register_demo", plugins.ENTRY_POINT_GROUP),
        EntryPoint("broken", f"{__name__}:register_broken", plugins.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda group: entries)
    monkeypatch.setattr(plugins, "_registry", None)
    with pytest.warns(UserWarning, match="'broken' failed to load"):
        plugins.registry()
    yield
    monkeypatch.setattr(plugins, "_registry", None)


def test_a_plugin_provider_list_and_target_preset_drive_explain(
    demo_plugins, tmp_path: Path
) -> None:
    case = tmp_path / "x.npy"
    np.save(case, fixture("unet2d_torchscript").input(0))
    out = tmp_path / "m.npy"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(fixture("unet2d_torchscript").path),
            str(case),
            "--out",
            str(out),
            "--provider",
            "cpu-single-thread",
            "--target-preset",
            "background",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"]["class_index"] == 0
    expected = Explainer(fixture("unet2d_torchscript").path, provider="cpu").explain(
        np.load(case), target=Target(class_index=0)
    )
    np.testing.assert_array_equal(np.load(out), expected.map)


def test_plugins_lists_additions_and_failures(demo_plugins) -> None:
    result = CliRunner().invoke(main, ["plugins"])
    assert "provider cpu-single-thread" in result.stdout and "target background" in result.stdout
    assert "broken" in result.stdout and "FAILED" in result.stdout


def test_unknown_provider_lists_and_presets_exit_2(demo_plugins, tmp_path: Path) -> None:
    case = tmp_path / "x.npy"
    np.save(case, fixture("unet2d_torchscript").input(0))
    for option, value in (("--provider", "tpu"), ("--target-preset", "liver")):
        result = CliRunner().invoke(
            main,
            [
                "explain",
                str(fixture("unet2d_torchscript").path),
                str(case),
                "--out",
                str(tmp_path / "m.npy"),
                option,
                value,
            ],
        )
        assert result.exit_code == 2 and value in result.stderr


def test_add_executor_given_a_provider_list_points_to_add_provider() -> None:
    from segattr_onnx.plugins import PluginRegistry

    registry = PluginRegistry()
    with pytest.raises(TypeError, match="add_provider"):
        registry.add_executor("old-style", [("CPUExecutionProvider", {})])
    assert registry.executors == {} and registry.providers == {}


def test_a_registered_executor_backend_is_built_with_the_options() -> None:
    from segattr_onnx.plugins import PluginRegistry

    registry = PluginRegistry()
    built = []
    registry.add_executor("cluster", lambda options: built.append(options) or "backend")
    assert registry.executors["cluster"]("opts") == "backend" and built == ["opts"]

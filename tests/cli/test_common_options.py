"""Every command that runs a model takes the same options, and messages speak the caller's
language: command-line options under ``segattr``, arguments in Python.

A Python user told to "pass --input-shape" has no such option; a CLI user told to give
``Target(output=...)`` has no such class. Messages are written once with both spellings
(``text.setting``); the CLI turns on its spelling for the length of a command.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import segattr_onnx
from segattr_onnx.cli import main
from segattr_onnx.errors import InputShapeError, TargetError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.runtime.providers import _fallback_message
from segattr_onnx.text import command_line_messages
from tests.conftest import fixture

MODEL = fixture("unet2d_torchscript")
COMMON = ("--provider", "--memory-budget", "--quiet")


@pytest.mark.parametrize("command", ["inspect", "explain", "score", "audit"])
def test_every_model_running_command_takes_the_common_options(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    for option in COMMON:
        assert re.search(rf"^\s+{re.escape(option)}\b", result.output, re.MULTILINE), option


def test_inspect_reports_what_a_memory_budget_leaves_for_runs() -> None:
    runner = CliRunner()
    command = ["inspect", str(MODEL.path), "--input-shape", "1x1x64x64", "--provider", "cpu"]
    roomy = runner.invoke(main, [*command, "--memory-budget", "4G", "--quiet", "--json"])
    tight = runner.invoke(main, [*command, "--memory-budget", "1M", "--json"])
    assert roomy.exit_code == 0 and tight.exit_code == 0, roomy.output + tight.output
    roomy_memory, tight_memory = (
        json.loads(roomy.stdout)["memory"],
        json.loads(tight.stdout)["memory"],
    )
    # An independent reading of the weights: the initializers' values, counted here.
    model = onnx.load(str(MODEL.path))
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert roomy_memory["weights_bytes"] == weights > 0
    assert roomy_memory["items_per_batch"] > 1
    assert tight_memory["items_per_batch"] == 0  # 1 MiB is below what any process holds
    table = runner.invoke(main, [*command, "--memory-budget", "1M"]).output
    assert "runs go one at a time" in table


def test_python_errors_name_arguments_and_cli_errors_name_options() -> None:
    free = MODEL  # free spatial dims (height, width): needs an input size
    with pytest.raises(InputShapeError) as in_python:
        analyse_model(free.path)
    assert "input_shape=" in str(in_python.value) and "--input-shape" not in str(in_python.value)
    with command_line_messages(), pytest.raises(InputShapeError) as on_command_line:
        analyse_model(free.path)
    assert "--input-shape" in str(on_command_line.value)
    assert "input_shape=" not in str(on_command_line.value)
    result = CliRunner().invoke(main, ["inspect", str(free.path)])
    assert result.exit_code == 2 and "--input-shape" in result.output


def test_the_cpu_fallback_warning_speaks_the_callers_language() -> None:
    assert 'provider="cpu"' in _fallback_message() and "--provider" not in _fallback_message()
    with command_line_messages():
        assert "--provider cpu" in _fallback_message()
        assert "provider=" not in _fallback_message()


def test_a_target_error_in_python_names_the_target_field() -> None:
    from segattr_onnx import Explainer, Target

    with pytest.raises(TargetError) as error:
        Explainer(MODEL.path, provider="cpu").explain(
            MODEL.input(0), "gradcam", target=Target(class_index=9)
        )
    assert "Target(class_index=...)" in str(error.value) and "--class-index" not in str(error.value)


# Strings in the library that name a command-line option outside ``setting(...)``, allowed
# with their reason: none of them reaches a Python caller as advice.
_ALLOWED = {
    ("runtime/chunks.py", "--query-gpu=memory.free"),  # nvidia-smi's arguments
    ("runtime/chunks.py", "--format=csv,noheader,nounits"),
    ("runtime/chunks.py", "--id="),
}


def _option_strings_outside_setting(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    inside_setting: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting":
            for argument in ast.walk(node):
                inside_setting.add(id(argument))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in inside_setting
            and id(node) not in docstrings
            and re.search(r"(?<![\w`-])--[a-z][a-z-]+", node.value)
        ):
            found.append(node.value)
    return found


def test_no_library_message_names_a_command_line_option_for_python_callers() -> None:
    package = Path(segattr_onnx.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative in ("cli.py", "cli_gates.py"):  # the command line's own modules
            continue
        for text in _option_strings_outside_setting(path):
            if not any(relative == file and text.startswith(prefix) for file, prefix in _ALLOWED):
                offenders.append(f"{relative}: {text!r}")
    assert offenders == []


def test_segattr_alone_shows_its_help_not_an_error() -> None:
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ") and "error:" not in result.output
    assert "\\n" not in result.output and "explain" in result.output


def test_explain_and_score_help_list_the_formats_plugins_add(monkeypatch) -> None:
    from segattr_onnx.plugins import PluginInfo, PluginRegistry

    fake = PluginRegistry()
    fake._current = PluginInfo("vendor-x", "vendor_x:register")
    fake.add_reader([".vx", "/"], lambda path: None)
    fake.add_writer([".vxo"], lambda path, array, like: None)
    monkeypatch.setattr("segattr_onnx.plugins._registry", fake)
    for command in ("explain", "score"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        formats = text[text.index("Formats:") :]
        assert ".vx, DICOM series folders (vendor-x)" in formats.replace("\n  ", " ")
        assert ".npy, .npz (core)" in formats
    assert ".vxo (vendor-x)" in CliRunner().invoke(main, ["explain", "--help"]).output

"""``segattr --help`` and ``import segattr_onnx`` import nothing heavy (issue 12).

ONNX Runtime, onnx, scipy and the plugins are imported by the commands and functions that use
them, not on start-up. Checked by what a fresh interpreter holds in ``sys.modules`` after the
help path, not by timing it (the machines running the tests are shared and noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import segattr_onnx

HEAVY = ("onnxruntime", "onnx", "scipy", "ml_dtypes", "segattr_onnx.plugins")
PLUGIN_PACKAGES = ("segattr_medical", "segattr_images")


def _modules_after(code: str) -> list[str]:
    """Top-level and segattr_onnx modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _heavy(modules: list[str]) -> list[str]:
    loaded = set(modules)
    return [name for name in (*HEAVY, *PLUGIN_PACKAGES) if name in loaded]


@pytest.mark.parametrize("arguments", [["--help"], ["--version"]])
def test_the_help_path_of_the_cli_imports_no_runtime_scipy_or_plugins(arguments) -> None:
    code = (
        "from click.testing import CliRunner\n"
        "from segattr_onnx.cli import main\n"
        f"result = CliRunner().invoke(main, {arguments!r})\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'segattr' in result.output or 'Commands' in result.output, result.output"
    )
    assert _heavy(_modules_after(code)) == []


def test_importing_the_package_imports_no_runtime_scipy_or_plugins() -> None:
    modules = _modules_after("import segattr_onnx")
    assert _heavy(modules) == []
    assert "segattr_onnx.explainer" not in modules


def test_public_names_still_import_from_the_package() -> None:
    code = (
        "from segattr_onnx import *\n"
        "import segattr_onnx\n"
        "assert callable(segattr_onnx.audit), segattr_onnx.audit  # the function, not the module\n"
        "import segattr_onnx.audit\n"
        "assert callable(segattr_onnx.audit)  # still, once the submodule is imported\n"
        "assert Explainer.__module__ == 'segattr_onnx.explainer'\n"
        "assert 'gradcam' in method_names()"
    )
    assert "segattr_onnx.explainer" in _modules_after(code)
    assert set(segattr_onnx.__all__) == {*segattr_onnx._EXPORTS, "__version__"}
    for name in segattr_onnx.__all__:
        assert getattr(segattr_onnx, name) is not None, name


def test_subcommand_help_still_lists_the_choices_read_lazily() -> None:
    from click.testing import CliRunner

    from segattr_onnx.cli import main
    from segattr_onnx.methods.layers import LAYER_GROUPS
    from segattr_onnx.target import ACTIVATIONS

    result = CliRunner().invoke(main, ["explain", "--help"])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # help text wraps anywhere, hyphens included
    assert f"[{'|'.join(ACTIVATIONS)}]" in flat
    assert all(group in flat for group in LAYER_GROUPS)
    command = ["explain", "m.onnx", "x.npy", "--out", "o.npy", "--activation", "nope"]
    refused = CliRunner().invoke(main, command)
    assert refused.exit_code == 2 and "nope" in refused.output


def test_explaining_with_kwc_imports_no_scipy(tmp_path) -> None:
    """scipy serves the metrics, the largest-component region and the synthetic data, not an
    explanation: importing it took 0.26 s of every ``segattr explain`` call."""
    import numpy as np

    from tests.conftest import fixture

    model = fixture("unet2d_torchscript")
    case, out = tmp_path / "x.npy", tmp_path / "map.npy"
    np.save(case, model.input(0))
    arguments = ["--no-cache", "explain", str(model.path), str(case), "--out", str(out)]
    code = (
        "from click.testing import CliRunner\n"
        "from segattr_onnx.cli import main\n"
        f"result = CliRunner().invoke(main, {[*arguments, '--provider', 'cpu', '--quiet']!r})\n"
        "assert result.exit_code == 0, result.output"
    )
    modules = _modules_after(code)
    assert "segattr_onnx.explainer" in modules and out.is_file()  # it did explain
    assert "scipy" not in modules

"""``segattr inspect`` through click's runner and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from segattr_onnx.cli import main
from tests.conftest import fixture


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_inspect_json_has_the_documented_fields() -> None:
    fx = fixture("unet3d")
    result = _invoke("inspect", str(fx.path), "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input"] == {
        "name": "image",
        "shape": [1, 1, 16, 16, 16],
        "declared_shape": ["batch", 1, 16, 16, 16],
        "layout": "NCDHW",
        "dtype": "float32",
        "dynamic_batch": True,
    }
    assert data["outputs"][0]["activation"] == "softmax"
    assert data["provider"] == "cpu"
    modules = fx.spec["kernel_layers"]
    assert len(data["layers"]) == len(modules)
    for layer in data["layers"]:
        assert {"name", "op", "kernels", "spatial_rank", "spatial_shape", "group"} <= set(layer)
        assert "channel_axis" in layer
    assert data["bottleneck"] == [m["onnx_node"] for m in modules if m["group"] == "bottleneck"]
    assert sorted(data["post_bottleneck"]) == sorted(
        m["onnx_node"] for m in modules if m["group"] == "decoder"
    )


def test_inspect_table_with_input_shape() -> None:
    fx = fixture("unet2d_torchscript")
    result = _invoke("inspect", str(fx.path), "--input-shape", "1x1x64x64", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert "bottleneck" in result.stdout
    assert "/up1/up/ConvTranspose" in result.stdout
    assert "16x16" in result.stdout  # the bottleneck at a quarter of 64


def _no_conv_model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    onnx.save(helper.make_model(graph), str(path))


def _escaping_model(path: Path) -> None:
    weight = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../outside.bin"
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weight],
    )
    path.write_bytes(helper.make_model(graph).SerializeToString())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("not_onnx", "not"),
        ("no_conv", "no convolution"),
        ("escaping", "outside the model's folder"),
        ("free_dims", "--input-shape"),
        ("bad_shape", "not a list of sizes"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "model.onnx"
    extra: list[str] = []
    if case == "not_onnx":
        path.write_text("hello, I am a text file\n" * 10)
    elif case == "no_conv":
        _no_conv_model(path)
    elif case == "escaping":
        _escaping_model(path)
    elif case == "free_dims":
        path = fixture("unet2d_torchscript").path
    elif case == "bad_shape":
        path = fixture("unet2d_torchscript").path
        extra = ["--input-shape", "1xAx32"]
    result = _invoke("inspect", str(path), "--provider", "cpu", *extra)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_real_subprocess_exit_code_and_clean_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "absent.onnx"
    process = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", "inspect", str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "does not exist" in process.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "segattr_onnx",
            "inspect",
            str(fixture("unet3d").path),
            "--json",
            "--provider",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["input"]["layout"] == "NCDHW"


FAMILIES = Path(__file__).resolve().parents[1] / "fixtures" / "families"


@pytest.mark.parametrize(
    ("model", "rule"),
    [("deeplabv3_resnet_torchscript", "encoder-head"), ("basicunet2d", "upsampling-decoder")],
)
def test_inspect_json_says_which_grouping_rule_applied(model: str, rule: str) -> None:
    result = _invoke("inspect", str(FAMILIES / f"{model}.onnx"), "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["grouping"]["rule"] == rule
    assert data["grouping"]["output"] == data["primary_output"]
    assert data["post_bottleneck"] == data["grouping"]["post_bottleneck"]
    decoder = [layer["name"] for layer in data["layers"] if layer["group"] == "decoder"]
    assert decoder == data["post_bottleneck"] and decoder
    assert f"rule {rule}" in _invoke("inspect", str(FAMILIES / f"{model}.onnx")).stdout


def test_inspect_shows_the_groups_of_the_output_asked_for() -> None:
    model = str(FAMILIES / "multihead_pose.onnx")
    mask = json.loads(_invoke("inspect", model, "--json", "--provider", "cpu").stdout)
    score = json.loads(
        _invoke("inspect", model, "--json", "--output-name", "score", "--provider", "cpu").stdout
    )
    assert mask["grouping"]["output"] == "mask" and score["grouping"]["output"] == "score"
    # The mask's decoder does not feed the score: for the score it is off the path.
    off = {layer["name"] for layer in score["layers"] if layer["group"] == "off-path"}
    assert set(mask["post_bottleneck"]) <= off
    bad = _invoke("inspect", model, "--output-name", "nope", "--provider", "cpu")
    assert bad.exit_code == 2 and "no output 'nope'" in bad.output
    assert "Traceback" not in bad.output


def test_names_from_the_model_cannot_forge_lines_or_escape_sequences(tmp_path: Path) -> None:
    """A layer named with a newline and an ESC sequence is printed escaped: one table row,
    no forged 'error:' line, no raw ESC byte reaching the terminal."""
    model = onnx.load(str(fixture("unet2d_torchscript").path), load_external_data=False)
    hostile = "conv\nerror: all checks passed\x1b[2J"
    next(n for n in model.graph.node if n.op_type == "Conv").name = hostile
    path = tmp_path / "hostile.onnx"
    onnx.save(model, str(path))
    result = _invoke("inspect", str(path), "--provider", "cpu", "--input-shape", "1x1x32x32")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines())
    assert "conv\\nerror: all checks passed\\x1b[2J" in result.output

"""Loading a model from someone else: external data stays inside its folder, nothing is written."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from segattr_onnx.errors import ModelFileError, UnsafeExternalDataError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.graph.loading import from_proto, load_model
from segattr_onnx.runtime.ablation import AblationRunner
from tests.conftest import fixture


def _tiny_conv_model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _with_external_location(tmp_path: Path, location: str) -> Path:
    model = _tiny_conv_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "models" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 72)
    path = _with_external_location(tmp_path, location)
    with pytest.raises(UnsafeExternalDataError, match="outside the model's folder"):
        load_model(path)


def test_absolute_external_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 72)
    path = _with_external_location(tmp_path, str(tmp_path / "secret.bin"))
    with pytest.raises(UnsafeExternalDataError, match="absolute path"):
        load_model(path)


def test_symlink_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 72)
    path = _with_external_location(tmp_path, "weights.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "weights.bin")
    with pytest.raises(UnsafeExternalDataError):
        load_model(path)


def test_missing_sidecar_is_reported(tmp_path: Path) -> None:
    path = _with_external_location(tmp_path, "weights.bin")
    with pytest.raises(ModelFileError, match="missing"):
        load_model(path)


def test_missing_and_non_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    with pytest.raises(ModelFileError, match="not"):
        load_model(text)
    with pytest.raises(ModelFileError, match="not a file"):
        load_model(tmp_path)


def test_external_weights_are_read_by_onnxruntime_not_loaded(tmp_path: Path) -> None:
    """The dynamo fixture's weights stay in the sidecar; results match the loaded model."""
    fx = fixture("unet2d_dynamo")
    copy_dir = tmp_path / "copied"
    copy_dir.mkdir()
    for name in (fx.path.name, fx.path.name + ".data"):
        shutil.copy(fx.path.parent / name, copy_dir / name)
    loaded = load_model(copy_dir / fx.path.name)
    assert loaded.external_data_dir == copy_dir.resolve()
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.proto.graph.initializer)
    analysis = analyse_model(loaded)
    runner = AblationRunner(analysis, provider="cpu")
    x = fx.input(seed=0)
    layer = analysis.post_bottleneck[0]
    prefix = runner.prefix(x, layer)
    from tests.conftest import run_reference

    (expected, *_) = run_reference(fx.load_with_weights(), {analysis.input.name: x})
    np.testing.assert_allclose(prefix.outputs["logits"], expected, rtol=1e-5, atol=1e-6)


def test_users_files_are_never_written(tmp_path: Path) -> None:
    fx = fixture("unet2d_dynamo")
    for name in (fx.path.name, fx.path.name + ".data"):
        shutil.copy(fx.path.parent / name, tmp_path / name)
    files = sorted(tmp_path.iterdir())
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}
    analysis = analyse_model(tmp_path / fx.path.name)
    runner = AblationRunner(analysis, provider="cpu")
    layer = analysis.post_bottleneck[1]
    c = analysis.layer(layer).kernels
    for form in ("block", "raw"):
        list(runner.ablate(fx.input(), layer, np.ones((2, c)), form=form))
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}
    assert after == before
    assert sorted(tmp_path.iterdir()) == files


def test_from_proto_copies_and_requires_a_data_folder_for_external_data() -> None:
    model = _tiny_conv_model()
    loaded = from_proto(model)
    loaded.proto.graph.node[0].name = "changed"
    assert model.graph.node[0].name == ""
    external = onnx.load(str(fixture("unet2d_dynamo").path), load_external_data=False)
    with pytest.raises(ModelFileError, match="external_data_dir"):
        from_proto(external)
    assert from_proto(external, fixture("unet2d_dynamo").path.parent).external_data_dir


def _one_conv(tmp_path: Path, outputs: bool = True, **attributes) -> Path:
    weight = onnx.numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["image", "w"], ["y"], name="conv", **attributes)],
        "one_conv",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)] if outputs else [],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("attributes", "outputs", "message"),
    [
        ({"strides": [0, 1]}, True, "strides [0, 1]"),
        ({"dilations": [1, 0]}, True, "dilations [1, 0]"),
        ({"pads": [-1, 0, 0, 0]}, True, "pads [-1, 0, 0, 0]"),
        ({"group": 0}, True, "group 0"),
        ({}, False, "declares no graph output"),
    ],
)
def test_graphs_that_would_crash_onnx_runtime_are_refused_first(
    tmp_path: Path, attributes: dict, outputs: bool, message: str
) -> None:
    """A stride of 0 kills the process inside ONNX Runtime (SIGFPE): the file must be refused
    with one error line before any session exists, from the CLI as from Python."""
    path = _one_conv(tmp_path, outputs, **attributes)
    done = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", "inspect", str(path), "--provider", "cpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(ModelFileError, match=re.escape(message)):
        from_proto(onnx.load(str(path)))


def test_nodes_out_of_order_are_put_in_order_and_explained_alike(tmp_path: Path) -> None:
    """ONNX Runtime's float16 converter appends its boundary Casts after the nodes reading
    them; ONNX Runtime runs such files, so segattr-onnx must read them too."""
    from segattr_onnx import Explainer

    fx = fixture("unet2d_torchscript")
    model = onnx.load(str(fx.path))
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(model.graph.node))
    path = tmp_path / "reversed.onnx"
    onnx.save(shuffled, str(path))
    loaded = load_model(path)
    produced = {i.name for i in loaded.proto.graph.input} | {
        t.name for t in loaded.proto.graph.initializer
    }
    for node in loaded.proto.graph.node:  # every read comes before
        assert all(name in produced for name in node.input if name), node.name
        produced.update(node.output)
    x = fx.input(0)
    expected = Explainer(fx.path, provider="cpu").explain(x, "gradcam").map
    np.testing.assert_array_equal(
        Explainer(path, provider="cpu").explain(x, "gradcam").map, expected
    )
    assert onnx.load(str(path)).graph.node[0].name == model.graph.node[-1].name  # file untouched


def test_graphs_no_order_can_satisfy_are_refused() -> None:
    model = _tiny_conv_model()
    looped = onnx.ModelProto()
    looped.CopyFrom(model)
    first = looped.graph.node[0]
    looped.graph.node.append(helper.make_node("Relu", [first.output[0]], ["again"]))
    looped.graph.node[0].input[0] = "again"  # the first node now reads what follows it
    with pytest.raises(ModelFileError, match="has a cycle"):
        from_proto(looped)
    dangling = onnx.ModelProto()
    dangling.CopyFrom(model)
    dangling.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelFileError, match="'nowhere', which no node"):
        from_proto(dangling)

"""``segattr export``: the explained model computes explain's map in plain onnxruntime.

The exported files are run by a separate interpreter that can import onnxruntime and numpy and
nothing else (no onnx, no segattr_onnx, no torch: the test checks it), as a deployment would
run them. The reference is ``Explainer.explain`` of a fresh explainer per method, whose one
backward run observes the case too; with ONNX Runtime's NCHWc transform off (as explain runs
backward graphs) the two agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.cli import main
from segattr_onnx.exporting import explained_model, save_exported
from segattr_onnx.graph.loading import load_model
from segattr_onnx.target import Region
from tests.conftest import fixture

EXPORT_FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_nhwc", "unet2d_fp16", "unet2d_dynamo"]
METHODS = ["gradcam", "gradcampp", "layercam", "hirescam"]

# Runs every job of a JSON list in an interpreter holding only onnxruntime and numpy.
RUNNER = r"""
import json, sys
for name in ("onnx", "segattr_onnx", "torch", "scipy"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable in the deployment interpreter")
import numpy as np
import onnxruntime as ort

jobs = json.load(open(sys.argv[1]))
results = {}
for job in jobs:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        job["model"], options, providers=["CPUExecutionProvider"],
        disabled_optimizers=job["disabled"],
    )
    feeds = {name: np.load(path) for name, path in job["feeds"].items()}
    names = [output.name for output in session.get_outputs()]
    for name, value in zip(names, session.run(None, feeds)):
        results[job["key"] + "|" + name] = value
np.savez(sys.argv[2], **results)
"""


def _deployment_site(folder: Path) -> Path:
    """A folder holding links to onnxruntime and numpy only (and numpy's bundled libraries)."""
    import numpy
    import onnxruntime

    site = folder / "site"
    site.mkdir()
    for module in (numpy, onnxruntime):
        package = Path(module.__file__).parent
        (site / package.name).symlink_to(package)
        libs = package.parent / f"{package.name}.libs"
        if libs.exists():
            (site / libs.name).symlink_to(libs)
    return site


def run_deployed(folder: Path, jobs: list[dict]) -> dict[str, np.ndarray]:
    """Run the jobs with ``python -I -S`` (no site-packages, no working directory on the
    path) and only the deployment folder added."""
    site = _deployment_site(folder)
    jobs_file, results_file = folder / "jobs.json", folder / "results.npz"
    jobs_file.write_text(json.dumps(jobs))
    script = f"import sys; sys.path.insert(0, {str(site)!r})\n" + RUNNER
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(jobs_file), str(results_file)],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "")},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    with np.load(results_file) as loaded:
        return {key: loaded[key] for key in loaded.files}


def _feed(folder: Path, key: str, name: str, value: np.ndarray) -> str:
    path = folder / f"{key.replace('/', '_')}_{name}.npy"
    np.save(path, value)
    return str(path)


def _explain(name: str, method: str, variant: str = "p2", target: Target | None = None):
    fx = fixture(name)
    x = fx.input(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Grad-CAM's zero weights on the 3D fixture
        result = Explainer(fx.path, provider="cpu").explain(
            x, method, variant=variant, target=target
        )
    return x, result


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> tuple[dict, dict]:
    """Every fixture × method exported and run in the deployment interpreter, plus a few
    runs with another class, a region, the P1 variant and ONNX Runtime's default options."""
    folder = tmp_path_factory.mktemp("export")
    jobs, expected = [], {}

    def add(key, name, method, variant="p2", target=None, feeds=None, **options):
        disabled = options.get("disabled", ("NchwcTransformer",))
        exported_target = options.get("exported_target", target)
        fx = fixture(name)
        x, result = _explain(name, method, variant, target)
        exported = explained_model(fx.path, method, "decoder", exported_target, variant, x.shape)
        path = folder / f"{key.replace('/', '_')}.xai.onnx"
        save_exported(exported, path, load_model(fx.path))
        all_feeds = {exported.input_name: x, **(feeds or {})}
        jobs.append(
            {
                "key": key,
                "model": str(path),
                "feeds": {n: _feed(folder, key, n, v) for n, v in all_feeds.items()},
                "disabled": list(disabled),
            }
        )
        expected[key] = (result, exported, path, x)

    for name in EXPORT_FIXTURES:
        for method in METHODS:
            add(f"{name}/{method}", name, method)
    add("p1/gradcampp", "unet2d_torchscript", "gradcampp", "p1")
    add("default-options/gradcam", "unet2d_torchscript", "gradcam", disabled=())
    # One exported file, other targets fed at run time: class 1, and a region mask.
    region = np.zeros((32, 32), bool)
    region[8:20, 10:26] = True
    # The default class (1) exported, class 0 fed at run time.
    add(
        "class0/gradcam",
        "unet2d_torchscript",
        "gradcam",
        target=Target(class_index=0),
        feeds={"saliency_class": np.array([0], np.int64)},
        exported_target=Target(),
    )
    add(
        "region/layercam",
        "unet3d",
        "layercam",
        target=Target(class_index=2, region=Region.from_mask(_region_3d())),
    )
    return run_deployed(folder, jobs), expected


def _region_3d() -> np.ndarray:
    mask = np.zeros((16, 16, 16), bool)
    mask[4:12, 2:9, 6:14] = True
    return mask


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", EXPORT_FIXTURES)
def test_exported_saliency_equals_explain(deployed, name: str, method: str) -> None:
    outputs, expected = deployed
    result = expected[f"{name}/{method}"][0]
    saliency = outputs[f"{name}/{method}|saliency"]
    assert saliency.shape == (1, *result.map.shape)
    assert saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0
    np.testing.assert_allclose(saliency[0], result.map, rtol=0, atol=1e-5)


def test_exported_models_keep_the_original_outputs(deployed) -> None:
    import onnxruntime as ort

    outputs, expected = deployed
    for name in EXPORT_FIXTURES:
        fx = fixture(name)
        _, _, path, x = expected[f"{name}/gradcam"]
        original = ort.InferenceSession(str(fx.path), providers=["CPUExecutionProvider"])
        assert [o.name for o in original.get_outputs()] == ["logits"]
        (logits,) = original.run(None, {fx.spec["input_name"]: x})
        deployed_logits = outputs[f"{name}/gradcam|logits"]
        assert deployed_logits.dtype == logits.dtype and deployed_logits.shape == logits.shape
        tolerance = 2e-2 if fx.is_fp16 else 1e-5
        scale = float(np.abs(logits.astype(np.float64)).max())
        error = np.abs(deployed_logits.astype(np.float64) - logits).max() / scale
        assert error <= tolerance, (name, error)
        model = onnx.load(str(path), load_external_data=False)
        assert [o.name for o in model.graph.output] == ["logits", "saliency"]


def test_class_and_region_are_inputs_with_defaults(deployed) -> None:
    outputs, expected = deployed
    # the default class (1) exported, class 0 fed: explain's class-0 map
    fed = outputs["class0/gradcam|saliency"][0]
    np.testing.assert_allclose(fed, expected["class0/gradcam"][0].map, atol=1e-5)
    default = outputs["unet2d_torchscript/gradcam|saliency"][0]  # not fed: class 1
    assert expected["unet2d_torchscript/gradcam"][0].target["class_index"] == 1
    assert np.abs(default - fed).max() > 0.05
    region_map = outputs["region/layercam|saliency"][0]
    np.testing.assert_allclose(region_map, expected["region/layercam"][0].map, atol=1e-5)
    all_voxels = outputs["unet3d/layercam|saliency"][0]
    assert np.abs(region_map - all_voxels).max() > 0.05  # the region changed the map
    model = onnx.load(str(expected["region/layercam"][2]), load_external_data=False)
    defaults = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(defaults["saliency_class"], [2])
    np.testing.assert_array_equal(defaults["saliency_region"][0, 0], _region_3d())


def test_variant_p1_and_default_session_options(deployed) -> None:
    outputs, expected = deployed
    p1 = outputs["p1/gradcampp|saliency"][0]
    np.testing.assert_allclose(p1, expected["p1/gradcampp"][0].map, atol=1e-5)
    # ORT's default options add the NCHWc transform, whose kernels round differently.
    default = outputs["default-options/gradcam|saliency"][0]
    np.testing.assert_allclose(default, expected["default-options/gradcam"][0].map, atol=1e-4)


@pytest.mark.parametrize("name", ["unet2d_dynamo", "unet2d_torchscript"])
def test_exported_files_pass_the_full_checker_and_keep_external_data(deployed, name) -> None:
    _, expected = deployed
    path = expected[f"{name}/gradcampp"][2]
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if fixture(name).spec["external_data"]:
        assert data.is_file() and locations == {data.name}
    else:
        assert not data.exists() and not locations


def test_export_cli_writes_and_refuses(tmp_path) -> None:
    fx = fixture("unet2d_torchscript")
    out = tmp_path / "m.xai.onnx"
    runner = CliRunner()
    args = ["export", str(fx.path), "--out", str(out), "--input-shape", "1x1x32x32"]
    first = runner.invoke(main, [*args, "--method", "layercam", "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.output)
    assert summary["method"] == "layercam" and summary["files"] == [str(out)]
    again = runner.invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output
    small_mask = tmp_path / "mask16.npy"
    np.save(small_mask, np.ones((16, 16), np.uint8))
    refusals = {
        "free dimensions": ["export", str(fx.path), "--out", str(tmp_path / "a.onnx")],
        "depends on the prediction": [*args[:3], str(tmp_path / "b.onnx"), "--region",
                                      "largest-component", "--input-shape", "1x1x32x32"],
        "must end in .onnx": [*args[:3], str(tmp_path / "c.npy"), "--input-shape", "1x1x32x32"],
        "is one of the inputs": [*args[:3], str(fx.path), "--input-shape", "1x1x32x32"],
        "writ": [*args[:3], "/proc/segattr.onnx", "--input-shape", "1x1x32x32"],
        "region mask has shape": [*args[:3], str(tmp_path / "d.onnx"), "--region",
                                  str(small_mask), "--input-shape", "1x1x32x32"],
    }  # fmt: skip
    for message, command in refusals.items():
        result = runner.invoke(main, command)
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        assert "Traceback" not in result.output
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "elsewhere.onnx")
    refused = runner.invoke(main, [*args[:3], str(link), "--input-shape", "1x1x32x32"])
    assert refused.exit_code == 2 and "symbolic link" in refused.output
    assert not (tmp_path / "elsewhere.onnx").exists()
    kwc = runner.invoke(main, [*args, "--force", "--method", "kwc"])
    assert kwc.exit_code == 2


def test_model_file_is_left_untouched(tmp_path) -> None:
    fx = fixture("unet2d_dynamo")
    before = {p.name: p.read_bytes() for p in fx.path.parent.glob("unet2d_dynamo*")}
    out = tmp_path / "d.xai.onnx"
    result = CliRunner().invoke(main, ["export", str(fx.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in fx.path.parent.glob("unet2d_dynamo*")}
    assert before == after


def test_the_python_example_of_the_export_page_runs(tmp_path, monkeypatch) -> None:
    """docs/export.md's snippet, on the 3D fixture exported as the page's model.xai.onnx."""
    page = Path(__file__).resolve().parents[1] / "docs" / "export.md"
    text = page.read_text(encoding="utf-8")
    (code,) = [part.split("```")[0] for part in text.split("```python\n")[1:]]
    fx = fixture("unet3d")
    monkeypatch.chdir(tmp_path)
    exported = explained_model(fx.path, "layercam", "decoder", None, "p2")
    save_exported(exported, tmp_path / "model.xai.onnx", load_model(fx.path))
    namespace = {"x": fx.input(0)}
    exec(code, namespace)
    assert namespace["saliency"].shape == (1, 16, 16, 16)
    assert namespace["other"].shape == (1, 16, 16, 16)
    assert np.abs(namespace["saliency"] - namespace["other"]).max() > 0.05  # class 1 vs 2


def test_in_graph_cancellation_rule_follows_explain_on_segresnet() -> None:
    """MONAI SegResNet: some decoder convolutions' gradients cancel (a group normalisation
    follows), others do not; the exported graph must take the same decision per layer."""
    import onnxruntime as ort

    families = Path(__file__).resolve().parent / "fixtures" / "families"
    spec = json.loads((families / "manifest.json").read_text())["fixtures"]["segresnet3d"]
    path = families / spec["file"]
    x = np.random.default_rng(0).standard_normal(spec["test_shape"]).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Explainer(path, provider="cpu").explain(x, "gradcam")
    assert any("sums to 0" in str(w.message) for w in caught)
    assert sum(bool(layer.weights.any()) for layer in result.layers) >= 1
    exported = explained_model(path, "gradcam", "decoder", None, "p2", x.shape)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        exported.proto.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["NchwcTransformer"],
    )
    (saliency,) = session.run(["saliency"], {exported.input_name: x})
    np.testing.assert_allclose(saliency[0], result.map, atol=1e-5)


def test_a_file_that_appears_during_the_export_is_not_replaced(tmp_path) -> None:
    from segattr_onnx.errors import OutputFileError
    from segattr_onnx.exporting import check_export_paths

    fx = fixture("unet2d_dynamo")  # external data: two files to publish
    source = load_model(fx.path)
    out = check_export_paths(tmp_path / "late.onnx", source, force=False)
    exported = explained_model(fx.path, "gradcam", "decoder", None, "p2")
    out.write_bytes(b"someone else's file")  # appears after the checks, before the write
    with pytest.raises(OutputFileError, match="appeared while the run was writing"):
        save_exported(exported, out, source)
    assert out.read_bytes() == b"someone else's file"
    assert not (tmp_path / "late.onnx.data").exists()  # the data published first is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.onnx"]  # no temporary left
    written = save_exported(exported, out, source, force=True)
    assert written == [out, tmp_path / "late.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)

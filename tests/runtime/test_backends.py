"""Executor backends without a cluster: how a worker rebuilds the explainer, and the errors
a user gets for an executor that is missing or misused."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.cli import main
from segattr_onnx.graph.loading import external_data_files
from segattr_onnx.runtime.backends import (
    ExecutorError,
    ExecutorOptions,
    ExplainerRecipe,
    LocalBackend,
    ModelShipment,
    executor_backend,
)
from segattr_onnx.synthetic import make_case, save_case
from tests.conftest import fixture


def test_a_shipped_model_unpacks_to_the_same_files_external_data_included(
    tmp_path: Path,
) -> None:
    fx = fixture("unet2d_dynamo")  # weights in unet2d_dynamo.onnx.data beside it
    explainer = Explainer(fx.path, provider="cpu")
    shipment = ModelShipment.of(explainer.model)
    assert len(shipment.files) == 1 + len(external_data_files(explainer.model)) > 1
    unpacked = shipment.unpack(tmp_path)
    assert unpacked.read_bytes() == Path(fx.path).read_bytes()
    for original in external_data_files(explainer.model):
        assert (tmp_path / original.name).read_bytes() == original.read_bytes()


def test_a_worker_refuses_a_shipment_whose_bytes_or_names_were_changed(tmp_path: Path) -> None:
    shipment = ModelShipment.of(Explainer(fixture("unet3d").path, provider="cpu").model)
    tampered = ModelShipment({**shipment.files, "model.onnx": b"other"}, shipment.digest)
    with pytest.raises(ExecutorError, match="does not match its digest"):
        tampered.unpack(tmp_path / "a")
    escaping = {**shipment.files, "../outside.bin": b"x"}
    with pytest.raises(ExecutorError, match="unsafe name"):
        ModelShipment.from_files(escaping).unpack(tmp_path / "b")
    assert not (tmp_path / "outside.bin").exists()


def test_an_explainer_rebuilt_from_its_recipe_explains_identically(tmp_path: Path) -> None:
    fx = fixture("unet2d_torchscript")
    original = Explainer(fx.path, provider="cpu", seed=3, memory_budget=8 << 30)
    recipe = ExplainerRecipe.of(original, intra_op_threads=1)
    rebuilt = recipe.build(tmp_path)
    assert rebuilt.seed == 3 and rebuilt.memory_budget == 8 << 30
    assert rebuilt.intra_op_threads == 1
    target = Target(class_index=1)
    for method, variant in (("kwc", "p2"), ("ablationcam", "p1")):
        expected = original.explain(fx.input(0), method, target=target, variant=variant)
        got = rebuilt.explain(fx.input(0), method, target=target, variant=variant)
        np.testing.assert_array_equal(got.map, expected.map)


def test_the_local_backend_maps_in_order_on_the_callers_explainer() -> None:
    explainer = Explainer(fixture("unet3d").path, provider="cpu")
    seen = []

    def job(worker_explainer, item):
        seen.append(worker_explainer)
        return item * 2

    assert list(LocalBackend().map(explainer, job, iter([1, 2, 3]))) == [(0, 2), (1, 4), (2, 6)]
    assert all(e is explainer for e in seen)


def test_options_for_a_cluster_are_refused_with_the_local_executor() -> None:
    with pytest.raises(ExecutorError, match="workers only apply to a cluster executor"):
        executor_backend("local", ExecutorOptions(workers=2))
    with pytest.raises(ExecutorError, match="whole number"):
        ExecutorOptions(workers=0)


def test_an_executor_not_installed_says_how_to_install_it(monkeypatch, tmp_path: Path) -> None:
    from segattr_onnx import plugins

    monkeypatch.setattr(plugins.registry(), "executors", {})
    with pytest.raises(ExecutorError, match=r"pip install \./plugins/segattr-ray"):
        executor_backend("ray")
    with pytest.raises(ExecutorError, match="'spark' is unknown; installed executors: local"):
        executor_backend("spark")
    save_case(make_case(90_000, dim=2, size=64), tmp_path / "case.npz")
    fx = fixture("unet2d_torchscript")
    out = tmp_path / "m.npy"
    command = ["explain", str(fx.path), str(tmp_path / "case.npz"), "--out", str(out)]
    result = CliRunner().invoke(main, [*command, "--executor", "ray"])
    assert result.exit_code == 2 and "pip install ./plugins/segattr-ray" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_the_ray_plugin_without_ray_says_how_to_install_ray(monkeypatch) -> None:
    from segattr_ray import make_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(ExecutorError, match=r"needs Ray, which is not installed: pip install"):
        make_backend(ExecutorOptions())


class _RecordingBackend(LocalBackend):
    """A registered executor that runs locally and records how it was built and used."""

    built: ClassVar[list[ExecutorOptions]] = []
    mapped = closed = 0

    def __init__(self, options: ExecutorOptions) -> None:
        type(self).built.append(options)

    def map(self, explainer, job, items):
        type(self).mapped += 1
        yield from super().map(explainer, job, items)

    def close(self) -> None:
        type(self).closed += 1


def test_an_audit_config_chooses_the_executor_and_the_command_line_overrides_it(
    monkeypatch, tmp_path: Path
) -> None:
    from segattr_onnx import plugins
    from segattr_onnx.audit import audit
    from segattr_onnx.bundled import example_model_path

    monkeypatch.setattr(plugins.registry(), "executors", {"fake": _RecordingBackend})
    monkeypatch.setattr(_RecordingBackend, "built", [])
    save_case(make_case(90_000, dim=2, size=64), tmp_path / "case.npz")
    config = tmp_path / "audit.toml"
    config.write_text(
        f'model = "{example_model_path()}"\nmethods = ["gradcam"]\nprovider = "cpu"\n'
        'checks = ["image_preserved <= 1"]\nexecutor = "fake"\nworkers = 3\nworker_gpus = 0.5\n'
        '[[cases]]\ninput = "case.npz"\n'
    )
    assert audit(config).passed
    audit(config, executor_options=ExecutorOptions(workers=2))
    assert _RecordingBackend.built == [
        ExecutorOptions(workers=3, worker_gpus=0.5),
        ExecutorOptions(workers=2, worker_gpus=0.5),  # one option replaced, the other kept
    ]
    assert _RecordingBackend.mapped == _RecordingBackend.closed == 2
    # --executor local: the config's cluster options do not apply, and are not an error.
    assert audit(config, executor="local").passed
    assert len(_RecordingBackend.built) == 2
    result = CliRunner().invoke(main, ["audit", str(config), "--quiet", "--executor", "spark"])
    assert result.exit_code == 2 and "'spark' is unknown" in result.stderr


def test_an_in_memory_model_ships_its_external_data_and_odd_names_resolve(
    tmp_path: Path,
) -> None:
    import shutil

    import onnx

    from segattr_onnx.graph.loading import from_proto

    fx = fixture("unet2d_dynamo")
    proto = onnx.load(str(fx.path), load_external_data=False)
    in_memory = from_proto(proto, fx.path.parent)
    expected = Explainer(fx.path, provider="cpu").explain(fx.input(0), "kwc")
    rebuilt = ExplainerRecipe.of(Explainer(in_memory, provider="cpu")).build(tmp_path / "a")
    np.testing.assert_array_equal(rebuilt.explain(fx.input(0), "kwc").map, expected.map)
    # A location through a folder ("sub/../x.data") loads beside the model, here and there.
    odd = tmp_path / "odd"
    (odd / "sub").mkdir(parents=True)
    renamed = onnx.load(str(fx.path), load_external_data=False)
    for tensor in renamed.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                shutil.copy(fx.path.parent / entry.value, odd / entry.value)
                entry.value = f"sub/../{entry.value}"
    onnx.save(renamed, str(odd / "model.onnx"))
    recipe = ExplainerRecipe.of(Explainer(odd / "model.onnx", provider="cpu"))
    rebuilt = recipe.build(tmp_path / "b")
    np.testing.assert_array_equal(rebuilt.explain(fx.input(0), "kwc").map, expected.map)


class _ChangingBackend(LocalBackend):
    """Changes the first case's file once that case has been scored."""

    def __init__(self, case: Path, replacement: Path) -> None:
        self.case, self.replacement = case, replacement

    def map(self, explainer, job, items):
        for index, result in super().map(explainer, job, items):
            if index == 0:
                self.case.write_bytes(self.replacement.read_bytes())
            yield index, result


def test_a_case_changed_during_the_audit_is_not_reused_with_the_old_scores(
    tmp_path: Path,
) -> None:
    from segattr_onnx.audit import audit
    from segattr_onnx.bundled import example_model_path

    (tmp_path / "cases").mkdir()
    for seed in (90_000, 90_001):
        save_case(make_case(seed, dim=2, size=64), tmp_path / "cases" / f"c{seed}.npz")
    save_case(make_case(90_002, dim=2, size=64), tmp_path / "other.npz")
    config = tmp_path / "audit.toml"
    config.write_text(
        f'model = "{example_model_path()}"\nmethods = ["gradcam"]\nprovider = "cpu"\n'
        'checks = ["image_preserved <= 1"]\n[[cases]]\ninput = "cases/*.npz"\n'
    )
    changing = _ChangingBackend(tmp_path / "cases" / "c90000.npz", tmp_path / "other.npz")
    audit(config, executor=changing)
    resumed = audit(config, resume=True)
    # The stored result of c90000 was computed from its old content: it must not be reused.
    assert (resumed.reused, resumed.computed) == (1, 1)

"""The segattr-ray plugin on a local Ray cluster that this module starts (2 CPUs, loopback).

What a user relies on: ``--executor ray`` gives the local executor's maps, scores and audit
reports; a worker killed mid-audit changes nothing; an interrupted driver resumes from what
it stored. Ray is a test requirement (the README's test command installs the plugin), so a
missing Ray fails here instead of skipping.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.audit import audit
from segattr_onnx.bundled import example_model_path
from segattr_onnx.cli import main
from segattr_onnx.metrics.scoring import score_map
from segattr_onnx.progress import NoProgress
from segattr_onnx.runtime.backends import ExecutorOptions, executor_backend
from segattr_onnx.synthetic import make_case, save_case
from tests.conftest import fixture

METHODS = ("kwc", "scorecam", "ablationcam", "gradcam", "gradcampp", "layercam")


@pytest.fixture(scope="module")
def cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def backend(cluster):
    # Per test: its workers hold both CPUs, which another test's backend then waits for.
    chosen = executor_backend("ray", ExecutorOptions(workers=2))
    yield chosen
    chosen.close()


def _scores(explainer: Explainer, x: np.ndarray, attribution: np.ndarray, variant: str) -> dict:
    return score_map(
        explainer, x, attribution, target=Target(class_index=1), variant=variant, steps=4
    ).to_dict()


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d"])
def test_every_method_gives_the_local_maps_and_scores_through_ray(name: str, backend) -> None:
    fx = fixture(name)
    x = fx.input(0)
    target = Target(class_index=1)
    local = Explainer(fx.path, provider="cpu")
    remote = Explainer(fx.path, provider="cpu", executor=backend)
    for method in METHODS:
        variant = "p1" if method == "ablationcam" else "p2"  # P1's Glorot kernels travel too
        expected = local.explain(x, method, target=target, variant=variant)
        pool_before = backend.current_pool  # another model's pool is replaced on first use
        before = sum(pool_before.items_run()) if pool_before is not None else 0
        got = remote.explain(x, method, target=target, variant=variant)
        np.testing.assert_allclose(got.map, expected.map, rtol=0, atol=1e-6, err_msg=method)
        expected_scores = _scores(local, x, expected.map, variant)
        got_scores = _scores(remote, x, got.map, variant)
        assert got_scores.keys() == expected_scores.keys()
        for key, value in expected_scores.items():
            if isinstance(value, float) and key != "seconds":
                assert abs(got_scores[key] - value) <= 1e-6, (method, key)
        # The work went to the actors: ablations and curve steps are not run here. (Grad-CAM's
        # map of unet3d is 0, its gradients cancelling: nothing to score, nothing sent.)
        pool = backend.current_pool
        if expected.map.any():
            assert sum(pool.items_run()) > (before if pool is pool_before else 0), method
        remote.forget_case()
        local.forget_case()


def test_one_case_is_split_over_both_workers(backend) -> None:
    fx = fixture("unet3d")
    remote = Explainer(fx.path, provider="cpu", executor=backend)
    remote.explain(fx.input(0), "kwc", target=Target(class_index=1))
    pool = backend.current_pool
    assert pool.size == 2 and all(count > 0 for count in pool.items_run())


def _audit_config(tmp_path: Path, cases: int = 4) -> Path:
    folder = tmp_path / "cases"
    folder.mkdir()
    for seed in range(90_000, 90_000 + cases):
        save_case(make_case(seed, dim=2, size=64), folder / f"case{seed}.npz")
    config = tmp_path / "audit.toml"
    config.write_text(
        "\n".join(
            [
                f'model = "{example_model_path()}"',
                'methods = ["kwc", "gradcam"]',
                'layers = "last"',
                'provider = "cpu"',
                'output = "results"',
                "steps = 4",
                'checks = ["prediction_preserved >= 0.5", "image_preserved <= 0.9"]',
                "",
                "[[cases]]",
                'input = "cases/*.npz"',
                'labels = "same"',
            ]
        )
    )
    return config


def _results(folder: Path) -> list[dict]:
    return json.loads((folder / "audit.json").read_text())["results"]


def _same_results(got: list[dict], expected: list[dict]) -> None:
    assert [(r["case"], r["method"], r["check"], r["passed"]) for r in got] == [
        (r["case"], r["method"], r["check"], r["passed"]) for r in expected
    ]
    for a, b in zip(got, expected, strict=True):
        assert abs(a["value"] - b["value"]) <= 1e-6, (a, b)


def test_an_audit_through_ray_gives_the_local_reports_and_exit_code(
    tmp_path: Path, cluster, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # --output is relative to the current directory
    config = _audit_config(tmp_path)
    runner = CliRunner()
    local = runner.invoke(main, ["audit", str(config), "--quiet", "--output", "local"])
    remote = runner.invoke(
        main,
        ["audit", str(config), "--quiet", "--output", "ray", "--executor", "ray", "--workers", "2"],
    )
    assert local.exit_code == remote.exit_code, (local.output, remote.output)
    assert local.exit_code in (0, 1)
    _same_results(_results(Path("ray")), _results(Path("local")))
    local_scores = sorted(Path("local/cases").glob("*.json"))
    for path in local_scores:
        stored = json.loads((Path("ray/cases") / path.name).read_text())
        assert stored["fingerprint"] == json.loads(path.read_text())["fingerprint"]


def test_a_worker_killed_mid_audit_does_not_change_the_result(tmp_path: Path, backend) -> None:
    config = _audit_config(tmp_path, cases=6)
    expected = audit(config, output=tmp_path / "local")
    records = tmp_path / "ray" / "cases"
    killed: list[int] = []

    def kill_one_worker_after_the_first_result() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pool = backend.current_pool
            if pool is not None and records.is_dir() and any(records.glob("*.json")):
                killed.append(pool.pids[0])
                os.kill(pool.pids[0], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_worker_after_the_first_result)
    backend.close()  # a fresh pool, whose first pid the killer reads
    killer.start()
    report = audit(config, output=tmp_path / "ray", executor=backend)
    killer.join()
    assert killed, "the audit finished before a worker could be killed"
    assert report.computed == 12 and report.passed == expected.passed
    _same_results(_results(tmp_path / "ray"), _results(tmp_path / "local"))
    # The killed actor was restarted in a new process, which went on taking work.
    assert killed[0] not in backend.current_pool.current_pids()


class _StopAfter(NoProgress):
    """A progress bar that stands for Ctrl-C after ``limit`` results."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, 0

    def update(self, count: int = 1) -> None:
        self.seen += count
        if self.seen >= self.limit:
            raise KeyboardInterrupt


def test_an_interrupted_ray_audit_resumes_from_what_it_stored(tmp_path: Path, backend) -> None:
    config = _audit_config(tmp_path)
    expected = audit(config, output=tmp_path / "local")
    with pytest.raises(KeyboardInterrupt):
        audit(config, output=tmp_path / "ray", executor=backend, progress=lambda *a: _StopAfter(3))
    stored = len(list((tmp_path / "ray" / "cases").glob("*.json")))
    assert stored == 3
    resumed = audit(config, output=tmp_path / "ray", executor=backend, resume=True)
    assert (resumed.reused, resumed.computed) == (3, 5)
    assert resumed.passed == expected.passed
    _same_results(_results(tmp_path / "ray"), _results(tmp_path / "local"))


def test_explain_through_ray_on_the_command_line_writes_the_local_map(
    tmp_path: Path, cluster
) -> None:
    save_case(make_case(90_000, dim=2, size=64), tmp_path / "case.npz")
    maps = {}
    for name, extra in (("local", []), ("ray", ["--executor", "ray", "--workers", "2"])):
        out = tmp_path / f"{name}.npy"
        result = CliRunner().invoke(
            main,
            [
                "explain",
                str(example_model_path()),
                str(tmp_path / "case.npz"),
                "--out",
                str(out),
                "--quiet",
                "--provider",
                "cpu",
                "--score",
                "--json",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        maps[name] = (np.load(out), json.loads(result.stdout)["scores"])
    np.testing.assert_allclose(maps["ray"][0], maps["local"][0], rtol=0, atol=1e-6)
    for key, value in maps["local"][1].items():
        if isinstance(value, float) and key != "seconds":
            assert abs(maps["ray"][1][key] - value) <= 1e-6, key


def test_a_user_error_on_a_worker_comes_back_as_the_same_one_line_error(
    tmp_path: Path, cluster
) -> None:
    config = _audit_config(tmp_path, cases=1)
    np.save(tmp_path / "roi.npy", np.ones((3, 3), bool))  # not the map's 64 x 64
    text = config.read_text() + '\nroi = "roi.npy"\n'
    config.write_text(text.replace("image_preserved <= 0.9", "roi_mass_fraction >= 0"))
    result = CliRunner().invoke(
        main, ["audit", str(config), "--quiet", "--executor", "ray", "--workers", "1"]
    )
    assert result.exit_code == 2, result.output
    assert "ROI mask roi.npy has shape (3, 3)" in result.stderr
    assert "Traceback" not in result.output and "RayTaskError" not in result.output

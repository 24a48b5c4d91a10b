"""Shared fixtures: the committed ONNX models and their architecture manifest.

The models and ``manifest.json`` are made by ``tests/fixtures/make_models.py`` (needs torch);
the tests themselves need only onnx and onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from segattr_onnx.runtime.sessions import QDQ_AS_SPECIFIED

MODELS = Path(__file__).parent / "fixtures" / "models"
MANIFEST = json.loads((MODELS / "manifest.json").read_text())["fixtures"]
FIXTURE_NAMES = sorted(MANIFEST)
FLOAT32_FIXTURES = [n for n in FIXTURE_NAMES if MANIFEST[n]["dtype"] == "float32"]


@dataclass(frozen=True)
class Fixture:
    name: str
    path: Path
    spec: dict

    @property
    def test_shape(self) -> tuple[int, ...]:
        return tuple(self.spec["test_shape"])

    @property
    def is_fp16(self) -> bool:
        return self.spec["dtype"] == "float16"

    @property
    def is_quantized(self) -> bool:
        return bool(self.spec.get("quantized"))

    def input(self, seed: int = 0, batch: int = 1) -> np.ndarray:
        shape = (batch, *self.test_shape[1:])
        dtype = np.float16 if self.is_fp16 else np.float32
        return np.random.default_rng(seed).standard_normal(shape).astype(dtype)

    def load_with_weights(self) -> onnx.ModelProto:
        """The model with external data read in, for building independent references."""
        return onnx.load(str(self.path), load_external_data=True)


def fixture(name: str) -> Fixture:
    return Fixture(name, MODELS / MANIFEST[name]["file"], MANIFEST[name])


@pytest.fixture(params=FIXTURE_NAMES)
def any_fixture(request) -> Fixture:
    return fixture(request.param)


def run_reference(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    base_dir: Path | None = None,
    optimised: bool = False,
) -> list[np.ndarray]:
    """Run a model with every ORT optimisation off: the plain semantics of the graph.

    ``optimised``: with ORT's optimisations on and QDQ pairs kept as specified, as the
    package's own sessions run. A QDQ model rounds each tensor to its quantisation grid, so
    a one-ulp difference between the plain and the optimised convolution kernels can move
    a value to the next step (0.6 % of the output's range on the QDQ fixture, on an AVX-512
    Xeon; not on an AVX2 EPYC): its reference must do the same float arithmetic.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimised
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimised:
        options.add_session_config_entry(*QDQ_AS_SPECIFIED)
    if base_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(base_dir)
        )
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str = "") -> None:
    """Relative closeness scaled by the reference's magnitude (robust near zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max()), 1e-12)
    error = float(np.abs(actual - expected).max()) / scale
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"


def pytest_configure(config: pytest.Config) -> None:
    """CLI runs in the tests (in-process and in subprocesses) cache optimised graphs in a
    folder of their own, not in the user's default cache (unless SEGATTR_CACHE_DIR already
    names one: CI sets none)."""
    import os
    import tempfile

    if "SEGATTR_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="segattr-test-cache-")
        os.environ["SEGATTR_CACHE_DIR"] = os.path.join(folder, "cache")
        config.add_cleanup(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))


@pytest.fixture
def counted(monkeypatch):
    """The verdicts of the batch check's runs (``runtime/batch_check.py``), one per run: how
    many times it really ran the model."""
    from segattr_onnx.runtime import batch_check

    runs: list[bool] = []
    original = batch_check.keeps_cases_apart

    def counting(*args):
        runs.append(original(*args))
        return runs[-1]

    monkeypatch.setattr(batch_check, "keeps_cases_apart", counting)
    return runs

"""Integrated Gradients, SmoothGrad and Gradient×Input against references that share nothing
with the library's backward graph.

- Completeness: Σ IG attributions = T(x) − T(x′), with T computed here from plain ONNX Runtime
  runs of the unmodified model and the target's activation and region sums written in numpy.
- The torch twin of unet2d_torchscript (tests/fixtures/make_models.py, rebuilt from its seed)
  differentiated by autograd in float64 at the same points: IG's midpoint nodes, SmoothGrad's
  noise draws (re-drawn here from the documented rule), x itself for Gradient×Input.
- Central finite differences of T for Gradient×Input on the channels-last and 3D fixtures:
  Σ_{v∈m} x_v ∂T/∂x_v is the derivative of T(x + t·x⊙m) at t = 0.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from segattr_onnx import Explainer, Target
from segattr_onnx.cli import main
from segattr_onnx.errors import GradientRuleError, MethodError, ShapeInferenceError
from segattr_onnx.methods import create_method
from segattr_onnx.methods.input_gradients import CompletenessWarning, NoisyInputs
from segattr_onnx.runtime import input_gradients as runtime_input_gradients
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from segattr_onnx.sliding_window import SlidingWindow
from segattr_onnx.target import Region
from segattr_onnx.windowed import explain_windowed
from tests.builders import build
from tests.conftest import fixture, run_reference
from tests.methods.test_gradients import _freeze_gates
from tests.methods.test_windowed_reference import _torch_twin

# How each fixture's T reads its output, written out here rather than taken from the library:
# (class axis, class, activation applied to the output).
TARGETS = {
    "unet2d_torchscript": (1, 1, "softmax"),
    "unet2d_fp16": (1, 1, "softmax"),
    "unet2d_nhwc": (-1, 0, "sigmoid"),
    "unet2d_dynamo": (1, 0, "none"),  # the graph ends in Sigmoid
    "unet3d": (1, 1, "none"),  # the graph ends in Softmax
}


def _probability(output: np.ndarray, axis: int, index: int, activation: str) -> np.ndarray:
    values = np.moveaxis(np.asarray(output, np.float64), axis, 1)
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True))[:, index]
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-values[:, index]))
    return values[:, index]


def _score(name: str, x: np.ndarray, model: onnx.ModelProto | None = None) -> float:
    """T = Σ P of one input, from a plain run of the fixture (every ORT optimisation off), or
    of ``model`` in its place."""
    fx = fixture(name)
    model = model if model is not None else fx.load_with_weights()
    (output,) = run_reference(model, {"image": x}, fx.path.parent)
    return float(_probability(output, *TARGETS[name])[0].sum())


def _smooth_volume() -> np.ndarray:
    """Three Gaussian blobs of either sign, (1, 1, 16, 16, 16): a smooth volume."""
    grid = np.mgrid[:16, :16, :16].astype(np.float64)
    rng = np.random.default_rng(1)
    volume = np.zeros((16, 16, 16))
    for _ in range(3):
        centre = rng.uniform(3, 13, 3)[:, None, None, None]
        width, height = rng.uniform(4, 12), rng.uniform(-1, 1)
        volume += height * np.exp(-((grid - centre) ** 2).sum(axis=0) / width)
    return volume[None, None].astype(np.float32)


def _baseline(x: np.ndarray, kind: str) -> np.ndarray:
    return np.zeros_like(x) if kind == "zero" else np.full_like(x, x.min())


@pytest.mark.parametrize(
    ("name", "baseline"),
    [
        ("unet2d_torchscript", "zero"),
        ("unet2d_torchscript", "minimum"),
        ("unet2d_nhwc", "zero"),
        ("unet2d_nhwc", "minimum"),
        ("unet2d_dynamo", "zero"),
        ("unet2d_dynamo", "minimum"),
        ("unet2d_fp16", "zero"),
        ("unet2d_fp16", "minimum"),
        ("unet3d", "minimum"),
    ],
)
def test_integrated_gradients_add_up_to_the_score_difference(name: str, baseline: str) -> None:
    """Σ attributions = T(x) − T(x′) within 1 % at 64 steps.

    The 3D fixture takes a smooth volume: on white noise its path integrand swings between
    about −115 and +184 around a mean of 17 (leaky-ReLU kinks in every voxel), which 64
    midpoints resolve only to ~9 %, and its instance norms make T jump between a zero
    baseline and the first step (see the warning test below).
    """
    fx = fixture(name)
    x = _smooth_volume() if name == "unet3d" else fx.input(0)
    explanation = Explainer(fx.path, provider="cpu").explain(
        x, "integrated_gradients", baseline=baseline
    )
    expected = _score(name, x) - _score(name, _baseline(x, baseline))
    assert abs(expected) > 1.0  # a difference worth explaining
    total = float(explanation.attributions.sum(dtype=np.float64))
    assert abs(total - expected) <= 0.01 * abs(expected), (total, expected)
    spatial = x.shape[1:-1] if name == "unet2d_nhwc" else x.shape[2:]
    assert explanation.attributions.shape == (1, *spatial)
    assert explanation.attributions.dtype == np.float32 and explanation.layers == ()


def test_the_region_and_class_fed_to_the_backward_model_are_the_targets() -> None:
    """Completeness with class 0 and a user region: both reach T's head."""
    name = "unet2d_torchscript"
    x = fixture(name).input(3)
    region = np.zeros((32, 32), bool)
    region[4:20, 10:30] = True
    explanation = Explainer(fixture(name).path, provider="cpu").explain(
        x, "integrated_gradients", target=Target(class_index=0, region=Region.from_mask(region))
    )
    (output,) = run_reference(fixture(name).load_with_weights(), {"image": x})
    (zero,) = run_reference(fixture(name).load_with_weights(), {"image": np.zeros_like(x)})
    expected = (
        _probability(output, 1, 0, "softmax")[0][region].sum()
        - _probability(zero, 1, 0, "softmax")[0][region].sum()
    )
    total = explanation.attributions.sum(dtype=np.float64)
    assert abs(total - expected) <= 0.01 * abs(expected)


# --------------------------------------------------------------------------- torch twin


@pytest.fixture(scope="module")
def twin() -> torch.nn.Module:
    net = _torch_twin("unet2d_torchscript")
    x = fixture("unet2d_torchscript").input(0)
    (output,) = run_reference(fixture("unet2d_torchscript").load_with_weights(), {"image": x})
    with torch.no_grad():
        mirrored = net(torch.from_numpy(x).double()).numpy()
    assert np.abs(mirrored - output).max() <= 1e-5 * np.abs(output).max()  # the same network
    return net


def _torch_gradients(net: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
    """∂T/∂x of each row, T = Σ softmax(logits)[class 1], by autograd in float64."""
    inputs = torch.from_numpy(np.asarray(rows, np.float64)).requires_grad_(True)
    torch.softmax(net(inputs), dim=1)[:, 1].sum().backward()
    return inputs.grad.numpy()


def _assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    scale = np.abs(expected).max()
    assert scale > 0
    error = np.abs(np.asarray(actual, np.float64) - expected).max() / scale
    assert error <= rtol, error


@pytest.mark.parametrize("baseline", ["zero", "minimum"])
def test_integrated_gradients_equal_autograd_on_the_torch_twin(twin, baseline: str) -> None:
    x = fixture("unet2d_torchscript").input(1)
    steps = 64
    explanation = Explainer(fixture("unet2d_torchscript").path, provider="cpu").explain(
        x, "integrated_gradients", steps=steps, baseline=baseline
    )
    start = _baseline(x, baseline).astype(np.float64)
    alphas = (np.arange(steps) + 0.5) / steps  # the midpoint rule
    path = start + alphas[:, None, None, None] * (x.astype(np.float64) - start)
    mean = _torch_gradients(twin, path).mean(axis=0)
    expected = ((x - start) * mean)[0]
    _assert_close(explanation.attributions, expected, 1e-4)


def test_smoothgrad_equals_the_mean_autograd_gradient_over_the_same_noise(twin) -> None:
    x = fixture("unet2d_torchscript").input(2)
    samples, noise, seed = 6, 0.2, 5
    explainer = Explainer(fixture("unet2d_torchscript").path, provider="cpu", seed=seed)
    explanation = explainer.explain(x, "smoothgrad", samples=samples, noise=noise)
    sigma = noise * float(x.max() - x.min())
    noisy = np.stack(
        [
            (
                x[0].astype(np.float64)
                + sigma * np.random.default_rng([seed, i]).standard_normal(x.shape[1:])
            ).astype(np.float32)
            for i in range(samples)
        ]
    )
    # The rows the library fed are these draws (its NoisyInputs, exposed for this).
    np.testing.assert_array_equal(NoisyInputs(x, sigma, seed)(0, samples), noisy)
    expected = _torch_gradients(twin, noisy).mean(axis=0)[0]
    _assert_close(explanation.attributions, expected, 1e-4)


def test_gradient_input_equals_autograd_on_the_torch_twin(twin) -> None:
    x = fixture("unet2d_torchscript").input(4)
    explanation = Explainer(fixture("unet2d_torchscript").path, provider="cpu").explain(
        x, "gradient_input"
    )
    expected = (x * _torch_gradients(twin, x))[0]
    _assert_close(explanation.attributions, expected, 1e-4)
    # The map: the positive part of the channel sum, divided by its largest value.
    positive = np.maximum(expected.sum(axis=0), 0)
    np.testing.assert_allclose(explanation.map, positive / positive.max(), atol=1e-4)


# --------------------------------------------------------------------------- finite differences


def test_gradient_input_sums_equal_finite_differences() -> None:
    """Σ_{v∈m} x_v ∂T/∂x_v = d/dt T(x + t·x⊙m) at 0, for two halves and a quarter of x, on
    the channels-last fixture.

    The differences are taken on the network with its ReLU gates frozen at x (each a product
    with its own slope there, as in test_gradients.py): the same gradient at x, with far fewer
    kinks near it, so a step of 1e-3 settles to ~1e-5 above float32's rounding noise.
    """
    fx = fixture("unet2d_nhwc")
    x = fx.input(5)
    explanation = Explainer(fx.path, provider="cpu").explain(x, "gradient_input")
    attributions = explanation.attributions[0]  # one input channel
    frozen = _freeze_gates(fx.load_with_weights(), x)
    half = np.zeros((32, 32), bool)
    half[:16] = True
    quarter = half.copy()
    quarter[:, 16:] = False
    step = 1e-3
    for mask in (half, ~half, quarter):
        direction = x.astype(np.float64) * mask[None, :, :, None]
        up = _score(fx.name, (x + step * direction).astype(np.float32), model=frozen)
        down = _score(fx.name, (x - step * direction).astype(np.float32), model=frozen)
        expected = (up - down) / (2 * step)
        actual = float(attributions[mask].sum(dtype=np.float64))
        assert abs(expected) > 1.0
        assert abs(actual - expected) <= 1e-3 * abs(expected), (actual, expected)


def test_gradient_input_equals_autograd_on_the_3d_twin() -> None:
    """The 3D fixture's torch twin (its ONNX weights loaded) in float64; its finite
    differences need steps below float32's reach (the leaky-ReLU and max-pool kinks are dense
    near any input)."""
    net = _torch_twin("unet3d")
    x = fixture("unet3d").input(5)
    explanation = Explainer(fixture("unet3d").path, provider="cpu").explain(x, "gradient_input")
    inputs = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    net(inputs)[:, 1].sum().backward()  # the twin ends in its softmax
    expected = (x * inputs.grad.numpy())[0]
    _assert_close(explanation.attributions, expected, 1e-4)
    # Instance norms after the first convolution make T(s·x) constant in s: the attributions
    # of the whole input cancel.
    whole = float(explanation.attributions.sum(dtype=np.float64))
    assert abs(whole) <= 1e-5 * np.abs(explanation.attributions).sum()


# --------------------------------------------------------------------------- batching


def _record(explanation, purpose: str = "input-gradient"):
    (record,) = [r for r in explanation.runs if r.purpose == purpose]
    return record


@pytest.mark.parametrize(
    ("method", "options"),
    [("integrated_gradients", {"steps": 40}), ("smoothgrad", {"samples": 9})],
)
def test_batched_rows_equal_rows_run_one_at_a_time(method: str, options: dict, monkeypatch) -> None:
    """The same network exported with a dynamic batch and with a fixed batch of 1: the first
    runs its rows batched (and, when the budget allows 16 rows, in even chunks of 14 whose
    last is padded), the second one at a time; the attributions agree."""
    x = fixture("unet2d_torchscript").input(6)
    single = Explainer(fixture("unet2d_fixed_batch").path, provider="cpu", seed=2)
    alone = single.explain(x, method, **options)
    assert _record(alone).batch_size == 1
    assert _record(alone).session_runs == next(iter(options.values()))
    batched = Explainer(fixture("unet2d_torchscript").path, provider="cpu", seed=2)
    whole = batched.explain(x, method, **options)
    assert _record(whole).batch_size > 1
    _assert_close(whole.attributions, alone.attributions.astype(np.float64), 1e-5)

    monkeypatch.setattr(runtime_input_gradients, "chunk_size", lambda total, *a, **k: 16)
    rows = next(iter(options.values()))
    chunked = Explainer(fixture("unet2d_torchscript").path, provider="cpu", seed=2)
    padded = chunked.explain(x, method, **options)
    runs = -(-rows // 16)
    assert _record(padded).session_runs == runs
    assert _record(padded).batch_size == -(-rows // runs)
    _assert_close(padded.attributions, alone.attributions.astype(np.float64), 1e-5)


def test_a_model_that_mixes_its_batch_runs_one_row_at_a_time(tmp_path: Path) -> None:
    """A free batch dim with a batch of 1 hard-coded inside: the batch check sends its rows
    one by one, and the result is that of the same weights without the twist."""
    plain, twisted = tmp_path / "plain.onnx", tmp_path / "twisted.onnx"
    onnx.save(build(seed=3), plain)
    onnx.save(build(seed=3, hard_batch=True), twisted)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    expected = Explainer(plain, provider="cpu").explain(x, "smoothgrad", samples=8)
    with pytest.warns(UserWarning, match="batch"):
        actual = Explainer(twisted, provider="cpu").explain(x, "smoothgrad", samples=8)
    assert _record(actual).batch_size == 1 and _record(expected).batch_size == 8
    _assert_close(actual.attributions, expected.attributions.astype(np.float64), 1e-5)


def test_a_batch_the_backward_model_cannot_take_falls_back_to_one_row(monkeypatch) -> None:
    """A batched backward model that fails to build (as an export hard-coding batch 1 inside
    may): a warning, then one row at a time, with the same result; the progress bar counts
    every pass that ran."""
    name, x = "unet2d_torchscript", fixture("unet2d_torchscript").input(10)
    expected = Explainer(fixture(name).path, provider="cpu").explain(x, "smoothgrad", samples=5)
    build_model = runtime_input_gradients.build_input_gradient_model

    def batch_one_only(analysis, target, spec, batch):
        if batch > 1:
            raise ShapeInferenceError("a batch of 1 is hard-coded")
        return build_model(analysis, target, spec, batch)

    monkeypatch.setattr(runtime_input_gradients, "build_input_gradient_model", batch_one_only)
    bars: list[list[int]] = []

    class Bar:
        def __init__(self, total: int, label: str) -> None:
            self.counts = [total]
            bars.append(self.counts)

        def update(self, count: int) -> None:
            self.counts.append(count)

        def close(self) -> None:
            pass

    explainer = Explainer(fixture(name).path, provider="cpu")
    with pytest.warns(BatchFallbackWarning, match="one input at a time"):
        actual = explainer.explain(x, "smoothgrad", samples=5, progress=Bar)
    assert _record(actual).batch_size == 1 and _record(actual).session_runs == 5
    _assert_close(actual.attributions, expected.attributions.astype(np.float64), 1e-5)
    ((total, *updates),) = bars  # the observation and 5 rows, counted once
    assert sum(updates) == total == actual.forward_passes == 6


def test_an_input_without_channel_axis_gets_one_channel_of_attributions(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(build(seed=1, no_channel_input=True), path)
    x = np.random.default_rng(1).standard_normal((1, 8, 8)).astype(np.float32)
    explanation = Explainer(path, provider="cpu").explain(x, "gradient_input")
    assert explanation.attributions.shape == (1, 8, 8) and explanation.map.shape == (8, 8)


def test_smoothgrad_is_deterministic_for_a_seed() -> None:
    path, x = fixture("unet2d_torchscript").path, fixture("unet2d_torchscript").input(7)
    first = Explainer(path, provider="cpu", seed=11).explain(x, "smoothgrad", samples=4)
    again = Explainer(path, provider="cpu", seed=11).explain(x, "smoothgrad", samples=4)
    other = Explainer(path, provider="cpu", seed=12).explain(x, "smoothgrad", samples=4)
    np.testing.assert_array_equal(first.map, again.map)
    np.testing.assert_array_equal(first.attributions, again.attributions)
    assert not np.allclose(first.attributions, other.attributions)


# --------------------------------------------------------------------------- guards


def test_an_unresolved_path_integral_is_reported() -> None:
    """White noise through the 3D fixture from a zero baseline: its instance norms make T(αx)
    jump between α = 0 and α = 1e-4, which no midpoint sees, so the attributions miss
    T(x) − T(0) by more than the score itself; a warning says so."""
    x = fixture("unet3d").input(0)
    expected = _score("unet3d", x) - _score("unet3d", np.zeros_like(x))
    with pytest.warns(CompletenessWarning, match="more steps"):
        explanation = Explainer(fixture("unet3d").path, provider="cpu").explain(
            x, "integrated_gradients", steps=16
        )
    total = float(explanation.attributions.sum(dtype=np.float64))
    assert abs(total - expected) > 0.05 * abs(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        Explainer(fixture("unet3d").path, provider="cpu").explain(
            _smooth_volume(), "integrated_gradients", baseline="minimum"
        )


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("integrated_gradients", {"steps": 0}, "at least 1"),
        ("integrated_gradients", {"steps": 2.5}, "whole number"),
        ("integrated_gradients", {"baseline": "mean"}, "unknown"),
        ("smoothgrad", {"samples": True}, "whole number"),
        ("smoothgrad", {"noise": -0.1}, "finite number"),
        ("smoothgrad", {"noise": float("nan")}, "finite number"),
        ("gradient_input", {"steps": 4}, "does not take"),
    ],
)
def test_bad_options_are_refused(method: str, options: dict, message: str) -> None:
    with pytest.raises(MethodError, match=message):
        create_method(method, **options)


def test_an_integer_input_has_no_gradient(tmp_path: Path) -> None:
    model = build(seed=0)
    model.graph.input[0].name = "raw"
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    model.graph.node.insert(0, helper.make_node("Cast", ["raw"], ["image"], to=TensorProto.FLOAT))
    path = tmp_path / "uint8.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(0).integers(0, 255, (1, 1, 8, 8)).astype(np.uint8)
    with pytest.raises(GradientRuleError, match="no gradient"):
        Explainer(path, provider="cpu").explain(x, "gradient_input")


def test_a_sliding_window_is_refused_by_name() -> None:
    x = fixture("unet3d").input(0)[0]
    window = SlidingWindow((16, 16, 16), overlap=0.5)
    explainer = Explainer(fixture("unet3d").path, provider="cpu")
    with pytest.raises(MethodError, match="integrated_gradients through a sliding window"):
        explain_windowed(explainer, x, window, "integrated_gradients")


# --------------------------------------------------------------------------- command line


def _invoke(*args: str):
    return CliRunner().invoke(main, ["explain", *args, "--provider", "cpu", "--quiet"])


@pytest.fixture
def case(tmp_path: Path) -> Path:
    path = tmp_path / "case.npy"
    np.save(path, fixture("unet2d_torchscript").input(8)[0])
    return path


def test_the_command_line_options_reach_the_methods(case: Path, tmp_path: Path) -> None:
    model = str(fixture("unet2d_torchscript").path)
    explainer = Explainer(model, provider="cpu", seed=4)
    x = np.load(case)
    runs = [
        (
            ["--method", "integrated_gradients", "--ig-steps", "8", "--ig-baseline", "minimum"],
            explainer.explain(x, "integrated_gradients", steps=8, baseline="minimum"),
        ),
        (
            ["--method", "smoothgrad", "--smoothgrad-samples", "3", "--smoothgrad-noise", "0.3"],
            explainer.explain(x, "smoothgrad", samples=3, noise=0.3),
        ),
        (
            ["--method", "gradient_input", "--layers", "last"],
            explainer.explain(x, "gradient_input"),
        ),
    ]
    for number, (args, expected) in enumerate(runs):
        out = tmp_path / f"map{number}.npy"
        result = _invoke(model, str(case), "--out", str(out), "--seed", "4", "--json", *args)
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(np.load(out), expected.map)
        summary = json.loads(result.stdout)
        assert summary["layers"] == [] and summary["forward_passes"] == expected.forward_passes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradcam", "--ig-steps", "8"], "--ig-steps applies to --method"),
        (["--method", "smoothgrad", "--ig-baseline", "minimum"], "--ig-baseline applies"),
        (["--method", "integrated_gradients", "--smoothgrad-noise", "0.1"], "--smoothgrad-noise"),
        (["--method", "kwc", "--smoothgrad-samples", "3"], "--smoothgrad-samples applies"),
    ],
)
def test_an_option_of_another_method_exits_2(case: Path, tmp_path: Path, args, message) -> None:
    out = tmp_path / "map.npy"
    result = _invoke(str(fixture("unet2d_torchscript").path), str(case), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output and not out.exists()


def test_with_a_patch_the_whole_input_is_explained_with_a_warning(tmp_path: Path) -> None:
    case = tmp_path / "volume.npy"
    x = fixture("unet3d").input(9)
    np.save(case, x[0])
    out = tmp_path / "map.npy"
    args = ["--method", "gradient_input", "--patch", "16x16x16"]
    result = _invoke(str(fixture("unet3d").path), str(case), "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    assert "patch by patch" in result.stderr and "whole input" in result.stderr
    expected = Explainer(fixture("unet3d").path, provider="cpu").explain(x, "gradient_input")
    np.testing.assert_array_equal(np.load(out), expected.map)

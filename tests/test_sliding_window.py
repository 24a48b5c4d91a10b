"""Sliding-window prediction against MONAI's ``sliding_window_inference`` on the same ONNX
model (run through ONNX Runtime as MONAI's predictor): same patch grid, weights and fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from monai.inferers import sliding_window_inference

from segattr_onnx import Explainer
from segattr_onnx.card import ModelCard, ModelCardError
from segattr_onnx.cli import main
from segattr_onnx.prediction import predict
from segattr_onnx.sliding_window import SlidingWindow, SlidingWindowError
from tests.conftest import fixture

# (fixture, input spatial size (not divisible by the patch), patch)
GRIDS = [
    ("unet2d_torchscript", (50, 37), (32, 32)),
    ("unet3d", (21, 30, 17), (16, 16, 16)),
]


def _monai(name: str, x: np.ndarray, patch, channels_last: bool = False, **settings) -> np.ndarray:
    """MONAI's fused output (1, C, *spatial) → (C, *spatial), the model run by ORT."""
    session = ort.InferenceSession(str(fixture(name).path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        values = patches.numpy()
        if channels_last:  # MONAI works channels first; the model takes them last
            values = np.moveaxis(values, 1, -1)
        out = session.run(None, {feed: np.ascontiguousarray(values)})[0]
        return torch.from_numpy(np.moveaxis(out, -1, 1) if channels_last else out)

    fused = sliding_window_inference(torch.from_numpy(x[None]), patch, 3, predictor, **settings)
    return fused.numpy()[0]


@pytest.mark.parametrize(("name", "spatial", "patch"), GRIDS)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_prediction_equals_monai_sliding_window_inference(name, spatial, patch, blend, overlap):
    x = np.random.default_rng(7).standard_normal((1, *spatial)).astype(np.float32)
    expected = _monai(name, x, patch, overlap=overlap, mode=blend, sigma_scale=0.125)
    window = SlidingWindow(patch, overlap=overlap, blend=blend, batch=3)
    got = predict(Explainer(fixture(name).path, provider="cpu"), x, window)
    assert got.values.shape == expected.shape
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=1e-5)
    assert got.windows == len(window.grid(spatial)) > 1


@pytest.mark.parametrize("padding", ["constant", "reflect", "replicate"])
def test_an_input_smaller_than_the_patch_is_padded_and_cropped_as_monai_does(padding):
    x = np.random.default_rng(8).standard_normal((1, 23, 45)).astype(np.float32)
    patch = (32, 32)  # taller than the input: padded 4 above, 5 below
    cval = 0.3 if padding == "constant" else 0.0  # torch takes a value for constant only
    settings = {"overlap": 0.5, "mode": "gaussian", "padding_mode": padding, "cval": cval}
    expected = _monai("unet2d_torchscript", x, patch, **settings)
    window = SlidingWindow(patch, overlap=0.5, padding=padding, cval=cval)
    got = predict(Explainer(fixture("unet2d_torchscript").path, provider="cpu"), x, window)
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=1e-5)


def test_a_channels_last_model_is_fused_on_its_channels() -> None:
    fx = fixture("unet2d_nhwc")
    x = np.random.default_rng(9).standard_normal((40, 52, 1)).astype(np.float32)
    expected = _monai("unet2d_nhwc", np.moveaxis(x, -1, 0), (32, 32), True, overlap=0.25)
    got = predict(Explainer(fx.path, provider="cpu"), x, SlidingWindow((32, 32), 0.25, "constant"))
    np.testing.assert_allclose(got.values, expected, rtol=0, atol=1e-5)


def test_without_a_window_the_prediction_is_the_models_output_channels_first() -> None:
    fx = fixture("unet3d")
    x = fx.input(0)
    session = ort.InferenceSession(str(fx.path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    expected = session.run(None, {feed: x})[0][0]
    got = predict(Explainer(fx.path, provider="cpu"), x)
    np.testing.assert_array_equal(got.values, expected)
    assert got.windows == 1


def test_the_grid_covers_every_voxel_and_steps_as_documented() -> None:
    grid = SlidingWindow((16, 16), overlap=0.5).grid((40, 16))
    assert sorted({int(s) for s in grid.starts[:, 0]}) == [0, 8, 16, 24]  # the last ends at 40
    assert set(grid.starts[:, 1]) == {0}  # a patch spanning the axis: one window
    assert grid.coverage().min() > 0
    with pytest.raises(SlidingWindowError, match="2 dims but the input has 3"):
        SlidingWindow((16, 16)).grid((8, 8, 8))
    with pytest.raises(SlidingWindowError, match="windows"):
        SlidingWindow((1, 1, 1), overlap=0.9).grid((1000, 1000, 1000))


def _card(tmp_path: Path, text: str) -> Path:
    card = tmp_path / "model.card.toml"
    card.write_text(text)
    return card


def test_a_cards_inference_section_is_checked(tmp_path: Path) -> None:
    card = ModelCard.load(_card(tmp_path, "[inference]\npatch = [32, 32]\noverlap = 0.25\n"))
    assert card.inference == SlidingWindow((32, 32), overlap=0.25)
    for text, said in [
        ("[inference]\noverlap = 0.5\n", "needs a patch"),
        ("[inference]\npatch = [32, 0]\n", "positive integers"),
        ('[inference]\npatch = [32, 32]\noverlap = "half"\n', "must be a number"),
        ("[inference]\npatch = [32, 32]\noverlap = 1.0\n", "below 1"),
        ('[inference]\npatch = [32, 32]\nblend = "mean"\n', "blend 'mean' is unknown"),
        ("[inference]\npatch = [32, 32]\nstride = 8\n", "stride"),
    ]:
        with pytest.raises(ModelCardError, match=said):
            ModelCard.load(_card(tmp_path, text))


def test_predict_on_the_command_line_writes_the_fused_output(tmp_path: Path) -> None:
    fx = fixture("unet2d_torchscript")
    x = np.random.default_rng(3).standard_normal((50, 37)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    card = _card(tmp_path, "[inference]\npatch = [32, 32]\noverlap = 0.25\nblend = 'constant'\n")
    command = ["predict", str(fx.path), str(tmp_path / "x.npy"), "--provider", "cpu", "--quiet"]
    result = CliRunner().invoke(
        main, [*command, "--out", str(tmp_path / "p.npy"), "--card", str(card), "--json"]
    )
    assert result.exit_code == 0, result.output
    expected = _monai("unet2d_torchscript", x[None], (32, 32), overlap=0.25, mode="constant")
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=0, atol=1e-5)
    assert json.loads(result.stdout)["windows"] == 4
    # --patch and --overlap override the card's; --overlap alone has no window to apply to.
    result = CliRunner().invoke(
        main, [*command, "--out", str(tmp_path / "q.npy"), "--patch", "32x32", "--overlap", "0.5"]
    )
    assert result.exit_code == 0, result.output
    expected = _monai("unet2d_torchscript", x[None], (32, 32), overlap=0.5, mode="gaussian")
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), expected, rtol=0, atol=1e-5)
    result = CliRunner().invoke(
        main, [*command, "--out", str(tmp_path / "r.npy"), "--overlap", "0.5"]
    )
    assert result.exit_code == 2 and "--patch" in result.stderr
    assert not (tmp_path / "r.npy").exists()


def test_explain_with_a_windowed_card_explains_the_fused_prediction(tmp_path: Path) -> None:
    from segattr_onnx.metrics.scoring import score_map
    from segattr_onnx.windowed import explain_windowed

    fx = fixture("unet3d")
    volume = np.random.default_rng(5).standard_normal((24, 28, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", volume)
    card = _card(tmp_path, "[inference]\npatch = [16, 16, 16]\n")
    command = ["explain", str(fx.path), str(tmp_path / "x.npy"), "--card", str(card)]
    options = ["--provider", "cpu", "--quiet", "--layers", "last"]
    result = CliRunner().invoke(main, [*command, "--out", str(tmp_path / "m.npy"), *options])
    assert result.exit_code == 0, result.output
    expected = explain_windowed(
        Explainer(fx.path, provider="cpu"), volume, SlidingWindow((16, 16, 16)), "kwc", "last"
    )
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), expected.map, rtol=0, atol=1e-6)
    # --patch without a card: the same window (the card's other settings are the defaults).
    bare = ["explain", str(fx.path), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy")]
    result = CliRunner().invoke(main, [*bare, *options, "--patch", "16x16x16"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected.map, rtol=0, atol=1e-6)
    # Scores follow the window too; Grad-CAM++ does not yet (the whole input, said).
    scored = [*command, "--out", str(tmp_path / "s.npy"), *options, "--score", "--json"]
    result = CliRunner().invoke(main, scored)
    assert result.exit_code == 0, result.output
    expected_scores = score_map(
        Explainer(fx.path, provider="cpu"), volume, expected.map, window=SlidingWindow((16,) * 3)
    )
    got = json.loads(result.stdout)["scores"]["prediction_preserved"]
    np.testing.assert_allclose(got, expected_scores.prediction_preserved, rtol=1e-6)
    gradcam = [*command, "--out", str(tmp_path / "g.npy"), *options, "--method", "gradcampp"]
    result = CliRunner().invoke(main, gradcam)
    assert "does not follow it yet" in result.stderr
    # A report of the windowed explanation: the model, fixed at its 16³ patch, never runs on
    # the whole volume for the pictures either.
    page = tmp_path / "report.html"
    reported = [*command, "--out", str(tmp_path / "o.npy"), *options, "--report", str(page)]
    result = CliRunner().invoke(main, reported)
    assert result.exit_code == 0, result.output
    assert page.stat().st_size > 0 and "kwc" in page.read_text()


def test_scores_of_a_windowed_case_come_from_fused_re_predictions() -> None:
    from segattr_onnx.metrics.scores import scale_map
    from segattr_onnx.metrics.scoring import score_map

    fx = fixture("unet2d_torchscript")
    x = np.random.default_rng(6).standard_normal((1, 50, 37)).astype(np.float32)
    attribution = np.random.default_rng(7).random((50, 37))
    window = SlidingWindow((32, 32), overlap=0.5)
    scores = score_map(
        Explainer(fx.path, provider="cpu"), x, attribution, target=None, steps=3, window=window
    )

    def probability(values: np.ndarray) -> np.ndarray:
        logits = _monai("unet2d_torchscript", values, (32, 32), overlap=0.5, mode="gaussian")
        exp = np.exp(logits - logits.max(axis=0))
        return (exp[1] / exp.sum(axis=0)).astype(np.float64)

    base = probability(x)
    masked = probability((x * scale_map(attribution, "p2")[None]).astype(np.float32))
    kept = np.minimum(masked, base).sum()
    np.testing.assert_allclose(scores.prediction_preserved, kept / base.sum(), rtol=1e-5)
    np.testing.assert_allclose(
        scores.excess_prediction, (masked.sum() - kept) / base.sum(), rtol=1e-5, atol=1e-7
    )
    assert scores.forward_passes == len(window.grid((50, 37))) * (1 + 1 + 2 * 4)


def test_an_audit_with_a_windowed_card_scores_the_fused_prediction(tmp_path: Path) -> None:
    from segattr_onnx.audit import audit
    from segattr_onnx.metrics.scoring import score_map
    from segattr_onnx.windowed import explain_windowed

    fx = fixture("unet2d_torchscript")
    x = np.random.default_rng(8).standard_normal((48, 40)).astype(np.float32)
    np.save(tmp_path / "case.npy", x)
    _card(tmp_path, "[inference]\npatch = [32, 32]\noverlap = 0.5\n")
    (tmp_path / "audit.toml").write_text(
        f'model = "{fx.path}"\ncard = "model.card.toml"\nmethods = ["kwc"]\nprovider = "cpu"\n'
        'layers = "last"\nchecks = ["prediction_preserved >= 0"]\n[[cases]]\ninput = "case.npy"\n'
    )
    report = audit(tmp_path / "audit.toml")
    window = SlidingWindow((32, 32), overlap=0.5)
    explainer = Explainer(fx.path, provider="cpu")
    expected_map = explain_windowed(explainer, x, window, "kwc", "last").map
    expected = score_map(explainer, x, expected_map, steps=None, window=window)
    (result,) = report.results
    np.testing.assert_allclose(result.value, expected.prediction_preserved, rtol=1e-6)

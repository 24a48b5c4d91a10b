"""Model cards prepare inputs the way the model's makers did, and are read beside the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer, Target
from segattr_onnx.arrays import upsample
from segattr_onnx.bundled import example_model_path
from segattr_onnx.card import ModelCard, ModelCardError
from segattr_onnx.cli import main
from segattr_onnx.synthetic import make_case


def _card(tmp_path: Path, text: str) -> ModelCard:
    path = tmp_path / "m.card.toml"
    path.write_text(text)
    return ModelCard.load(path)


def test_intensity_presets(tmp_path: Path) -> None:
    values = np.array([[-2000.0, -1000.0], [0.0, 2000.0]])
    window = _card(tmp_path, '[input]\nintensity = "ct-window"\nwindow = [-1000, 1000]')
    np.testing.assert_allclose(window.prepare(values), [[0.0, 0.0], [0.5, 1.0]])
    z = _card(tmp_path, '[input]\nintensity = "zscore"').prepare(values)
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, rel=1e-5)
    ramp = np.arange(101, dtype=float)
    clipped = _card(tmp_path, '[input]\nintensity = "percentile"\npercentiles = [10, 90]')
    np.testing.assert_allclose(clipped.prepare(ramp)[[0, 50, 100]], [0.0, 0.5, 1.0])


def test_bad_cards_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="unknown"):
        _card(tmp_path, '[input]\nintensity = "magic"')
    with pytest.raises(ModelCardError, match="positive"):
        _card(tmp_path, "[input]\nresize = [0, 3]")


def test_a_card_beside_the_model_resizes_inputs_and_maps_come_back_at_full_size(
    tmp_path: Path,
) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(example_model_path(), model)
    (tmp_path / "model.card.toml").write_text(
        "[input]\nresize = [64, 64]\n\n[target]\nclass_index = 1\n"
    )
    image = make_case(90_004, dim=2, size=100).image  # 100² does not fit the U-Net's pooling
    np.save(tmp_path / "scan.npy", image)
    out = tmp_path / "map.npy"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(model),
            str(tmp_path / "scan.npy"),
            "--out",
            str(out),
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    written = np.load(out)
    assert written.shape == (100, 100)
    card = ModelCard.beside(model)
    expected = (
        Explainer(model, provider="cpu")
        .explain(card.prepare(image), target=Target(class_index=1))
        .map
    )
    np.testing.assert_allclose(written, np.clip(upsample(expected, (100, 100)), 0, 1), atol=1e-6)


def test_a_broken_card_stops_the_command_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "card.toml").write_text("[input\n")
    np.save(tmp_path / "x.npy", np.zeros((64, 64), np.float32))
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(example_model_path()),
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "m.npy"),
            "--card",
            str(tmp_path / "card.toml"),
        ],
    )
    assert result.exit_code == 2 and "not valid TOML" in result.stderr


def test_channels_last_files_are_moved_channels_first(tmp_path: Path) -> None:
    card = _card(tmp_path, "[input]\nchannels_last = true\n")
    rgb = np.random.default_rng(0).random((4, 5, 3))
    np.testing.assert_allclose(card.prepare(rgb), np.moveaxis(rgb, -1, 0), rtol=1e-6)


def test_a_spacing_card_needs_a_file_that_records_spacing(tmp_path: Path) -> None:
    card = _card(tmp_path, "[input]\nspacing = [1.0, 1.0]\n")
    with pytest.raises(ModelCardError, match="records none"):
        card.prepare(np.zeros((4, 4)))
    assert card.prepare(np.zeros((4, 4)), (0.5, 2.0)).shape == (2, 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[input]\nintensity = "ct-window"\nwindow = [400, -1000]', "increasing"),
        ("[input]\nwindow = 5", "increasing"),
        ("[input]\npercentiles = [0, 200]", "within"),
        ('[input]\nintensty = "zscore"', "unknown key 'intensty'.*did you mean 'intensity'"),
        ('[inptu]\nintensity = "zscore"', "unknown key 'inptu'.*did you mean 'input'"),
        ("[input]\nclass_index = 1", "'class_index' does not belong.*goes in \\[target\\]"),
        ('input = "zscore"', "must be a table"),
    ],
)
def test_card_values_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ModelCardError, match=message):
        _card(tmp_path, text)


def test_a_spacing_with_more_axes_than_the_image_is_refused(tmp_path: Path) -> None:
    card = _card(tmp_path, "[input]\nspacing = [1.0, 1.0, 1.0]\n")
    with pytest.raises(ModelCardError, match="spatial axes"):
        card.prepare(np.zeros((4, 4)), (1.0, 1.0))


def test_scoring_with_labels_follows_a_resizing_card(tmp_path: Path) -> None:
    from segattr_onnx.synthetic import save_case

    save_case(make_case(90_009, dim=2, size=96), tmp_path / "case.npz")
    (tmp_path / "card.toml").write_text("[input]\nresize = [64, 64]\n")
    out = tmp_path / "map.npy"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(example_model_path()),
            str(tmp_path / "case.npz"),
            "--card",
            str(tmp_path / "card.toml"),
            "--method",
            "gradcam",
            "--out",
            str(out),
            "--score",
            "--labels",
            str(tmp_path / "case.npz"),
            "--steps",
            "0",
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (96, 96) and "96x96" in result.stdout

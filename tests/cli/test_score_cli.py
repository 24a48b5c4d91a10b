"""``segattr score`` and ``explain --score``: the issue's JSON keys, the API's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import Explainer
from segattr_onnx.cli import main
from segattr_onnx.metrics import score_map
from tests.conftest import fixture

BASE_KEYS = {"prediction_preserved", "image_preserved", "excess_prediction"}
LABEL_KEYS = {
    "attribution_quality",
    "relative_entropy",
    "relative_foreground_attribution",
    "external_peak_attribution",
}


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    labels = np.zeros((32, 32), np.int64)
    labels[6:20, 6:20] = 3
    labels[20:23, 12:14] = 2
    labels[25:30, 25:30] = 1
    attribution = Explainer(fx.path, provider="cpu").explain(x, "kwc").map
    paths = {"x": tmp_path / "x.npy", "map": tmp_path / "map.npy", "labels": tmp_path / "l.npy"}
    for key, value in (("x", x), ("map", attribution), ("labels", labels)):
        np.save(paths[key], value)
    return paths


def test_score_prints_the_documented_keys_and_the_api_numbers(case) -> None:
    model = str(fixture("unet2d_torchscript").path)
    args = [
        "score",
        model,
        str(case["x"]),
        "--map",
        str(case["map"]),
        "--json",
        "--provider",
        "cpu",
        "--quiet",
        "--steps",
        "5",
    ]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    data = json.loads(plain.stdout)
    assert BASE_KEYS | {"deletion_auc", "insertion_auc"} <= set(data)
    assert not LABEL_KEYS & set(data)
    expected = score_map(model, np.load(case["x"]), np.load(case["map"]), steps=5, provider="cpu")
    assert data["prediction_preserved"] == pytest.approx(expected.prediction_preserved)
    assert data["deletion_auc"] == pytest.approx(expected.deletion_auc)
    labelled = CliRunner().invoke(main, [*args, "--labels", str(case["labels"])])
    assert labelled.exit_code == 0, labelled.output
    assert set(json.loads(labelled.stdout)) >= LABEL_KEYS


def test_explain_can_score_in_the_same_run(case, tmp_path: Path) -> None:
    model = str(fixture("unet2d_torchscript").path)
    out = tmp_path / "kwc.npy"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            model,
            str(case["x"]),
            "--out",
            str(out),
            "--score",
            "--labels",
            str(case["labels"]),
            "--steps",
            "0",
            "--json",
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["scores"]
    assert set(scores) >= BASE_KEYS | LABEL_KEYS and "deletion_auc" not in scores
    expected = score_map(
        model, np.load(case["x"]), np.load(out), np.load(case["labels"]), steps=None, provider="cpu"
    )
    assert scores["attribution_quality"] == pytest.approx(expected.attribution_quality)


def test_a_map_of_the_wrong_size_exits_2(case, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((8, 8)))
    result = CliRunner().invoke(
        main,
        [
            "score",
            str(fixture("unet2d_torchscript").path),
            str(case["x"]),
            "--map",
            str(wrong),
            "--provider",
            "cpu",
        ],
    )
    assert result.exit_code == 2 and "spatial shape" in result.stderr


def test_synth_writes_a_seeded_case_and_keeps_existing_files(tmp_path: Path) -> None:
    from segattr_onnx.synthetic import make_case

    out = tmp_path / "case.npz"
    args = ["synth", "--dim", "2", "--seed", "7", "--size", "64", "--out", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    with np.load(out) as saved:
        expected = make_case(7, dim=2, size=64)
        np.testing.assert_array_equal(saved["image"], expected.image)
        np.testing.assert_array_equal(saved["labels"], expected.labels)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


def test_score_flags_a_constant_map_instead_of_scoring_it(case, tmp_path: Path) -> None:
    blank = tmp_path / "blank.npy"
    np.save(blank, np.zeros((32, 32)))
    args = ["score", str(fixture("unet2d_torchscript").path), str(case["x"]), "--map"]
    args += [str(blank), "--labels", str(case["labels"]), "--provider", "cpu", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "degenerate map (constant): no score" in result.stdout
    assert "warning: the map is constant" in result.stderr
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert data["degenerate"] is True and not (BASE_KEYS | LABEL_KEYS) & set(data)


def test_score_prepares_the_input_with_the_model_card_as_explain_does(tmp_path: Path) -> None:
    fx = fixture("unet2d_torchscript")
    np.save(tmp_path / "x.npy", fx.input(0)[0, 0] * 40 + 100)  # raw intensities, a bare image
    card = tmp_path / "card.toml"
    card.write_text('[input]\nintensity = "zscore"\n')
    common = ["--provider", "cpu", "--quiet", "--json", "--steps", "4"]
    explained = CliRunner().invoke(
        main,
        [
            "explain",
            str(fx.path),
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "map.npy"),
            "--card",
            str(card),
            "--score",
            *common,
        ],
    )
    assert explained.exit_code == 0, explained.output
    args = ["score", str(fx.path), str(tmp_path / "x.npy"), "--map", str(tmp_path / "map.npy")]
    scored = CliRunner().invoke(main, [*args, "--card", str(card), *common])
    assert scored.exit_code == 0, scored.output
    with_card = json.loads(scored.stdout)
    expected = json.loads(explained.stdout)["scores"]
    for timing in ("seconds",):
        with_card.pop(timing), expected.pop(timing)
    assert with_card == pytest.approx(expected, rel=1e-6)
    unprepared = json.loads(CliRunner().invoke(main, [*args, *common]).stdout)
    assert unprepared["prediction_preserved"] != pytest.approx(with_card["prediction_preserved"])

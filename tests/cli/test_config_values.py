"""Values of the wrong type or out of range in a model card or an audit config are refused when
the file is read, as one ``error:`` line and exit 2 (never a traceback, which exits 1: for
``segattr audit`` that reads as "a check failed")."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from segattr_onnx.bundled import example_model_path
from segattr_onnx.card import ModelCard, ModelCardError
from segattr_onnx.cli import main
from segattr_onnx.errors import InputDataError
from segattr_onnx.metrics.scores import relative_foreground_attribution
from tests.cli.test_audit import _config
from tests.conftest import fixture


def _one_error_line(result: Result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _explain_with_card(tmp_path: Path, card_text: str) -> Result:
    card = tmp_path / "card.toml"
    card.write_text(card_text)
    np.save(tmp_path / "x.npy", np.zeros((64, 64), np.float32))
    return CliRunner().invoke(
        main,
        [
            "explain",
            str(example_model_path()),
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "m.npy"),
            "--card",
            str(card),
            "--provider",
            "cpu",
            "--quiet",
        ],
    )


def _audit(tmp_path: Path, top: str = "", tail: str = "", checks=("prediction_preserved >= 0",)):
    """An audit config with ``top`` lines at its top level and ``tail`` after its tables."""
    config = _config(tmp_path, list(checks), methods=("gradcam",))
    config.write_text(f"{top}\n{config.read_text()}\n{tail}\n")
    return CliRunner().invoke(main, ["audit", str(config), "--quiet"])


# --- model cards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('[input]\nchannels_last = "false"', ("channels_last", "'false'", "true or false")),
        ("[input]\nchannels_last = 0", ("channels_last", "true or false")),
        ('[target]\nclass_index = "one"', ("class_index", "'one'", "non-negative integer")),
        ("[target]\nclass_index = -1", ("class_index", "-1", "non-negative integer")),
        ("[target]\nclass_index = true", ("class_index", "True", "non-negative integer")),
        ("[target]\nclass_index = 1.0", ("class_index", "1.0", "non-negative integer")),
        ("[target]\noutput = 3", ("output", "3", "output name")),
        ('[target]\nactivation = "relu"', ("activation", "'relu'", "'sigmoid'")),
        ("[target]\nactivation = 1", ("activation", "1", "'softmax'")),
        ('[target]\nclass_axis = "1"', ("class_axis", "'1'", "integer")),
        ("[target]\nclass_axis = false", ("class_axis", "False", "integer")),
        ("[input]\nresize = [true, true]", ("resize", "positive integers")),
        ("[input]\nwindow = [false, true]", ("window", "increasing numbers")),
        ("[input]\nspacing = [true, 1.0]", ("spacing", "positive numbers")),
    ],
)
def test_card_values_of_the_wrong_type_are_refused(tmp_path: Path, text, fragments) -> None:
    path = tmp_path / "m.card.toml"
    path.write_text(text)
    with pytest.raises(ModelCardError) as caught:
        ModelCard.load(path)
    for fragment in fragments:
        assert fragment in str(caught.value)
    _one_error_line(_explain_with_card(tmp_path, text), *fragments)


def test_card_booleans_and_targets_of_the_right_type_are_taken(tmp_path: Path) -> None:
    path = tmp_path / "m.card.toml"
    path.write_text(
        '[input]\nchannels_last = false\n[target]\nclass_index = 0\noutput = "y"\n'
        'activation = "sigmoid"\nclass_axis = -1\n'
    )
    card = ModelCard.load(path)
    assert card.channels_last is False
    assert card.target == {
        "class_index": 0,
        "output": "y",
        "activation": "sigmoid",
        "class_axis": -1,
    }


def test_a_bad_card_named_by_an_audit_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.card.toml").write_text('[target]\nclass_index = "one"\n')
    _one_error_line(_audit(tmp_path, top='card = "bad.card.toml"'), "class_index", "'one'")


# --- audit configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "fragments"),
    [
        ("steps = 0", None),  # 0: no curves, as on the command line
        ("steps = -1", ("steps", "-1", "0 to 100")),
        ("steps = 101", ("steps", "101", "0 to 100")),
        ("steps = true", ("steps", "True", "0 to 100")),
        ('steps = "5"', ("steps", "'5'", "0 to 100")),
    ],
)
def test_audit_steps_take_the_command_lines_range(tmp_path: Path, top, fragments) -> None:
    result = _audit(tmp_path, top)
    if fragments is None:
        assert result.exit_code == 0, result.output
    else:
        _one_error_line(result, *fragments)


def test_audit_steps_0_with_a_curve_check_is_refused(tmp_path: Path) -> None:
    result = _audit(tmp_path, "steps = 0", checks=("deletion_auc <= 1",))
    _one_error_line(result, "steps = 0", "deletion_auc")


@pytest.mark.parametrize(
    ("tail", "fragments"),
    [
        ("[target]\nregion = 5", ("region", "5", "'largest-component'")),
        ('[target]\nregion = "biggest"', ("region", "'biggest'", "'all'")),
        ('[target]\nclass_index = "one"', ("class_index", "'one'", "non-negative integer")),
        ("[target]\nclass_index = true", ("class_index", "True", "non-negative integer")),
        ("[target]\noutput = 1", ("output", "1", "output name")),
        ('[target]\nactivation = "relu"', ("activation", "'relu'", "'sigmoid'")),
    ],
)
def test_audit_target_values_are_checked_when_the_config_is_read(
    tmp_path: Path, tail, fragments
) -> None:
    _one_error_line(_audit(tmp_path, tail=tail), "audit config", *fragments)


@pytest.mark.parametrize(
    ("top", "fragments"),
    [
        ("layers = 5", ("'layers'", "a string, not 5")),
        ("methods = 5", ("'methods'", "a list, not 5")),
        ("target = 5", ("'target'", "a table, not 5")),
    ],
)
def test_audit_type_messages_name_the_toml_type(tmp_path: Path, top, fragments) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    text = config.read_text()
    for key in ("layers", "methods"):
        if top.startswith(key):
            text = "\n".join(line for line in text.splitlines() if not line.startswith(key))
    config.write_text(f"{top}\n{text}\n")
    line = _one_error_line(CliRunner().invoke(main, ["audit", str(config), "--quiet"]), *fragments)
    assert not re.search(r"\ba (int|str|dict)\b", line)


# --- label maps ----------------------------------------------------------------------------


@pytest.mark.parametrize(("missing", "kept"), [(3, 0), (0, 3)])
def test_rfa_names_what_the_label_map_lacks(missing: int, kept: int) -> None:
    labels = np.full((8, 8), kept)
    labels[0, 0] = 1
    with pytest.raises(InputDataError) as caught:
        relative_foreground_attribution(np.ones((8, 8)), labels)
    message = str(caught.value)
    assert f"no {'target' if missing == 3 else 'background'} ({missing})" in message
    assert "0 background, 1 distractor, 2 discriminating background, 3 target" in message


def test_score_with_labels_lacking_the_target_exits_2(tmp_path: Path) -> None:
    fx = fixture("unet2d_torchscript")
    np.save(tmp_path / "x.npy", fx.input(0))
    np.save(tmp_path / "map.npy", np.random.default_rng(0).random((32, 32)))
    labels = np.zeros((32, 32), np.int64)
    labels[25:30, 25:30] = 1
    np.save(tmp_path / "l.npy", labels)
    result = CliRunner().invoke(
        main,
        [
            "score",
            str(fx.path),
            str(tmp_path / "x.npy"),
            "--map",
            str(tmp_path / "map.npy"),
            "--labels",
            str(tmp_path / "l.npy"),
            "--provider",
            "cpu",
            "--quiet",
            "--steps",
            "0",
        ],
    )
    _one_error_line(result, "no target (3)")


def test_an_audit_whose_labels_lack_the_target_exits_2(tmp_path: Path) -> None:
    config = _config(tmp_path, ["attribution_quality >= -10"], methods=("gradcam",))
    for seed in (90_000, 90_001):
        np.save(tmp_path / "cases" / f"case{seed}_labels.npy", np.zeros((64, 64), np.int64))
    config.write_text(
        config.read_text().replace('labels = "same"', 'labels = "cases/{stem}_labels.npy"')
    )
    result = CliRunner().invoke(main, ["audit", str(config), "--quiet"])
    _one_error_line(result, "no target (3)")

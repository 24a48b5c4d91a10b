"""The bundled example model segments the spiked nodules of held-out synthetic cases."""

from __future__ import annotations

import numpy as np
import onnx

from segattr_onnx import Explainer
from segattr_onnx.bundled import (
    EXAMPLE_3D_HELD_OUT_SEEDS,
    EXAMPLE_3D_SIZE,
    EXAMPLE_HELD_OUT_SEEDS,
    example_3d_model_path,
    example_model_path,
)
from segattr_onnx.synthetic import make_case
from tests.conftest import run_reference


def test_it_is_small_and_ships_with_the_package() -> None:
    path = example_model_path()
    assert path.is_file() and path.stat().st_size < 5_000_000
    assert onnx.load(str(path)).graph.input[0].name == "image"


def test_it_reaches_the_promised_dice_on_held_out_seeds() -> None:
    model = onnx.load(str(example_model_path()))
    scores = []
    for seed in list(EXAMPLE_HELD_OUT_SEEDS)[:10]:
        case = make_case(seed, dim=2, size=128)
        (logits,) = run_reference(model, {"image": case.image[None, None]})
        predicted = logits[0].argmax(0) == 1
        truth = case.labels == 3
        scores.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    assert np.mean(scores) >= 0.8


def test_kwc_on_it_points_at_the_target_more_than_the_background() -> None:
    case = make_case(EXAMPLE_HELD_OUT_SEEDS[0], dim=2, size=128)
    result = Explainer(example_model_path(), provider="cpu").explain(case.image[None], "kwc")
    assert result.map[case.labels == 3].mean() > result.map[case.labels == 0].mean()


def test_the_3d_model_is_small_and_reaches_the_promised_dice_on_held_out_seeds() -> None:
    path = example_3d_model_path()
    assert path.is_file() and path.stat().st_size < 5_000_000
    model = onnx.load(str(path))
    scores = []
    for seed in EXAMPLE_3D_HELD_OUT_SEEDS:
        case = make_case(seed, dim=3, size=EXAMPLE_3D_SIZE)
        (logits,) = run_reference(model, {"image": case.image[None, None]})
        predicted = logits[0].argmax(0) == 1
        truth = case.labels == 3
        scores.append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    assert np.mean(scores) >= 0.8


def test_kwc_on_the_3d_model_points_at_the_target_more_than_the_background() -> None:
    case = make_case(EXAMPLE_3D_HELD_OUT_SEEDS[0], dim=3, size=EXAMPLE_3D_SIZE)
    result = Explainer(example_3d_model_path(), provider="cpu").explain(case.image[None], "kwc")
    assert result.map[case.labels == 3].mean() > result.map[case.labels == 0].mean()

"""Model against model: do two versions of a model explain the same cases the same way?

Teams deploy an optimised model (fp16, int8, a vendor's new export), not the one that was
audited. Whether the optimised one still looks at the same evidence is a question about two
maps of the same case, so each case is explained by both models with the same method, layers,
target and variant, each through its own ``Explainer`` and its own model card, and the maps,
the predicted masks and (optionally) the maps' scores are compared. ``segattr compare`` prints
the figures and gates on checks; an audit's ``[compare]`` section adds them to every case.

Model A is the reference (the audited or previous model), model B the candidate; every score
delta is B − A, so a negative ``prediction_preserved_delta`` means B's map keeps less of B's
prediction than A's map keeps of A's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from segattr_onnx.card import ModelCard, warn_if_windowed_gradients
from segattr_onnx.case_runs import CaseInputs, read_case
from segattr_onnx.errors import SegattrError
from segattr_onnx.explainer import Explainer
from segattr_onnx.explanation import Explanation
from segattr_onnx.metrics.agreement import dice, map_agreement
from segattr_onnx.metrics.scoring import score_map
from segattr_onnx.sliding_window import SlidingWindow
from segattr_onnx.target import Target
from segattr_onnx.windowed import WINDOWED_METHODS, explain_windowed, prepare_windowed

MAP_FIGURES = ("spearman", "top10_iou", "max_abs_diff")
DELTA_SCORES = (
    "prediction_preserved",
    "image_preserved",
    "excess_prediction",
    "deletion_auc",
    "insertion_auc",
)
CURVE_DELTAS = ("deletion_auc_delta", "insertion_auc_delta")
# Every figure a check may name: the map agreement, the masks' Dice, and each score's B − A.
COMPARE_FIGURES = frozenset({*MAP_FIGURES, "dice", *(f"{name}_delta" for name in DELTA_SCORES)})


class CompareError(SegattrError):
    """A comparison that cannot be made: two models whose prepared inputs differ in size, or
    settings that contradict each other (a check on a score delta without scores)."""


def needs_scores(figures: Sequence[str]) -> bool:
    """Whether any of these figure names is a score delta (the maps must then be scored)."""
    return any(name.endswith("_delta") for name in figures)


@dataclass(frozen=True)
class CaseComparison:
    """One case explained by both models with one method."""

    case: str
    method: str
    spearman: float  # rank agreement of the two maps, in [-1, 1]; 1: same order
    top10_iou: float  # overlap of the two maps' most attributed tenth, in [0, 1]
    max_abs_diff: float  # largest voxel difference of the maps (both in [0, 1])
    dice: float  # Dice of the two predicted masks of the target class, in [0, 1]
    scores_a: dict = field(default_factory=dict)  # empty: the maps were not scored
    scores_b: dict = field(default_factory=dict)

    @property
    def deltas(self) -> dict[str, float]:
        """B − A for every score both maps have (a constant map has none)."""
        return {
            f"{name}_delta": float(self.scores_b[name]) - float(self.scores_a[name])
            for name in DELTA_SCORES
            if _is_number(self.scores_a.get(name)) and _is_number(self.scores_b.get(name))
        }

    def figures(self) -> dict[str, float]:
        """Every figure a check can name, flat: what checks read and results store."""
        return {
            "spearman": self.spearman,
            "top10_iou": self.top10_iou,
            "max_abs_diff": self.max_abs_diff,
            "dice": self.dice,
            **self.deltas,
        }

    def to_dict(self) -> dict:
        data: dict = {"case": self.case, "method": self.method, **self.figures()}
        if self.scores_a or self.scores_b:
            data.update(scores_a=self.scores_a, scores_b=self.scores_b)
        return data


@dataclass(frozen=True)
class Comparison:
    """Every case of a comparison of model A (the reference) and model B (the candidate)."""

    model_a: str
    model_b: str
    method: str
    layers: str
    variant: str
    cases: tuple[CaseComparison, ...]

    def to_dict(self) -> dict:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "method": self.method,
            "layers": self.layers,
            "variant": self.variant,
            "cases": [case.to_dict() for case in self.cases],
        }


def compare_models(
    model_a: Explainer | str | os.PathLike[str],
    model_b: Explainer | str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    method: str = "kwc",
    layers: str = "decoder",
    target: Target | None = None,
    variant: str = "p2",
    scores: bool = True,
    steps: int | None = None,
    card_a: ModelCard | None = None,
    card_b: ModelCard | None = None,
    provider: str = "auto",
) -> Comparison:
    """Explain every input file with both models and compare, case by case.

    Each model prepares the file through its card (``card_a``/``card_b``; None: the card
    beside that model, or else the other model's: an fp16 or int8 copy takes the same inputs
    as the model it was made from). ``scores=False`` skips scoring the maps (no deltas);
    ``steps`` adds the deletion/insertion curves to the scores.
    """
    explainer_a = _explainer(model_a, provider)
    explainer_b = _explainer(model_b, provider)
    card_a, card_b = model_cards(explainer_a, explainer_b, card_a, card_b)
    target = target or Target()
    sources = [Path(path) for path in inputs]
    names = [source.stem if source.is_file() else source.name for source in sources]
    if len(set(names)) < len(names):  # a/case.npy and b/case.npy: named by their paths
        names = [str(source) for source in sources]
    cases = []
    for source, name in zip(sources, names, strict=True):
        pair = (explainer_a, card_a, explainer_b, card_b)
        cases += compare_file(
            *pair, source, name, target, [method], layers, variant, scores=scores, steps=steps
        )
    return Comparison(
        _model_name(explainer_a), _model_name(explainer_b), method, layers, variant, tuple(cases)
    )


def compare_file(
    explainer_a: Explainer,
    card_a: ModelCard | None,
    explainer_b: Explainer,
    card_b: ModelCard | None,
    path: Path,
    name: str,
    target: Target,
    methods: Sequence[str],
    layers: str = "decoder",
    variant: str = "p2",
    scores: bool = True,
    steps: int | None = None,
    scores_b: Sequence[dict] | None = None,
) -> list[CaseComparison]:
    """One case file, read for each model through its card as an audit reads it (the memory
    budget, channels, resampling and the card's target), compared for every method."""
    case_a = read_case(explainer_a, name, path, None, None, card_a, target)
    case_b = read_case(explainer_b, name, path, None, None, card_b, target)
    comparisons = []
    for position, method in enumerate(methods):
        known = None if scores_b is None else scores_b[position]
        pair = (explainer_a, case_a, explainer_b, case_b)
        comparisons.append(compare_case(*pair, method, layers, variant, scores, steps, known))
    return comparisons


def model_cards(
    explainer_a: Explainer,
    explainer_b: Explainer,
    card_a: ModelCard | None = None,
    card_b: ModelCard | None = None,
) -> tuple[ModelCard | None, ModelCard | None]:
    """Each model's card: the one given, else the one beside it, else the other model's."""
    card_a = card_a or _beside(explainer_a)
    card_b = card_b or _beside(explainer_b)
    return card_a or card_b, card_b or card_a


def compare_case(
    explainer_a: Explainer,
    case_a: CaseInputs,
    explainer_b: Explainer,
    case_b: CaseInputs,
    method: str,
    layers: str = "decoder",
    variant: str = "p2",
    scores: bool = True,
    steps: int | None = None,
    scores_b: dict | None = None,
) -> CaseComparison:
    """One case (as each model's card prepared it) explained by both models and compared.

    ``scores_b`` are B's scores when already computed (an audit scored its model's map with
    the same settings): only A's map is scored then.
    """
    explanation_a, window_a = explain_case(explainer_a, case_a, method, layers, variant)
    explanation_b, window_b = explain_case(explainer_b, case_b, method, layers, variant)
    map_a, map_b = explanation_a.map, explanation_b.map
    if map_a.shape != map_b.shape:
        raise CompareError(
            f"case {case_a.name}: model A explains it at {_size(map_a.shape)} but model B at "
            f"{_size(map_b.shape)}; compare models that take the same input size, prepared by "
            "the same model card"
        )
    mask_a = predicted_mask(explainer_a, case_a, explanation_a, window_a, variant)
    mask_b = predicted_mask(explainer_b, case_b, explanation_b, window_b, variant)
    if mask_a.shape != mask_b.shape:
        raise CompareError(
            f"case {case_a.name}: model A predicts a {_size(mask_a.shape)} mask but model B a "
            f"{_size(mask_b.shape)} one; the Dice of the predictions needs the same output "
            "size; compare models whose outputs have the same size"
        )
    figures = map_agreement(map_a, map_b)
    scored_a: dict = {}
    scored_b: dict = {}
    if scores:
        scored_a = _scores(explainer_a, case_a, map_a, variant, steps, window_a)
        scored_b = (
            dict(scores_b)
            if scores_b is not None
            else _scores(explainer_b, case_b, map_b, variant, steps, window_b)
        )
    return CaseComparison(
        case=case_a.name,
        method=explanation_a.method,
        spearman=figures["spearman"],
        top10_iou=figures["top10_iou"],
        max_abs_diff=figures["max_abs_diff"],
        dice=dice(mask_a, mask_b),
        scores_a=scored_a,
        scores_b=scored_b,
    )


def explain_case(
    explainer: Explainer, case: CaseInputs, method: str, layers: str, variant: str
) -> tuple[Explanation, SlidingWindow | None]:
    """The case explained as an audit explains it: through the card's sliding window when
    the method runs windowed, else whole; with the window actually used (None: whole)."""
    window = case.window
    if window is not None and method in WINDOWED_METHODS:
        explanation = explain_windowed(
            explainer, case.x, window, method, layers, case.target, variant
        )
        return explanation, window
    if window is not None:
        warn_if_windowed_gradients(window)
    return explainer.explain(case.x, method, layers, case.target, variant), None


def predicted_mask(
    explainer: Explainer,
    case: CaseInputs,
    explanation: Explanation,
    window: SlidingWindow | None,
    variant: str = "p2",
) -> np.ndarray:
    """The model's predicted mask of the explained class and output (whole, or fused over the
    window as explained), by the target's own rule (``ResolvedTarget.mask_of_class``)."""
    target = replace(case.target, output=explanation.target["output"])
    if window is not None:
        prepared = prepare_windowed(explainer, case.x, window, None, target, variant)
        resolved = prepared.case.target
        fused = prepared.output[None]  # (1, C, *S): back to the output's own layout
        if resolved.channel_axis is None:
            output = fused[:, 0]
        else:
            output = np.moveaxis(fused, 1, resolved.channel_axis)
    else:
        whole = explainer.case(case.x, target, None, variant)
        resolved = whole.case.target
        output = whole.observation.outputs[resolved.output]
    return resolved.mask_of_class(output)


def _scores(
    explainer: Explainer,
    case: CaseInputs,
    attribution: np.ndarray,
    variant: str,
    steps: int | None,
    window: SlidingWindow | None,
) -> dict:
    """The map scored on its own model, as an audit scores it (no labels: the deltas are of
    the scores every case has)."""
    return score_map(
        explainer, case.x, attribution, None, case.target, variant, steps=steps, window=window
    ).to_dict()


def _explainer(model: Explainer | str | os.PathLike[str], provider: str) -> Explainer:
    return model if isinstance(model, Explainer) else Explainer(model, provider=provider)


def _beside(explainer: Explainer) -> ModelCard | None:
    path = explainer.model.path
    return ModelCard.beside(path) if path is not None else None


def _model_name(explainer: Explainer) -> str:
    path = explainer.model.path
    return str(path) if path is not None else "(in memory)"


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

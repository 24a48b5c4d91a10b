"""One audit case run, split where the work is: read on the driver, scored on any worker.

An audit of thousands of cases runs its case × method runs on an executor's workers
(``runtime.backends``). Workers need not see the audit's files: the driver reads each case
(image, model card, labels, ROI) into a ``CaseRun`` of plain arrays, and ``score_case_run``
explains and scores it with whichever explainer the worker holds. The same two steps run in
this process for a local audit, so a cluster's results are the local ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segattr_onnx.arrays import resize_nearest
from segattr_onnx.card import ModelCard, card_for, warn_if_windowed_gradients
from segattr_onnx.errors import SegattrError
from segattr_onnx.explainer import Explainer
from segattr_onnx.files import input_budget, load_array, read_image
from segattr_onnx.metrics.scoring import score_map
from segattr_onnx.sliding_window import SlidingWindow
from segattr_onnx.target import Target
from segattr_onnx.windowed import WINDOWED_METHODS, explain_windowed


class CaseRunError(SegattrError):
    """A case whose files do not fit together (an ROI of another shape than the map)."""


@dataclass(frozen=True)
class CaseInputs:
    """One case as the model takes it, with what its scores need, read once per case."""

    name: str
    x: np.ndarray = field(repr=False)
    target: Target
    labels: np.ndarray | None = field(default=None, repr=False)
    roi: np.ndarray | None = field(default=None, repr=False)
    roi_name: str | None = None
    roi_resizes: bool = False  # a card resampled the image: the ROI follows it onto the map
    window: SlidingWindow | None = None  # the card's [inference]: the model runs patch by patch


@dataclass(frozen=True)
class CaseRun:
    """One case's runs, one per method, as data a worker can take.

    The methods of a case travel together so that one worker explains them in turn, as a
    local audit does: a later method reuses the rows an earlier one computed (Ablation-CAM
    takes KWC's dependent runs), and the case crosses the network once.
    """

    case: CaseInputs
    methods: tuple[str, ...]
    layers: str
    variant: str
    steps: int | None


def read_case(
    explainer: Explainer,
    name: str,
    image_path: Path,
    labels_path: Path | None,
    roi_path: Path | None,
    card: ModelCard | None,
    target: Target,
) -> CaseInputs:
    """The case's files, prepared as the model card says; a case larger than the explainer's
    memory budget is refused here, before anything is sent anywhere."""
    with input_budget(explainer.memory_budget):
        image = read_image(image_path, preferred="image")
    x = image.array
    labels = None
    if labels_path is not None:
        labels = load_array(
            labels_path, key_option="a .npy holding only the labels", preferred="labels"
        )
    chosen = card_for(image, card)
    resamples = chosen is not None and chosen.resamples
    if chosen is not None:
        x = chosen.prepare_image(image)
        target = chosen.apply_target(target)
        if labels is not None and resamples:
            spatial = x.shape[1:] if chosen.channel_axis(image) is not None else x.shape
            labels = resize_nearest(np.asarray(labels), spatial)
        if chosen.channel_axis(image) is not None:
            x = explainer.place_channels(x)  # (C, *spatial) → where the model takes channels
    roi = None
    if roi_path is not None:
        roi = np.asarray(load_array(roi_path, key_option="a .npy holding only the ROI mask"))
    return CaseInputs(
        name=name,
        x=np.asarray(x),
        target=target,
        labels=None if labels is None else np.asarray(labels),
        roi=roi,
        roi_name=roi_path.name if roi_path is not None else None,
        roi_resizes=resamples,
        window=chosen.inference if chosen is not None else None,
    )


def score_case_run(explainer: Explainer, run: CaseRun) -> list[dict]:
    """The scores of each of the run's methods, in order."""
    return [_scores(explainer, run, method) for method in run.methods]


def _scores(explainer: Explainer, run: CaseRun, method: str) -> dict:
    """Explain the case with ``method`` and score the map: the audit's scores, plus the map's
    mass inside the target class (labels) and inside the ROI, when given."""
    case = run.case
    window = case.window
    if window is not None and method in WINDOWED_METHODS:
        explanation = explain_windowed(
            explainer, case.x, window, method, run.layers, case.target, run.variant
        )
    else:
        if window is not None:
            warn_if_windowed_gradients(window)
        window = None  # a method the window does not serve yet runs, and is scored, whole
        explanation = explainer.explain(case.x, method, run.layers, case.target, run.variant)
    scores = score_map(
        explainer,
        case.x,
        explanation.map,
        case.labels,
        case.target,
        run.variant,
        steps=run.steps,
        window=window,
    ).to_dict()
    if scores.get("degenerate"):
        return scores  # a constant map has no score: every check on it fails, saying why
    mass = float(np.sum(explanation.map))
    if case.labels is not None:
        inside = float(np.sum(explanation.map[case.labels == 3]))
        scores["target_mass_fraction"] = inside / mass if mass > 0 else 0.0
    if case.roi is not None:
        roi = case.roi
        if case.roi_resizes and roi.shape != explanation.map.shape:
            roi = resize_nearest(roi, explanation.map.shape)  # onto the resized input
        if roi.shape != explanation.map.shape:
            raise CaseRunError(
                f"ROI mask {case.roi_name} has shape {roi.shape}, not the map's "
                f"{explanation.map.shape}"
            )
        inside = float(np.sum(explanation.map[roi.astype(bool)]))
        scores["roi_mass_fraction"] = inside / mass if mass > 0 else 0.0
    return scores

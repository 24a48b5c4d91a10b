"""Model parameter randomisation checks (Adebayo et al., "Sanity checks for saliency maps",
NeurIPS 2018): does a method's map change when the model it explains is destroyed?

A map that stays the same when the weights behind the prediction are replaced by noise is
explaining the input (its edges, its bright spots), not the model. The cascade here destroys
the model from the head towards the input: step 1 randomises the last kernel layer on the path
to the explained output, step 2 the last two, and so on. After each step the case is explained
again with the same method, layers, target and variant, and the new map is compared with the
original one by Spearman rank correlation and SSIM (``metrics.agreement``). A method that
explains the model decorrelates as the cascade goes on; the final Spearman is the figure a
gate (``segattr sanity --check``, an audit's ``sanity_spearman``) judges.

The randomisation rewrites a copy of the model's proto: the user's file and ``LoadedModel`` are
never touched, and weights stored as external data stay on disk except those replaced, which
the copy holds inline. docs/sanity.md says what is randomised, and why that way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from segattr_onnx.errors import (
    InputDataError,
    MethodError,
    ModelRunError,
    NumericalError,
    SegattrError,
)
from segattr_onnx.explainer import Explainer
from segattr_onnx.explanation import Explanation
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.grouping import OFF_PATH
from segattr_onnx.graph.loading import LoadedModel
from segattr_onnx.graph.randomise import layer_parameters, randomise_layers
from segattr_onnx.methods.base import AttributionMethod
from segattr_onnx.methods.registry import create_method
from segattr_onnx.metrics.agreement import SSIM_WINDOW, spearman, ssim
from segattr_onnx.progress import make_progress
from segattr_onnx.target import Region, Target

SANITY_SCORES = ("sanity_spearman",)
"""The audit checks this module computes (``checks = ["sanity_spearman <= 0.5"]``)."""


class SanityError(SegattrError):
    """A sanity check that cannot be run or judged on this model or case."""


def cascade_layers(analysis: ModelAnalysis, output: str) -> tuple[KernelLayer, ...]:
    """The kernel layers the cascade randomises, in its order: from the last one in graph
    order towards the input, leaving out those that do not feed ``output`` (a side head's
    randomisation would change nothing the map explains)."""
    grouping = analysis.groupings.get(output)
    groups = grouping.groups if grouping is not None else {}
    feeding = [layer for layer in analysis.layers if groups.get(layer.name, OFF_PATH) != OFF_PATH]
    return tuple(reversed(feeding))


# --------------------------------------------------------------------------- the cascade


@dataclass(frozen=True)
class SanityStep:
    """One step of the cascade: the map of the model with its last ``randomised`` kernel
    layers randomised, compared with the original map."""

    step: int
    randomised: int  # how many kernel layers are randomised, from the head
    layer: str  # the layer this step added to the randomised ones
    spearman: float | None
    ssim: float | None  # None: the map is smaller than SSIM's window, or the step broke
    base_score: float | None  # the randomised model's target score
    error: str | None = None  # why the step has no map (the randomised model broke)

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "randomised": self.randomised,
            "layer": self.layer,
            "spearman": self.spearman,
            "ssim": self.ssim,
            "base_score": self.base_score,
            "error": self.error,
        }


@dataclass(frozen=True)
class SanityResult:
    """The whole cascade for one case and method, and the original map it was judged by."""

    method: str
    variant: str
    layers: tuple[str, ...]  # the layers the method explains through
    target: dict
    seed: int
    cascade: tuple[str, ...]  # every kernel layer in the order the cascade randomises them
    steps: tuple[SanityStep, ...]
    base_score: float
    original_map: np.ndarray = field(repr=False)
    maps: tuple[np.ndarray | None, ...] = field(default=(), repr=False)  # one per step

    @property
    def final(self) -> SanityStep:
        return self.steps[-1]

    @property
    def final_spearman(self) -> float | None:
        """The figure a gate judges: the Spearman of the last step (None when it broke)."""
        return self.final.spearman

    def to_dict(self) -> dict:
        """The JSON shape of ``segattr sanity --json`` and of an audit's ``sanity`` record."""
        return {
            "method": self.method,
            "variant": self.variant,
            "layers": list(self.layers),
            "target": self.target,
            "seed": self.seed,
            "base_score": self.base_score,
            "cascade": list(self.cascade),
            "steps": [step.to_dict() for step in self.steps],
            "final_spearman": self.final_spearman,
        }


def sanity_check(
    model: Explainer | LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    x: np.ndarray,
    method: str | AttributionMethod = "kwc",
    layers: str | Sequence[str] | None = "decoder",
    target: Target | None = None,
    variant: str = "p2",
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | object = False,
    **method_options,
) -> SanityResult:
    """Explain ``x``, then again after each step of the cascade, and compare the maps.

    ``steps`` stops the cascade after that many layers (None: every kernel layer that feeds
    the explained output, one per step). ``seed`` seeds the new weights. A target region that
    depends on the prediction ('largest-component') is frozen as the original prediction's
    mask, so every step scores the same voxels. A step whose randomised model predicts nothing
    there (or nothing finite) has no map: it is kept with its ``error`` and the cascade goes on.
    """
    explainer = model if isinstance(model, Explainer) else Explainer(model)
    if isinstance(method, str):
        method = create_method(method, **method_options)
    elif method_options:
        raise MethodError("options are given to the method instance, not to sanity_check()")
    if steps is not None and (isinstance(steps, bool) or steps < 1):
        raise SanityError(f"steps must be a whole number ≥ 1, not {steps!r}")
    layers = layers if layers is not None else "decoder"
    prepared = explainer.case(x, target, layers, variant)
    resolved = prepared.case.target
    order = cascade_layers(prepared.case.analysis, resolved.output)
    count = len(order) if steps is None else steps
    if count > len(order):
        raise SanityError(
            f"{count} steps are more than the {len(order)} kernel layers that feed output "
            f"{resolved.output!r}, one per step; give at most {len(order)}"
        )
    for layer in order[:count]:  # refuse what cannot be randomised before any work
        layer_parameters(explainer.model, layer)
    frozen = _frozen_target(target or Target(), resolved.output, resolved.class_index,
                            prepared.case.region, resolved.region)  # fmt: skip
    original = explainer.explain(x, method, layers, frozen, variant)
    if float(original.map.min()) == float(original.map.max()):
        raise SanityError(
            f"the {method.name} map of the original model is constant: it attributes nothing, "
            "so there is nothing a randomised model's map could differ from; check another "
            "class, region or layers"
        )
    chosen = tuple(original.layer_names)  # the very layers, whatever the groups of a copy
    bar = make_progress(progress, count + 1, f"sanity: {method.name}, {count} steps")
    records: list[SanityStep] = []
    maps: list[np.ndarray | None] = []
    try:
        bar.update(1)
        for number in range(1, count + 1):
            copy = randomise_layers(explainer.model, order[:number], seed)
            step, step_map = _step(explainer, copy, x, method, chosen, frozen, variant, original,
                                   number, order[number - 1].name)  # fmt: skip
            records.append(step)
            maps.append(step_map)
            bar.update(1)
    finally:
        bar.close()
    return SanityResult(
        method=method.name,
        variant=variant,
        layers=chosen,
        target=original.target,
        seed=seed,
        cascade=tuple(layer.name for layer in order),
        steps=tuple(records),
        base_score=original.base_score,
        original_map=original.map,
        maps=tuple(maps),
    )


def _frozen_target(
    target: Target,
    output: str,
    class_index: int,
    region_mask: np.ndarray | None,
    region: Region,
) -> Target:
    """The original case's target, fixed: its output and class, and a region that depends on
    the prediction replaced by the original prediction's mask (a randomised model's largest
    component would be somewhere else, and its score not comparable)."""
    frozen = replace(target, output=output, class_index=class_index)
    if region.kind == "largest-component" and region_mask is not None:
        mask = Region.from_mask(region_mask, f"{region.description} of the original model")
        frozen = replace(frozen, region=mask)
    return frozen


def _step(
    explainer: Explainer,
    copy: LoadedModel,
    x: np.ndarray,
    method: AttributionMethod,
    layers: tuple[str, ...],
    target: Target,
    variant: str,
    original: Explanation,
    number: int,
    layer: str,
) -> tuple[SanityStep, np.ndarray | None]:
    """Explain the case on one randomised copy, with the original explainer's settings."""
    randomised = Explainer(
        copy,
        provider=explainer.provider,
        memory_budget=explainer.memory_budget,
        seed=explainer.seed,
        optimization=explainer.optimization,
        reduce_in_graph=explainer.reduce_in_graph,
        executor=explainer.executor,
        intra_op_threads=explainer.intra_op_threads,
    )
    try:
        with warnings.catch_warnings():  # the original explanation already said them
            warnings.simplefilter("ignore")
            explanation = randomised.explain(x, method, list(layers) or None, target, variant)
    except (InputDataError, NumericalError, ModelRunError) as exc:
        reason = f"with its last {number} kernel layer(s) randomised, the model fails: {exc}"
        return SanityStep(number, number, layer, None, None, None, reason), None
    figures = agreement(original.map, explanation.map)
    step = SanityStep(number, number, layer, *figures, explanation.base_score)
    return step, explanation.map


def agreement(original: np.ndarray, other: np.ndarray) -> tuple[float, float | None]:
    """Spearman and SSIM of a step's map with the original (maps in [0, 1]); SSIM is None
    for a map with an axis shorter than its window."""
    rank = spearman(original, other)
    if min(np.shape(original)) < SSIM_WINDOW:
        return rank, None
    return rank, ssim(original, other, data_range=1.0)

"""Input-gradient methods: Integrated Gradients, SmoothGrad, Gradient×Input (docs/algorithms.md §7).

They attribute T = Σ_R P to the input's own voxels rather than to a layer's kernels, from
∂T/∂x, which the backward graph carries back to the model's input
(``graph/gradient_model.build_input_gradient_model``). Each is the same two steps: take the
gradient at some inputs (``gradient_inputs``: points on a path, noisy copies, x itself), and
reduce their mean to signed per-voxel attributions (``attributions``). The engine runs the
rows batched and keeps only their mean, so a method never sees the gradients one by one.

They have no layers: the explanation's map is the positive part of the attributions summed
over the input's channels, divided by its largest value (``attribution_map``) — positive
evidence for the mask, as the CAMs' ReLU keeps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from segattr_onnx.errors import MethodError
from segattr_onnx.methods.base import AttributionMethod, Case
from segattr_onnx.methods.registry import register_method
from segattr_onnx.runtime.input_gradients import GradientInputs
from segattr_onnx.text import setting

BASELINES = ("zero", "minimum")
# Σ attributions may miss T(x) − T(x′) by this fraction before Integrated Gradients warns: the
# midpoint rule is well within it on smooth paths at the default 64 steps (0.03–0.8 % on the
# test fixtures), and far outside it where the path is too rough for the steps, or T jumps.
COMPLETENESS_TOLERANCE = 0.05


class CompletenessWarning(UserWarning):
    """Integrated Gradients' attributions do not add up to T(x) − T(x′)."""


class InputGradientMethod(AttributionMethod):
    """Base class: attributions from the mean of ∂T/∂x over the rows a method chooses.

    A subclass overrides ``gradient_inputs`` (where the gradient is taken) and, when it is
    not the plain mean gradient, ``attributions`` (how the mean becomes attributions). It asks
    the engine for no layer requests; ``Explainer.explain`` runs it on the input instead.
    """

    def gradient_inputs(self, case: Case, seed: int) -> GradientInputs:
        """The inputs at which to take ∂T/∂x, in the model's layout and dtype; ``seed`` is the
        Explainer's, for methods that draw at random."""
        raise NotImplementedError

    def attributions(self, case: Case, mean_gradient: np.ndarray) -> np.ndarray:
        """Signed attributions in the model's layout (batch axis of 1), from the mean of ∂T/∂x
        over the rows (same layout, float64). The plain mean by default."""
        return mean_gradient

    def reference_input(self, case: Case) -> np.ndarray | None:
        """An input x′ whose score the attributions should fall short of T(x) by, summed
        (Integrated Gradients' completeness), checked with one more forward pass; None for
        methods that promise no such sum."""
        return None


def _integer(value: object, option: str, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise MethodError(
            f"{method}'s {option} must be a whole number of at least 1, not {value!r}"
        )
    return int(value)


@dataclass(frozen=True)
class PathInputs:
    """x′ + α_k (x − x′) for rows k: Integrated Gradients' points on the straight path, built
    in float64 and cast to the input's dtype (plain data, so a request can be pickled)."""

    x: np.ndarray = field(repr=False)  # (1, ...) in the model's layout
    baseline: np.ndarray = field(repr=False)  # same shape, float64
    alphas: np.ndarray

    def __call__(self, start: int, stop: int) -> np.ndarray:
        alphas = self.alphas[start:stop].reshape(-1, *([1] * (self.x.ndim - 1)))
        difference = self.x.astype(np.float64) - self.baseline
        return (self.baseline + alphas * difference).astype(self.x.dtype)


@register_method
class IntegratedGradients(InputGradientMethod):
    name = "integrated_gradients"
    description = "Integrated Gradients: (x − x′) ⊙ the mean ∂T/∂x along the path from x′ to x"

    def __init__(self, steps: int = 64, baseline: str = "zero") -> None:
        self.steps = _integer(steps, "steps", self.name)
        if baseline not in BASELINES:
            raise MethodError(
                f"{self.name}'s baseline {baseline!r} is unknown; use one of {', '.join(BASELINES)}"
            )
        self.baseline = baseline

    def alphas(self) -> np.ndarray:
        """The midpoint rule's nodes on [0, 1]: α_k = (k + ½)/m, k = 0 … m − 1."""
        return (np.arange(self.steps, dtype=np.float64) + 0.5) / self.steps

    def baseline_input(self, x: np.ndarray) -> np.ndarray:
        """x′ in float64: zeros, or the image's smallest value everywhere."""
        fill = 0.0 if self.baseline == "zero" else float(np.min(x))
        return np.full(x.shape, fill, dtype=np.float64)

    def gradient_inputs(self, case: Case, seed: int) -> GradientInputs:
        path = PathInputs(case.x, self.baseline_input(case.x), self.alphas())
        return GradientInputs(self.steps, path)

    def attributions(self, case: Case, mean_gradient: np.ndarray) -> np.ndarray:
        return (case.x.astype(np.float64) - self.baseline_input(case.x)) * mean_gradient

    def reference_input(self, case: Case) -> np.ndarray:
        return self.baseline_input(case.x).astype(case.x.dtype)


def warn_if_incomplete(method: str, total: float, expected: float) -> None:
    """Warn when Σ attributions misses T(x) − T(x′) by more than ``COMPLETENESS_TOLERANCE``:
    the map then leaves out (or invents) part of the score. Too few steps for a rough path,
    or a model whose T jumps near the baseline (instance normalisation after the first
    convolution is nearly blind to a constant image's scale, so T moves abruptly between a
    zero baseline and the first step) are the usual causes."""
    gap = abs(total - expected)
    if gap <= COMPLETENESS_TOLERANCE * abs(expected):
        return
    share = f"{gap / abs(expected):.0%} of it" if expected else "while it is 0"
    warnings.warn(
        f"{method}: the attributions sum to {total:.4g} but T(x) − T(baseline) is "
        f"{expected:.4g} (off by {share}); the path integral is not resolved — give more "
        f"steps ({setting('--ig-steps', 'steps=')}) or the other baseline "
        f"({setting('--ig-baseline', 'baseline=')})",
        CompletenessWarning,
        stacklevel=4,
    )


def smoothgrad_noise(shape: tuple[int, ...], sigma: float, seed: int, index: int) -> np.ndarray:
    """Row ``index``'s noise: σ · z, z standard normal from ``default_rng([seed, index])``
    in float64. Each row has its own stream, so the draws do not depend on the batch size."""
    return sigma * np.random.default_rng([seed, index]).standard_normal(shape)


@dataclass(frozen=True)
class NoisyInputs:
    """x + σ z_i for rows i: SmoothGrad's noisy copies, in the input's dtype."""

    x: np.ndarray = field(repr=False)
    sigma: float
    seed: int

    def __call__(self, start: int, stop: int) -> np.ndarray:
        base = self.x.astype(np.float64)[0]
        rows = [
            base + smoothgrad_noise(base.shape, self.sigma, self.seed, i)
            for i in range(start, stop)
        ]
        return np.stack(rows).astype(self.x.dtype)


@register_method
class SmoothGrad(InputGradientMethod):
    name = "smoothgrad"
    description = "SmoothGrad: the mean ∂T/∂x over noisy copies of the input"

    def __init__(self, samples: int = 25, noise: float = 0.15) -> None:
        self.samples = _integer(samples, "samples", self.name)
        if (
            isinstance(noise, bool)
            or not isinstance(noise, Real)
            or not math.isfinite(noise)
            or noise < 0
        ):
            raise MethodError(
                f"{self.name}'s noise is a fraction of the input's value range (0.15 by "
                f"default) and must be a finite number ≥ 0, not {noise!r}"
            )
        self.noise = float(noise)

    def sigma(self, x: np.ndarray) -> float:
        """The noise's standard deviation: ``noise`` × (max x − min x)."""
        values = np.asarray(x, dtype=np.float64)
        return self.noise * float(values.max() - values.min()) if values.size else 0.0

    def gradient_inputs(self, case: Case, seed: int) -> GradientInputs:
        return GradientInputs(self.samples, NoisyInputs(case.x, self.sigma(case.x), seed))


@dataclass(frozen=True)
class _OnlyInput:
    x: np.ndarray = field(repr=False)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return np.repeat(self.x, stop - start, axis=0)


@register_method
class GradientInput(InputGradientMethod):
    name = "gradient_input"
    description = "Gradient×Input: x ⊙ ∂T/∂x"

    def gradient_inputs(self, case: Case, seed: int) -> GradientInputs:
        return GradientInputs(1, _OnlyInput(case.x))

    def attributions(self, case: Case, mean_gradient: np.ndarray) -> np.ndarray:
        return case.x.astype(np.float64) * mean_gradient


def channel_first_input(x_layout: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """Values in the input's layout with a batch axis of 1 as (C_in, *S) float32; an input
    without a channel axis gets one of size 1."""
    values = np.asarray(x_layout)
    if channel_axis is None:
        return values.astype(np.float32)  # (1, *S): the batch axis becomes the channel
    return np.moveaxis(values, channel_axis, 1)[0].astype(np.float32)


def attribution_map(attributions: np.ndarray) -> np.ndarray:
    """ReLU(Σ_c a_c) / max, float32 in [0, 1] over the spatial shape; 0 everywhere when no
    voxel's attribution is positive."""
    total = np.asarray(attributions, dtype=np.float64).sum(axis=0)
    positive = np.maximum(total, 0.0)
    largest = float(positive.max()) if positive.size else 0.0
    if largest > 0:
        positive = positive / largest
    return positive.astype(np.float32)

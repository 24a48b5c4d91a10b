"""On a GPU: every method and every score equals the CPU's, within float32 rounding.

Each test explains the same case of a 2D and a 3D U-Net on both providers in one process. The
limits come from measuring, on the CPU, how far each quantity moves when every weight of the
fixture is perturbed by k float32 ulps (relative k·2^-23): a stand-in for a device that rounds
and sums in another order, which costs a few ulps per operation. Each limit sits above the
100-ulp spread and, where the quantity is sensitive to it at all, below what TF32 does (emulated
as 2^-11 = 4096 ulps on the weights only, so real TF32, which also rounds activations, does more).
Maxima over both fixtures and all methods it applies to:

=================================  ========  ========  ==========  =======
quantity                           10 ulps   100 ulps  TF32        limit
=================================  ========  ========  ==========  =======
P (probabilities, max abs)         6.6e-6    5.9e-5    —           2e-4
S0 (relative)                      1.9e-7    2.1e-6    —           2e-5
final map (max abs)                1.9e-5    8.4e-5    ≥ 6.5e-4    2e-4
kernel weights (rel. to max)       3.0e-5    8.0e-5    ≥ 7.7e-4    5e-4
activations A (rel. to max)        4.7e-6    4.0e-5    ≥ 1.3e-3    2e-4
gradients ∂T/∂A (rel. to max)      2.6e-5    3.7e-4    ≥ 0.24      2e-3
scores PP, EP, AUCs (abs)          —         1.6e-6    ≤ 3.4e-5    1e-5
Grad-CAM++ map (max abs)           4.4e-3    5.0e-2    ≥ 0.23      0.1
=================================  ========  ========  ==========  =======

The scores barely feel TF32 (3.4e-5 at most); their limit guards against gross errors.

Two quantities are ill-conditioned by construction, so they are checked through what they are
made of instead:

- Grad-CAM++'s α = g²/(2g² + Σ_u A_u g³ + ε) has poles where the denominator crosses 0: a
  1-ulp perturbation moves its weights by up to 7e-3 relative and 100 ulps by up to 100%. Its
  inputs A and g are held to the limits above, its map to 0.1; its weights are not compared.
- Grad-CAM on the 3D U-Net: every layer is followed by InstanceNorm, whose output does not
  change when a channel is shifted by a constant, so the spatial mean of ∂T/∂A (the Grad-CAM
  weight) is exactly 0 and what float32 returns is rounding noise (max |w| = 4e-8·max |g|; one
  ulp moves the map by 0.8). There the weights must be noise-sized on both devices and the
  gradients equal; the noise map is not compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import pytest

from segattr_onnx import Explainer, KernelLayer
from segattr_onnx.methods.base import AttributionMethod, Case, KernelWeights
from segattr_onnx.methods.gradcam import GradCAM, GradCAMPlusPlus
from segattr_onnx.metrics import score_map
from tests.conftest import assert_close, fixture

pytestmark = pytest.mark.gpu

FIXTURES = ["unet2d_torchscript", "unet3d"]
CASES = [
    ("kwc", "p2"),
    ("kwc", "p1"),
    ("scorecam", "p2"),
    ("ablationcam", "p2"),
    ("gradcam", "p2"),
    ("gradcampp", "p2"),
]
PREDICTION_ATOL = 2e-4
SCORE_RTOL = 2e-5
MAP_ATOL = 2e-4
WEIGHTS_RTOL = 5e-4
ACTIVATION_RTOL = 2e-4
GRADIENT_RTOL = 2e-3
METRIC_ATOL = 1e-5
GRADCAMPP_MAP_ATOL = 0.1
# (fixture, method) whose weights are 0 in exact arithmetic: see the module docstring.
CANCELLING = {("unet3d", "gradcam")}
NOISE_WEIGHT = 1e-6  # of max |∂T/∂A|; measured 4e-8


class _KeepsGradients:
    """Adds the tensors a gradient method's weights are made of to its terms, for comparison."""

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        weights = super().kernel_weights(case, layer, results)
        terms = {
            **weights.terms,
            "gradient": np.asarray(results[0], dtype=np.float64),
            "activation": np.asarray(case.activations[layer.name], dtype=np.float64),
        }
        return KernelWeights(weights.weights, terms)


class _GradCAM(_KeepsGradients, GradCAM):
    pass


class _GradCAMPlusPlus(_KeepsGradients, GradCAMPlusPlus):
    pass


def _method(name: str) -> str | AttributionMethod:
    """The method by name, or an unregistered copy that keeps A and ∂T/∂A in its terms."""
    probes = {"gradcam": _GradCAM, "gradcampp": _GradCAMPlusPlus}
    return probes[name]() if name in probes else name


@cache
def _explainer(name: str, provider: str) -> Explainer:
    return Explainer(fixture(name).path, provider=provider)


@pytest.mark.parametrize(("method", "variant"), CASES, ids=[f"{m}-{v}" for m, v in CASES])
@pytest.mark.parametrize("name", FIXTURES)
def test_cuda_explanations_equal_the_cpus(name: str, method: str, variant: str) -> None:
    x = fixture(name).input(0)
    cpu = _explainer(name, "cpu").explain(x, _method(method), variant=variant)
    cuda = _explainer(name, "cuda").explain(x, _method(method), variant=variant)
    what = f"{name} {method} {variant}"
    assert (cpu.provider, cuda.provider) == ("cpu", "cuda")
    assert cuda.layer_names == cpu.layer_names and cuda.layer_names
    assert cuda.base_score == pytest.approx(cpu.base_score, rel=SCORE_RTOL), f"{what}: S0"
    np.testing.assert_allclose(cuda.prediction, cpu.prediction, rtol=0, atol=PREDICTION_ATOL)

    for on_cuda, on_cpu in zip(cuda.layers, cpu.layers, strict=True):
        where = f"{what} {on_cpu.layer}"
        if method in ("gradcam", "gradcampp"):
            for term, rtol in (("activation", ACTIVATION_RTOL), ("gradient", GRADIENT_RTOL)):
                assert_close(on_cuda.terms[term], on_cpu.terms[term], rtol, f"{where}: {term}")
        if method == "gradcampp":
            continue  # α's poles: weights are checked through A, g and the map
        if (name, method) in CANCELLING:
            for result in (on_cpu, on_cuda):
                scale = float(np.abs(result.terms["gradient"]).max())
                assert np.abs(result.weights).max() <= NOISE_WEIGHT * scale, where
            continue
        assert_close(on_cuda.weights, on_cpu.weights, WEIGHTS_RTOL, f"{where}: weights")

    assert cuda.map.dtype == np.float32 and cuda.map.shape == cpu.map.shape
    if (name, method) in CANCELLING:
        return  # a map of rounding noise on both devices
    limit = GRADCAMPP_MAP_ATOL if method == "gradcampp" else MAP_ATOL
    difference = float(np.abs(cuda.map - cpu.map).max())
    assert difference <= limit, f"{what}: final maps differ by {difference:.3g} > {limit:g}"


@pytest.mark.parametrize("name", FIXTURES)
def test_cuda_scores_equal_the_cpus(name: str) -> None:
    """The same map scored on both: x̃ = x ⊙ Ā and the deletion/insertion steps re-predicted."""
    x = fixture(name).input(0)
    attribution = _explainer(name, "cpu").explain(x, "kwc").map
    cpu = score_map(_explainer(name, "cpu"), x, attribution, steps=8)
    cuda = score_map(_explainer(name, "cuda"), x, attribution, steps=8)
    for score in ("prediction_preserved", "excess_prediction", "deletion_auc", "insertion_auc"):
        assert getattr(cuda, score) == pytest.approx(getattr(cpu, score), abs=METRIC_ATOL), score
    assert cuda.image_preserved == cpu.image_preserved  # host-side: the same map
    for curve in ("deletion_curve", "insertion_curve"):
        np.testing.assert_allclose(
            getattr(cuda, curve), getattr(cpu, curve), rtol=0, atol=METRIC_ATOL, err_msg=curve
        )
    assert cuda.forward_passes == cpu.forward_passes

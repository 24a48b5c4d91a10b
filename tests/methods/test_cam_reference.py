"""Score-CAM and Ablation-CAM equal a direct loop reference (docs/algorithms.md §4).

Score-CAM: for each kernel k of each post-bottleneck layer, h_k = minmax(up(A_k)) masks the input
(broadcast over its channels, in the model's own layout), one full model run per masked input
gives s_k = Σ P(x ⊙ h_k), and w = softmax(s). Ablation-CAM: w_k = (S0 − T(P^{−k}))/S0 with
kernel k removed by zeroing its weights, bias and block parameters (the P2 ablation, by weight
editing, one full model run per kernel). Both then use M_ℓ = ReLU(Σ_k w_k A_k) and the adapted
combination: P1 minmax(mean_ℓ minmax(up(M_ℓ))); P2 Σ_ℓ up(M_ℓ/(max M_ℓ + 1e-7)) / max.

Tolerances. What the model measures (S0, P, s_k, T(P^{−k})) and every formula step are held to
1e-5 relative. The end-to-end weights get 1e-4, because both weight rules amplify float32
rounding by design: s_k ≈ 500–2100 enter a softmax, so a 1e-8 relative difference between two
ONNX Runtime runs of the same masked input moves the weights by ~1e-5 relative; and Ablation-CAM
divides S0 − T(P^{−k}), a ~0.1% difference of two ~600 sums, so float32 rounding of P is
amplified ~1000 times. Each chain link is therefore checked on its own at 1e-5: the library's
scores against the reference's, its weights against the rule applied to its own scores, its
layer maps and final map against the reference's formulas applied to its weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_close, fixture
from tests.methods import reference
from tests.methods.library import decoder_layers, explainer

RTOL = 1e-5
CONDITIONED_RTOL = 1e-4  # end-to-end weights only; see the module docstring
VARIANTS = ["p2", "p1"]
SCORECAM_FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_nhwc"]
ABLATIONCAM_FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_nhwc"]


def assert_cam_maps(
    name: str, variant: str, result, weights_used: list[np.ndarray], what: str, rtol: float
) -> None:
    """Layer maps ReLU(Σ w_k A_k) and the variant's combination, from the given weights and the
    reference's own activations A, against the library's maps."""
    case = reference.case_reference(name, decoder_layers(name), 0)
    maps = []
    for attribution, weights in zip(result.layers, weights_used, strict=True):
        layer_map = reference.cam_layer_map(weights, case.activations[attribution.layer])
        maps.append(layer_map)
        assert_close(attribution.map, layer_map, rtol, f"{what} {attribution.layer}: M")
    shape = case.model.spatial_shape
    expected = reference.combine_cam(maps, shape, variant)
    assert result.map.dtype == np.float32
    assert result.map.shape == shape
    assert_close(result.map, expected, rtol, f"{what}: final map")


# --------------------------------------------------------------------------- Score-CAM
@pytest.mark.parametrize("name", SCORECAM_FIXTURES)
def test_scorecam_masks_are_the_minmaxed_upsampled_activations(name: str) -> None:
    """The reference's masks span [0, 1] per kernel and keep the input's layout (NHWC too)."""
    case = reference.case_reference(name, decoder_layers(name), 0)
    model = case.model
    first = case.activations[decoder_layers(name)[0]]
    h = reference.minmax(reference.upsample(first[0], model.spatial_shape))
    assert h.min() == 0.0 and h.max() == 1.0
    masked = model.masked_input(case.x, h)
    assert masked.shape == case.x.shape == fixture(name).test_shape
    spatial = np.squeeze(case.x, axis=(0, -1 if model.channels_last else 1))
    assert_close(np.squeeze(masked), spatial * h, 1e-6, "x ⊙ h")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", SCORECAM_FIXTURES)
def test_scorecam_equals_the_masked_input_loop(name: str, variant: str) -> None:
    """s_k = Σ P(x ⊙ minmax(up(A_k))) per kernel, w = softmax(s) over the layer's kernels,
    M_ℓ = ReLU(Σ w_k A_k) and the variant's CAM combination."""
    names = decoder_layers(name)
    case = reference.case_reference(name, names, 0)
    scores = reference.scorecam_scores(name, names, 0)
    result = explainer(name).explain(case.x, method="scorecam", variant=variant)
    what = f"scorecam {name} {variant}"

    assert result.base_score == pytest.approx(case.base_score, rel=1e-6)
    assert result.layer_names == list(names)
    for attribution, expected_scores in zip(result.layers, scores, strict=True):
        label = f"{what} {attribution.layer}"
        library_scores = attribution.terms["scores"]
        assert_close(library_scores, expected_scores, RTOL, f"{label}: s")
        assert_close(attribution.weights, reference.softmax(library_scores), 1e-9, f"{label}: w")
        assert attribution.weights.sum() == pytest.approx(1.0, abs=1e-9)
        assert_close(
            attribution.weights,
            reference.softmax(expected_scores),
            CONDITIONED_RTOL,
            f"{label}: w end to end",
        )
    assert_cam_maps(name, variant, result, [a.weights for a in result.layers], what, RTOL)
    expected_weights = [reference.softmax(s) for s in scores]
    assert_cam_maps(name, variant, result, expected_weights, what, CONDITIONED_RTOL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", SCORECAM_FIXTURES)
def test_scorecam_uniform_weights_flag_reproduces_p2s_all_ones_weights(
    name: str, variant: str
) -> None:
    """uniform_weights=True (P2's code: softmax over the wrong axis) gives every kernel weight 1,
    so M_ℓ = ReLU(Σ_k A_k), combined by the variant's rule."""
    names = decoder_layers(name)
    case = reference.case_reference(name, names, 0)
    result = explainer(name).explain(
        case.x, method="scorecam", variant=variant, uniform_weights=True
    )
    ones = [np.ones(len(case.activations[layer])) for layer in names]
    for attribution, expected in zip(result.layers, ones, strict=True):
        np.testing.assert_array_equal(attribution.weights, expected)
    assert_cam_maps(name, variant, result, ones, f"scorecam uniform {name} {variant}", RTOL)


# --------------------------------------------------------------------------- Ablation-CAM
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ABLATIONCAM_FIXTURES)
def test_ablationcam_equals_the_block_zeroing_reference(name: str, variant: str) -> None:
    """T(P^{−k}) with kernel k's block output zeroed (by weight editing), w_k = (S0 − T)/S0,
    M_ℓ = ReLU(Σ w_k A_k) and the variant's CAM combination; the P1 variant changes only the
    combination, the ablation stays the P2 zeroing."""
    names = decoder_layers(name)
    case = reference.case_reference(name, names, 0)
    ablations = reference.ablation_reference(name, names, 0, "block")
    result = explainer(name).explain(case.x, method="ablationcam", variant=variant)
    what = f"ablationcam {name} {variant}"

    assert result.base_score == pytest.approx(case.base_score, rel=1e-6)
    assert result.layer_names == list(names)
    s0 = result.base_score
    for attribution, ablation in zip(result.layers, ablations, strict=True):
        label = f"{what} {attribution.layer}"
        assert ablation.ablated_peak == 0.0, label  # the reference really zeroed the channel
        library_scores = attribution.terms["scores"]
        assert_close(library_scores, ablation.drop_scores, RTOL, f"{label}: T(P^-k)")
        assert_close(attribution.weights, (s0 - library_scores) / s0, 1e-9, f"{label}: w")
        expected = (case.base_score - ablation.drop_scores) / case.base_score
        assert_close(attribution.weights, expected, CONDITIONED_RTOL, f"{label}: w end to end")
    assert_cam_maps(name, variant, result, [a.weights for a in result.layers], what, RTOL)
    expected_weights = [
        (case.base_score - ablation.drop_scores) / case.base_score for ablation in ablations
    ]
    assert_cam_maps(name, variant, result, expected_weights, what, CONDITIONED_RTOL)

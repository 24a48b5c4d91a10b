"""Whole-volume KWC and Ablation-CAM of a sliding-window prediction against a brute force.

The brute force shares nothing with the library's execution: per kernel it edits the model's
weights (tests/methods/reference.py: P2 zeroes the kernel's weights, bias and block
parameters), runs MONAI's ``sliding_window_inference`` over the whole volume with that edited
model as the predictor, and computes D_k = Σ_R max(P − P^{−k}, 0), I_k = Σ_R min(P^{k}, P),
T = Σ_R P and w_k = D_k·I_k/T (Ablation-CAM: (T − T^{−k}) / T) from the fused predictions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from segattr_onnx import Explainer, Target
from segattr_onnx.sliding_window import SlidingWindow
from segattr_onnx.target import Region
from segattr_onnx.windowed import explain_windowed
from tests.conftest import fixture
from tests.methods import reference
from tests.methods.library import decoder_layers

NAME = "unet3d"  # fixed 16³ input: the patch
PATCH = (16, 16, 16)
VOLUME = (24, 28, 20)  # 2 × 3 × 2 = 12 overlapping windows at overlap 0.5
RTOL = 1e-5


def _volume(shape: tuple[int, ...] = VOLUME) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((1, *shape)).astype(np.float32)


def _fused_probability(model: reference.ReferenceModel, x: np.ndarray, edits: dict) -> np.ndarray:
    """P of the whole volume: MONAI blends the edited model's patch outputs (Gaussian, 0.5)."""
    output = model.fx.spec["output_name"]

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        values = [model.run(patch[None], edits)[output] for patch in patches.numpy()]
        return torch.from_numpy(np.concatenate(values))

    fused = sliding_window_inference(
        torch.from_numpy(x[None]), PATCH, 4, predictor, overlap=0.5, mode="gaussian"
    ).numpy()
    return model.probability({output: fused}, class_index=1)


def _sum(values: np.ndarray, region: np.ndarray | None) -> float:
    return float(values.sum() if region is None else values[region].sum())


@pytest.mark.parametrize(
    ("method", "shape"),
    [("kwc", VOLUME), ("ablationcam", VOLUME), ("kwc", (12, 28, 20))],  # the last: padded
)
def test_whole_volume_kernel_weights_equal_the_brute_force(method: str, shape) -> None:
    layers = decoder_layers(NAME)[:2]
    model = reference.reference_model(NAME, layers)
    x = _volume(shape)
    window = SlidingWindow(PATCH, overlap=0.5, blend="gaussian")
    assert len(window.grid(shape)) >= (8 if shape == VOLUME else 6)
    explanation = explain_windowed(
        Explainer(fixture(NAME).path, provider="cpu"), x, window, method, list(layers),
        Target(class_index=1),
    )  # fmt: skip
    base = _fused_probability(model, x, {})
    total = _sum(base, None)
    for layer, attribution in zip(model.layers, explanation.layers, strict=True):
        kernels = len(attribution.weights)
        dependent = np.zeros(kernels)
        independent = np.zeros(kernels)
        without_score = np.zeros(kernels)
        for k in range(kernels):
            without = _fused_probability(model, x, model.block_zero_edits(layer, [k]))
            dependent[k] = _sum(np.maximum(base - without, 0), None)
            without_score[k] = _sum(without, None)
            if method == "kwc":
                others = [j for j in range(kernels) if j != k]
                alone = _fused_probability(model, x, model.block_zero_edits(layer, others))
                independent[k] = _sum(np.minimum(alone, base), None)
        if method == "kwc":
            expected = dependent * independent / total
            scale = np.abs(expected).max()
            np.testing.assert_allclose(
                attribution.terms["dependent"], dependent, rtol=RTOL, atol=RTOL * dependent.max()
            )
            np.testing.assert_allclose(attribution.weights, expected, rtol=RTOL, atol=RTOL * scale)
        else:
            expected = (total - without_score) / total
            scale = np.abs(expected).max()
            np.testing.assert_allclose(attribution.weights, expected, rtol=RTOL, atol=RTOL * scale)


def test_whole_volume_scorecam_scores_equal_the_brute_force() -> None:
    """s_k = Σ_R P(x ⊙ minmax(A_k)), A_k the kernel's activation fused as the outputs are (each
    window's upsampled to the patch, MONAI's Gaussian weights, MONAI's window grid), and P the
    sliding-window prediction of the masked volume."""
    from monai.data.utils import compute_importance_map, dense_patch_slices

    layers = decoder_layers(NAME)[:2]
    model = reference.reference_model(NAME, layers)
    x = _volume()
    window = SlidingWindow(PATCH, overlap=0.5, blend="gaussian")
    explanation = explain_windowed(
        Explainer(fixture(NAME).path, provider="cpu"), x, window, "scorecam", list(layers),
        Target(class_index=1),
    )  # fmt: skip
    weights = compute_importance_map(PATCH, mode="gaussian", sigma_scale=0.125).numpy()
    slices = dense_patch_slices(VOLUME, PATCH, (8, 8, 8))  # int(16 · (1 − 0.5))
    assert len(slices) == len(window.grid(VOLUME))
    for layer, attribution in zip(model.layers, explanation.layers, strict=True):
        total, count = None, np.zeros(VOLUME)
        for where in slices:
            activation = model.run(x[(slice(None), *where)][None])[layer.raw_output][0]
            upsampled = reference.upsample(activation, PATCH)
            if total is None:
                total = np.zeros((len(upsampled), *VOLUME))
            total[(slice(None), *where)] += upsampled * weights
            count[where] += weights
        fused = total / count
        scores = np.array(
            [
                _sum(
                    _fused_probability(
                        model, (x * reference.minmax(a)[None]).astype(np.float32), {}
                    ),
                    None,
                )
                for a in fused
            ]
        )
        np.testing.assert_allclose(
            attribution.terms["scores"], scores, rtol=RTOL, atol=RTOL * np.abs(scores).max()
        )


def test_windows_away_from_the_region_are_not_rerun_for_ablations() -> None:
    x = _volume()
    region = np.zeros(VOLUME, bool)
    region[:6, :6, :6] = True  # the corner: only the windows starting at 0 on every axis
    window = SlidingWindow(PATCH, overlap=0.5)
    grid = window.grid(VOLUME)
    touching = sum(bool(region[grid.slices(i)].any()) for i in range(len(grid)))
    assert 0 < touching < len(grid)
    explainer = Explainer(fixture(NAME).path, provider="cpu")
    target = Target(class_index=1, region=Region.from_mask(region))
    explanation = explain_windowed(explainer, x, window, "kwc", "decoder", target)
    ablations = [r for r in explanation.runs if r.purpose == "ablation"]
    assert ablations and all(r.skipped_windows == len(grid) - touching for r in ablations)
    for record, attribution in zip(ablations, explanation.layers, strict=True):
        assert record.passes == 2 * len(attribution.weights) * touching


def test_gradcampp_is_refused_by_name() -> None:
    explainer = Explainer(fixture(NAME).path, provider="cpu")
    for method in ("gradcampp",):
        with pytest.raises(Exception, match="not supported yet"):
            explain_windowed(explainer, _volume(), SlidingWindow(PATCH), method)


def test_activations_observed_again_per_layer_when_keeping_them_would_not_fit(
    monkeypatch,
) -> None:
    """A tiny budget: each window's activations are not kept but observed again for the
    layer being explained; the explanation is the same."""
    explainer = Explainer(fixture(NAME).path, provider="cpu")
    window = SlidingWindow(PATCH, overlap=0.5)
    target = Target(class_index=1)
    kept = explain_windowed(explainer, _volume(), window, "kwc", "decoder", target)
    runner = explainer.local_executor((1, 1, *PATCH)).runner
    monkeypatch.setattr(runner, "memory_budget", 1)
    observed = []
    from segattr_onnx import windowed

    original = windowed.observe
    monkeypatch.setattr(
        windowed, "observe", lambda *a, **k: observed.append(1) or original(*a, **k)
    )
    again = explain_windowed(explainer, _volume(), window, "kwc", "decoder", target)
    windows = len(window.grid(VOLUME))
    assert len(observed) == windows * (1 + len(again.layers))  # one pass, then one per layer
    # The tiny budget also leaves no room for contributions, so the rows run the whole suffix
    # instead of forming after the linear readers: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(again.map, kept.map, rtol=1e-6, atol=1e-7)


def _torch_twin(name: str):
    """A fixture's own torch architecture (tests/fixtures/make_models.py) in float64: the 2D
    one rebuilt from its seed (the script is deterministic; it matches the ONNX file to 1e-6),
    the 3D one with the ONNX file's weights. Autograd through MONAI's sliding window on it is
    the reference for gradients through the blend."""
    import importlib.util
    import sys
    from pathlib import Path

    from onnx import numpy_helper

    path = Path(__file__).parents[1] / "fixtures" / "make_models.py"
    spec = importlib.util.spec_from_file_location("make_models", path)
    make_models = importlib.util.module_from_spec(spec)
    sys.modules["make_models"] = make_models  # its dataclasses look their module up
    spec.loader.exec_module(make_models)
    if name == "unet2d_torchscript":
        net = make_models.make_unet(0, dims=2, n_classes=2, norm="batch", final="none")
    else:
        net = make_models.make_unet(
            2, dims=3, n_classes=3, norm="instance", leaky=True, upsample="interp", final="softmax"
        )
        weights = {
            t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in fixture(name).load_with_weights().graph.initializer
        }
        net.load_state_dict({key: weights[key] for key in net.state_dict()}, strict=True)
    return net.double().eval()


def _module_of(layer_name: str, modules: dict) -> torch.nn.Module:
    """The torch module whose output is the ONNX layer's raw output: "/up1/up/ConvTranspose"
    → up1.up; a convolution whose BatchNorm the export folded into it → that BatchNorm."""
    parts: list[str] = []
    for part in layer_name.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part
        else:
            parts.append(part)
    name = ".".join(parts)
    folded = name.rsplit(".", 1)[0] + ".norm" if name.endswith(".conv") else None
    return modules[folded] if folded in modules else modules[name]


GRADCAM_CASES = [
    # 2D logits, softmax applied by segattr: every class channel is seeded; 3 × 3 = 9 windows
    ("unet2d_torchscript", (32, 32), (64, 56), None),
    # 3D, softmax in the graph: its decoder convolutions are instance-normalised (a shift of
    # their output cancels, so their mean gradient is 0 up to rounding); the head is not.
    ("unet3d", PATCH, VOLUME, ["/head/Conv"]),
]


@pytest.mark.parametrize(("name", "patch", "shape", "layers"), GRADCAM_CASES)
def test_whole_volume_gradcam_weights_equal_autograd_through_monai(
    name: str, patch, shape, layers
) -> None:
    """α_k = Σ over windows and positions of ∂T/∂A_k, divided by their count: the derivative
    of T = Σ P_1(F) (F: MONAI's blend of the float64 torch twin's outputs) by a shift δ_k
    added to the layer's raw output in every window, found by autograd."""
    net = _torch_twin(name)
    x = np.random.default_rng(12).standard_normal((1, *shape)).astype(np.float32)
    layer_names = layers or decoder_layers(name)[:2]
    window = SlidingWindow(patch, overlap=0.5, blend="gaussian")
    windows = len(window.grid(shape))
    assert windows >= 8
    explanation = explain_windowed(
        Explainer(fixture(name).path, provider="cpu"), x, window, "gradcam", list(layer_names),
        Target(class_index=1),
    )  # fmt: skip
    modules = dict(net.named_modules())
    for layer_name, attribution in zip(layer_names, explanation.layers, strict=True):
        shift = torch.zeros(len(attribution.weights), dtype=torch.float64, requires_grad=True)
        positions = []

        def add_shift(_module, _inputs, output, shift=shift, positions=positions):
            positions.append(int(np.prod(output.shape[2:])))
            return output + shift.view(1, -1, *([1] * (output.ndim - 2)))

        handle = _module_of(layer_name, modules).register_forward_hook(add_shift)
        try:
            fused = sliding_window_inference(  # MONAI weighs outputs in place: a copy each
                torch.from_numpy(x[None]).double(), patch, 4, lambda t: net(t).clone(),
                overlap=0.5, mode="gaussian",
            )  # fmt: skip
            probability = fused if name == "unet3d" else torch.softmax(fused, dim=1)
            probability[0, 1].sum().backward()
        finally:
            handle.remove()
        expected = shift.grad.numpy() / (windows * positions[0])
        np.testing.assert_allclose(
            attribution.weights, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max()
        )

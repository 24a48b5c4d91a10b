"""KWC equals a brute-force reference that ablates kernels by editing the model's weights.

docs/algorithms.md §2–3, held end to end: for every kernel k of every post-bottleneck layer, the
reference edits the ONNX initializers (P2: the kernel's weights, bias and block parameters set to
0; P1: its weights swapped for the seeded Glorot ones, bias kept), runs the FULL model with
ONNX Runtime (no graph rewrites, no suffix graphs, no batching), and computes D_k, I_k, w_k, the
layer maps and their combination from the spec's formulas (see ``tests/methods/reference.py``).
The library's suffix execution, mask blending and batched statistics must agree to 1e-5
relative to the reference's largest value.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from segattr_onnx import Target
from tests.conftest import MANIFEST, assert_close, fixture
from tests.methods import reference
from tests.methods.library import decoder_layers, explainer

FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_nhwc"]
VARIANTS = ["p2", "p1"]
FORMS = {"p2": "block", "p1": "glorot"}
RTOL = 1e-5
# (fixture, input seed): every fixture on seed 0, the 2D NCHW model on a second case as well.
CASES = [("unet2d_torchscript", 0), ("unet2d_torchscript", 1), ("unet3d", 0), ("unet2d_nhwc", 0)]


# --------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("name", FIXTURES)
def test_decoder_is_every_post_bottleneck_kernel_layer_of_the_manifest(name: str) -> None:
    """layers="decoder" explains exactly the manifest's decoder layers, ConvTranspose included."""
    layers = MANIFEST[name]["kernel_layers"]
    expected = [layer["onnx_node"] for layer in layers if layer["group"] == "decoder"]
    assert list(decoder_layers(name)) == expected
    result = explainer(name).explain(fixture(name).input(0), method="kwc")
    assert result.layer_names == expected


@pytest.mark.parametrize("name", FIXTURES)
def test_p2_weight_edits_zero_exactly_the_ablated_channels_of_the_block_output(name: str) -> None:
    """Sanity of the reference: zeroing a kernel's weights, bias and per-channel block
    parameters (norm scale/shift, Mul constants) makes that channel of the block output — the
    tensor the library ablates — exactly 0, and leaves the other kernels' raw outputs as they
    were; the traced block ends where the library's catalogue says it does."""
    analysis = explainer(name).analysis(fixture(name).test_shape)
    for ablation in reference.ablation_reference(name, decoder_layers(name), 0, "block"):
        layer = ablation.layer
        assert layer.block_output == analysis.layer(layer.name).block_output
        assert ablation.ablated_peak == 0.0, layer.name
        assert ablation.replaced_error == 0.0, layer.name
        assert ablation.kept_error == 0.0, layer.name


def test_p2_weight_edits_cover_norm_and_scale_parameters() -> None:
    """InstanceNormalization (3D) and per-channel Mul (NHWC) blocks have parameters to zero."""
    layers = reference.reference_model("unet3d", decoder_layers("unet3d")).layers
    assert all(len(layer.block_params) == 2 for layer in layers)
    layers = reference.reference_model("unet2d_nhwc", decoder_layers("unet2d_nhwc")).layers
    assert [len(layer.block_params) for layer in layers] == [0, 1, 1, 0, 1, 1]
    assert [layer.block_axis for layer in layers] == [1, 3, 3, 1, 3, 3]


@pytest.mark.parametrize("name", FIXTURES)
def test_p1_weight_edits_swap_only_the_ablated_raw_channels(name: str) -> None:
    """Sanity of the reference: with Glorot weights for the ablated kernels, their raw conv
    output is the Glorot kernel's whatever the other kernels do, and the rest is unchanged."""
    for ablation in reference.ablation_reference(name, decoder_layers(name), 0, "glorot"):
        assert ablation.kept_error == 0.0, ablation.layer.name
        assert ablation.replaced_error == 0.0, ablation.layer.name
        changed = reference.reference_model(name, decoder_layers(name)).glorot_edits(
            ablation.layer, [0]
        )
        assert len(changed) == 1  # only the weights: the bias is kept


@pytest.mark.parametrize(("name", "seed"), CASES)
@pytest.mark.parametrize("form", ["block", "glorot"])
def test_reference_terms_are_not_trivial(name: str, seed: int, form: str) -> None:
    """Every layer has kernels whose removal costs something and which reproduce something, so
    the comparisons below cannot pass on all-zero terms."""
    for ablation in reference.ablation_reference(name, decoder_layers(name), seed, form):
        assert ablation.dependent.max() > 0.1, ablation.layer.name
        assert ablation.independent.min() > 0.0, ablation.layer.name


def _onnx_resize(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ONNX Resize, linear, half_pixel (float32): an independent implementation of up()."""
    batch = values[None].astype(np.float32)
    sizes = np.array([*batch.shape[:2], *shape], dtype=np.int64)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Resize",
                ["x", "", "", "sizes"],
                ["y"],
                mode="linear",
                coordinate_transformation_mode="half_pixel",
            )
        ],
        "resize",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, batch.shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(sizes, "sizes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": batch})[0][0]


@pytest.mark.parametrize(
    ("source", "target"), [((4, 8, 8), (32, 32)), ((3, 5, 7), (16, 21)), ((2, 4, 8, 8), (16,) * 3)]
)
def test_upsample_reference_is_half_pixel_linear_interpolation(source, target) -> None:
    """The reference's voxel-by-voxel up() agrees with ONNX Resize (linear, half_pixel) and,
    where torch is installed, with torch's interpolate(align_corners=False)."""
    values = np.random.default_rng(0).standard_normal(source)
    expected = reference.upsample(values, target)
    assert_close(_onnx_resize(values, target), expected, 1e-6, "ONNX Resize")
    try:
        import torch
    except ImportError:  # CI has no torch; the ONNX Resize cross-check above still runs
        return
    mode = "bilinear" if len(target) == 2 else "trilinear"
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(values)[None], size=target, mode=mode, align_corners=False
    )
    assert_close(resized[0].numpy(), expected, 1e-12, "torch interpolate")


# --------------------------------------------------------------------------- the library vs it
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("name", "seed"), CASES)
def test_kwc_equals_the_weight_editing_reference(name: str, seed: int, variant: str) -> None:
    """D_k = Σ max(P − P^{−k}, 0), I_k = Σ min(P^{k}, P), w = D·I/S0 (P1: minmax over the
    layer), the layer map (P2: Σ w_k|A_k|/max|A|; P1: ReLU(Σ w_k ReLU(A_k))) and the combined
    map (P2: Σ up / max; P1: minmax of the mean of minmax(up)) all match the reference."""
    names = decoder_layers(name)
    case = reference.case_reference(name, names, seed)
    ablations = reference.ablation_reference(name, names, seed, FORMS[variant])
    result = explainer(name).explain(case.x, method="kwc", layers="decoder", variant=variant)

    assert result.base_score == pytest.approx(case.base_score, rel=1e-6)
    assert_close(result.prediction, case.prediction, RTOL, "P")
    assert result.layer_names == list(names)
    maps = []
    for ablation, attribution in zip(ablations, result.layers, strict=True):
        what = f"{name} seed {seed} {variant} {ablation.layer.name}"
        weights = ablation.dependent * ablation.independent / case.base_score
        if variant == "p1":
            weights = reference.minmax(weights)
        layer_map = reference.kwc_layer_map(weights, ablation.activation, variant)
        maps.append(layer_map)
        assert_close(attribution.terms["dependent"], ablation.dependent, RTOL, f"{what}: D")
        assert_close(attribution.terms["independent"], ablation.independent, RTOL, f"{what}: I")
        assert_close(attribution.weights, weights, RTOL, f"{what}: w")
        assert_close(attribution.map, layer_map, RTOL, f"{what}: M")
    model = reference.reference_model(name, names)
    expected = reference.combine_kwc(maps, model.spatial_shape, variant)
    assert result.map.dtype == np.float32
    assert_close(result.map, expected, RTOL, f"{name} seed {seed} {variant}: final map")


@pytest.mark.parametrize(("name", "class_index"), [("unet3d", 2), ("unet2d_torchscript", 0)])
def test_kwc_with_another_class_and_a_region_equals_the_reference(name, class_index) -> None:
    """The target's class and region reach every sum: D, I and S0 over R only, P of class c."""
    names = decoder_layers(name)
    case = reference.case_reference(name, names, 0, class_index, region_seed=7)
    ablations = reference.ablation_reference(name, names, 0, "block", class_index, 7)
    target = Target(class_index=class_index, region=case.region)
    result = explainer(name).explain(case.x, method="kwc", target=target)
    assert result.base_score == pytest.approx(case.base_score, rel=1e-6)
    assert_close(result.prediction, case.prediction, RTOL, "P")
    for ablation, attribution in zip(ablations, result.layers, strict=True):
        what = f"{name} class {class_index} {ablation.layer.name}"
        assert_close(attribution.terms["dependent"], ablation.dependent, RTOL, f"{what}: D")
        assert_close(attribution.terms["independent"], ablation.independent, RTOL, f"{what}: I")
        weights = ablation.dependent * ablation.independent / case.base_score
        assert_close(attribution.weights, weights, RTOL, f"{what}: w")

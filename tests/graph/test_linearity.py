"""The readers of a layer's blended output are linear in its kernel mask: Y(m) = Σ_c m_c K_c + B,
with K_c from one grouped convolution of Z. Checked against the rewritten model itself, run with
the mask: any mask, every "drop k" and every "keep only k" row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from segattr_onnx import Explainer
from segattr_onnx.graph.linearity import (
    CONTRIBUTION_SOURCE,
    CONTRIBUTION_WEIGHTS,
    ROWS_BASE,
    contributions_model,
    grouped_weights,
    linear_reads,
)
from segattr_onnx.graph.rewrite import insert_ablation
from segattr_onnx.methods.layers import select_layers
from tests.conftest import assert_close, fixture, run_reference

FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_dynamo"]


def _run(model: onnx.ModelProto, feeds: dict, outputs: list[str], elem_type: int, base_dir=None):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in outputs:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    names = [o.name for o in exposed.graph.output]
    values = run_reference(exposed, feeds, base_dir)
    return [values[names.index(name)] for name in outputs]


@pytest.mark.parametrize("name", FIXTURES)
def test_readers_outputs_are_the_sum_of_per_channel_contributions(name: str) -> None:
    fx = fixture(name)
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    analysis = explainer.analysis(x.shape)
    base_dir = explainer.model.external_data_dir
    rng = np.random.default_rng(1)
    linear_layers = 0
    for layer in select_layers(analysis, "decoder"):
        model, site = insert_ablation(analysis, layer.name, form="block")
        reads = linear_reads(model, site)
        if reads is None:
            continue
        linear_layers += 1
        channels = site.channels
        keep_all = site.masks_to_feed(np.ones((1, channels)))
        for read in reads:
            z, full = _run(model, {"image": x, site.mask_input: keep_all},
                           [site.source, read.output], site.elem_type, base_dir)  # fmt: skip
            weights = grouped_weights(model, site, read, base_dir and str(base_dir))
            outputs = full.shape[1]
            values = full.size
            grouped = contributions_model(model, site, read, channels, values)
            flat = full.reshape(1, values).astype(np.float32)
            # With a zero base and the weights as they are, the rows are the contributions
            # K_c themselves; with Y(1) and the weights negated, the "drop c" rows.
            (contributions,) = run_reference(grouped, {CONTRIBUTION_SOURCE: z,
                CONTRIBUTION_WEIGHTS: weights, ROWS_BASE: np.zeros_like(flat)})  # fmt: skip
            (dropped,) = run_reference(grouped, {CONTRIBUTION_SOURCE: z,
                CONTRIBUTION_WEIGHTS: -weights, ROWS_BASE: flat})  # fmt: skip
            contributions = contributions.astype(np.float64).reshape(channels, outputs, -1)
            dropped = dropped.astype(np.float64).reshape(channels, outputs, -1)
            full = full.astype(np.float64).reshape(full.shape[1], -1)
            rest = full - contributions.sum(axis=0)  # bias and the Concat's other inputs
            masks = np.vstack(
                [rng.integers(0, 2, (2, channels)), 1 - np.eye(channels), np.eye(channels)]
            )
            (ablated,) = _run(model, {"image": np.repeat(x, len(masks), 0),
                                      site.mask_input: site.masks_to_feed(masks)},
                              [read.output], site.elem_type, base_dir)  # fmt: skip
            ablated = ablated.astype(np.float64).reshape(len(masks), full.shape[0], -1)
            predicted = np.einsum("kc,cov->kov", masks, contributions) + rest
            what = f"{name} {layer.name} → {read.node}"
            assert_close(predicted, ablated, 1e-5, what)
            for k in range(channels):  # the engine's two row forms, without the sum
                assert_close(full - contributions[k], ablated[2 + k], 1e-5, f"{what} drop {k}")
                assert_close(dropped[k], ablated[2 + k], 1e-5, f"{what} formed drop {k}")
                keep = contributions[k] + rest
                assert_close(keep, ablated[2 + channels + k], 1e-5, f"{what} keep {k}")
    assert linear_layers >= 2, f"{name}: only {linear_layers} decoder layers read linearly"


def test_a_reader_that_is_not_a_convolution_makes_the_site_non_linear() -> None:
    """The first decoder layer's output, read linearly by the next convolution, is also read
    by a Relu added here: the site is no longer linear. P1's random kernels never are."""
    fx = fixture("unet2d_torchscript")
    analysis = Explainer(fx.path, provider="cpu").analysis(fx.input(0).shape)
    layer = select_layers(analysis, "decoder")[0]
    model, site = insert_ablation(analysis, layer.name, form="block")
    assert linear_reads(model, site) is not None  # its only reader is the next convolution
    extra = helper.make_node("Relu", [site.blended], ["side"])
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("side", 1, None))
    assert linear_reads(model, site) is None
    _, raw_site = insert_ablation(analysis, layer.name, form="raw")
    assert linear_reads(model, raw_site) is None  # P1 blends with random kernels: not linear


def _upsample_then_conv(
    spatial: int, kernel: int, stride: int, following: int, pads: list[int], seed: int = 0
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A ConvTranspose (3 → 4 channels), its output first in a Concat with a 2-channel skip,
    and a stride-1 convolution (6 → 5) over the Concat: no biases, so the convolution's output
    is the ConvTranspose's channels' contribution plus the skip's."""
    rng = np.random.default_rng(seed)
    up = rng.normal(0, 0.5, (3, 4, *[kernel] * spatial)).astype(np.float32)
    conv = rng.normal(0, 0.5, (5, 6, *[following] * spatial)).astype(np.float32)
    size = [5, 4, 3][:spatial]
    z = rng.normal(0, 1, (1, 3, *size)).astype(np.float32)
    skip = np.zeros((1, 2, *[stride * (s - 1) + kernel for s in size]), np.float32)
    nodes = [
        helper.make_node(
            "ConvTranspose", ["z", "up"], ["u"], kernel_shape=[kernel] * spatial,
            strides=[stride] * spatial,
        ),
        helper.make_node("Concat", ["u", "skip"], ["joined"], axis=1),
        helper.make_node("Conv", ["joined", "conv"], ["y"], pads=pads),
        helper.make_node("Relu", ["y"], ["out"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "up",
        [helper.make_tensor_value_info(n, 1, None) for n in ("z", "skip")],
        [helper.make_tensor_value_info("out", 1, None)],
        [onnx.numpy_helper.from_array(up, "up"), onnx.numpy_helper.from_array(conv, "conv")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"z": z, "skip": skip}, up, conv


@pytest.mark.parametrize(
    "spatial, kernel, stride, following, pads",
    [
        (2, 2, 2, 3, [1, 1, 1, 1]),  # the U-Net's: k = s = 2, then 3×3 with padding 1
        (2, 3, 2, 3, [0, 2, 1, 0]),  # an overlapping ConvTranspose, lopsided padding
        (2, 2, 2, 1, [0, 0, 0, 0]),  # a 1×1 convolution: the kernel keeps its size
        (3, 2, 2, 3, [1, 1, 1, 1, 1, 1]),
    ],
)
def test_a_convtranspose_then_a_convolution_is_one_convtranspose(
    spatial, kernel, stride, following, pads
) -> None:
    """The composed weights and attributes (``formation``) run as one ConvTranspose on Z give
    the convolution's output, computed here by ONNX Runtime running the two as exported."""
    from segattr_onnx.graph.linearity import (
        FollowingConv,
        LinearRead,
        composed_transpose_weights,
        formation,
    )

    model, feeds, up, conv = _upsample_then_conv(spatial, kernel, stride, following, pads)
    (expected,) = _run(model, feeds, ["y"], 1)
    read = LinearRead("", "y", "up", 0, FollowingConv("u", "conv", 0))
    op_type, attributes = formation(model, read)
    assert op_type == "ConvTranspose"
    composed = composed_transpose_weights(up, conv[:, :4])
    single = helper.make_model(
        helper.make_graph(
            [helper.make_node(op_type, ["z", "w"], ["y"], **attributes)],
            "single",
            [helper.make_tensor_value_info("z", 1, None)],
            [helper.make_tensor_value_info("y", 1, None)],
            [onnx.numpy_helper.from_array(composed, "w")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    single.ir_version = 8
    (got,) = run_reference(single, {"z": feeds["z"]})
    assert got.shape == expected.shape
    assert_close(got, expected, 1e-5, f"{spatial}D k{kernel} s{stride} then {following}")


def _first_site(model: onnx.ModelProto, x: np.ndarray):
    """The ablation site of the convolution that makes ``z`` in ``_with_encoder(model)``."""
    from segattr_onnx.graph.catalogue import analyse_model
    from segattr_onnx.graph.loading import from_proto

    analysis = analyse_model(from_proto(model), x.shape)
    return insert_ablation(analysis, "encoder", form="block")


def _with_encoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with Z made by a 1 → 3 convolution and ReLU of an input ``image``, the skip
    by a 1 → 2 convolution of it resized: a model with a layer to ablate whose block output
    the ConvTranspose reads."""
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    rng = np.random.default_rng(3)
    graph = wrapped.graph
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", 1, [1, 1, 5, 4]))
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(0, 1, (3, 1, 3, 3)).astype(np.float32), "e"),
            onnx.numpy_helper.from_array(rng.normal(0, 1, (2, 1, 1, 1)).astype(np.float32), "s"),
            onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ]
    )
    head = [
        helper.make_node("Conv", ["image", "e"], ["pre"], pads=[1, 1, 1, 1], name="encoder"),
        helper.make_node("Relu", ["pre"], ["z"]),
        helper.make_node("Resize", ["image", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Conv", ["big", "s"], ["skip"]),
    ]
    nodes = [*head, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return wrapped


@pytest.mark.parametrize(
    "change, composes",
    [
        (None, True),
        ("transpose pads", False),  # a cropped ConvTranspose is not the composed one
        ("strided conv", False),
        ("second reader", False),  # the ConvTranspose's output is also read elsewhere
        ("composed weights too large", False),
    ],
)
def test_readers_compose_only_where_the_composition_is_exact(
    change, composes, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, _, _ = _upsample_then_conv(2, 2, 2, 3, [1, 1, 1, 1])
    model = _with_encoder(model)
    nodes = {n.op_type: n for n in model.graph.node}
    if change == "transpose pads":
        cropped = nodes["ConvTranspose"].attribute  # the same size: cropped, then padded
        cropped.append(helper.make_attribute("pads", [0, 0, 1, 1]))
        cropped.append(helper.make_attribute("output_padding", [1, 1]))
    elif change == "strided conv":
        nodes["Conv"].attribute.append(helper.make_attribute("strides", [2, 2]))
    elif change == "composed weights too large":
        # 3·5·4·4 composed against 3·4·2·2 + 5·6·3·3 (= 318): refused at a growth of 0.5
        monkeypatch.setattr("segattr_onnx.graph.linearity.COMPOSED_GROWTH", 0.5)
    elif change == "second reader":
        model.graph.node.append(helper.make_node("Relu", ["u"], ["side"]))
        model.graph.output.append(helper.make_tensor_value_info("side", 1, None))
    x = np.zeros((1, 1, 5, 4), np.float32)
    ablated, site = _first_site(model, x)
    (read,) = linear_reads(ablated, site)
    assert (read.after is not None) == composes
    assert read.output == ("y" if composes else "u")

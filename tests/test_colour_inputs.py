"""Colour images reach channels-first and channels-last models alike, normalised as the card says.

The images plugin reads a colour PNG as (3, H, W); a model card can scale it to [0, 1]
(``unit``) or normalise it like torchvision's ImageNet backbones (``imagenet``); the channels
then go where the model takes them. Two twins with the same weights, one NCHW and one NHWC
(a Transpose in front), must give the same map for the same PNG, and that map must equal the
one for the array prepared by hand here and given as .npy without a card.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from segattr_onnx.card import IMAGENET_MEAN, IMAGENET_STD, ModelCard, ModelCardError
from segattr_onnx.cli import main
from segattr_onnx.render import overlay_image

SIZE = 16


def _colour_model(channels_last: bool, in_channels: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits, nodes = [], []

    def conv(name, source, out, c_in, c_out, kernel=3, **attrs):
        weight = rng.normal(0, 0.5, (c_out, c_in, kernel, kernel)).astype(np.float32)
        inits.extend(
            [
                numpy_helper.from_array(weight, f"{name}.w"),
                numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), f"{name}.b"),
            ]
        )
        nodes.append(
            helper.make_node(
                "Conv", [source, f"{name}.w", f"{name}.b"], [out], pads=[kernel // 2] * 4, **attrs
            )
        )
        nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"]))
        return f"{out}_relu"

    source = "image"
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    e = conv("enc", source, "e", in_channels, 4)
    b = conv("bottleneck", e, "b", 4, 8, strides=[2, 2])
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes.append(helper.make_node("Resize", [b, "", "scales"], ["up"], mode="nearest"))
    d = conv("dec", "up", "d", 8, 4)
    weight = rng.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32)
    inits += [
        numpy_helper.from_array(weight, "head.w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "head.b"),
    ]
    nodes.append(helper.make_node("Conv", [d, "head.w", "head.b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    shape = ["n", SIZE, SIZE, in_channels] if channels_last else ["n", in_channels, SIZE, SIZE]
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 2, SIZE, SIZE])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def colour_case(tmp_path: Path) -> dict[str, Path]:
    rgb = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    files = {"png": tmp_path / "photo.png"}
    for name, channels_last in (("nchw", False), ("nhwc", True)):
        onnx.save(_colour_model(channels_last), tmp_path / f"{name}.onnx")
        files[name] = tmp_path / f"{name}.onnx"
    (tmp_path / "imagenet.toml").write_text('[input]\nintensity = "imagenet"\n')
    files["card"] = tmp_path / "imagenet.toml"
    # The same preparation, written out here: [0, 255] -> [0, 1] -> ImageNet statistics.
    by_hand = (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.save(tmp_path / "nchw.npy", np.moveaxis(by_hand, -1, 0).astype(np.float32))
    np.save(tmp_path / "nhwc.npy", by_hand.astype(np.float32))
    files["rgb"] = tmp_path / "rgb.npy"
    np.save(files["rgb"], rgb)
    return files


def _explain(model: Path, image: Path, out: Path, *extra: str):
    command = ["explain", str(model), str(image), "--out", str(out), "--provider", "cpu"]
    return CliRunner().invoke(main, [*command, "--method", "gradcam", "--quiet", *extra])


def test_a_colour_png_reaches_nchw_and_nhwc_models_alike(colour_case, tmp_path: Path) -> None:
    maps = {}
    for name in ("nchw", "nhwc"):
        card = ["--card", str(colour_case["card"])]
        result = _explain(
            colour_case[name], colour_case["png"], tmp_path / f"{name}.map.npy", *card
        )
        assert result.exit_code == 0, result.output
        maps[name] = np.load(tmp_path / f"{name}.map.npy")
        plain = _explain(colour_case[name], tmp_path / f"{name}.npy", tmp_path / f"{name}.ref.npy")
        assert plain.exit_code == 0, plain.output
        np.testing.assert_allclose(maps[name], np.load(tmp_path / f"{name}.ref.npy"), atol=1e-5)
    assert maps["nchw"].shape == (SIZE, SIZE) and np.ptp(maps["nchw"]) > 0
    np.testing.assert_allclose(maps["nchw"], maps["nhwc"], atol=1e-5)


def test_a_channels_last_array_with_channels_last_set_is_moved_for_the_model(
    colour_case, tmp_path: Path
) -> None:
    card = tmp_path / "hwc.toml"
    card.write_text('[input]\nchannels_last = true\nintensity = "imagenet"\n')
    result = _explain(
        colour_case["nchw"], colour_case["rgb"], tmp_path / "m.npy", "--card", str(card)
    )
    assert result.exit_code == 0, result.output
    reference = _explain(colour_case["nchw"], tmp_path / "nchw.npy", tmp_path / "r.npy")
    assert reference.exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), np.load(tmp_path / "r.npy"), atol=1e-5)


def test_unit_scaling_divides_by_the_files_full_scale(tmp_path: Path) -> None:
    card = ModelCard(intensity="unit")
    eight_bit = np.array([[0, 51], [255, 102]], np.float32)
    np.testing.assert_allclose(card.prepare(eight_bit), eight_bit / 255)
    sixteen = np.array([[0, 1000], [65535, 300]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    from segattr_onnx.files import read_image

    prepared = card.prepare_image(read_image(tmp_path / "deep.png"))
    np.testing.assert_allclose(prepared, sixteen / 65535, rtol=1e-6)
    with pytest.raises(ModelCardError, match="8- or 16-bit"):
        card.prepare(np.array([[-1.5, 2.0], [0.0, 1.0]]))


def test_cards_refuse_what_does_not_fit_the_image() -> None:
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ModelCardError, match="resize has 2 values but the image has 3 spatial"):
        ModelCard(resize=(16, 16)).prepare(volume)
    with pytest.raises(ModelCardError, match="'imagenet' needs a colour"):
        ModelCard(intensity="imagenet").prepare(np.zeros((8, 8), np.float32))
    colour = np.zeros((3, 8, 8), np.float32)
    assert ModelCard(resize=(16, 16)).prepare(colour, channel_axis=0).shape == (3, 16, 16)


def test_a_colour_image_for_a_one_channel_model_is_one_clear_error(tmp_path: Path) -> None:
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    onnx.save(_colour_model(False, in_channels=1), tmp_path / "grey.onnx")
    result = _explain(tmp_path / "grey.onnx", tmp_path / "photo.png", tmp_path / "m.npy")
    card = tmp_path / "unit.toml"
    card.write_text('[input]\nintensity = "unit"\n')
    carded = _explain(
        tmp_path / "grey.onnx", tmp_path / "photo.png", tmp_path / "m.npy", "--card", str(card)
    )
    for outcome in (result, carded):
        assert outcome.exit_code == 2
        lines = [line for line in outcome.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in outcome.output


def test_colour_inputs_are_drawn_in_colour(colour_case, tmp_path: Path) -> None:
    red = np.zeros((SIZE, SIZE, 3))
    red[..., 0] = np.linspace(0, 1, SIZE)[None, :]
    picture = overlay_image(red, np.zeros((SIZE, SIZE)), scale=1)
    assert picture.shape == (SIZE, SIZE, 3)
    assert (picture[:, -1, 0] > picture[:, -1, 1] + 60).all()  # red shows through the map
    result = _explain(
        colour_case["nhwc"],
        colour_case["png"],
        tmp_path / "m.npy",
        "--card",
        str(colour_case["card"]),
        "--overlay",
        str(tmp_path / "o.png"),
    )
    assert result.exit_code == 0, result.output
    drawn = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(float)
    photo = np.asarray(Image.open(colour_case["png"]).convert("RGB")).astype(float)
    photo = photo.repeat(2, axis=0).repeat(2, axis=1)  # the overlay's scale
    # Under a grey picture, red minus green would follow the map's colour table alone; under
    # the photo's own colours it follows the photo's.
    drawn_hue, photo_hue = drawn[..., 0] - drawn[..., 1], photo[..., 0] - photo[..., 1]
    assert np.corrcoef(drawn_hue.ravel(), photo_hue.ravel())[0, 1] > 0.5


def test_a_colour_png_needs_no_card_to_reach_a_channels_last_model(
    colour_case, tmp_path: Path
) -> None:
    result = _explain(colour_case["nhwc"], colour_case["png"], tmp_path / "m.npy")
    assert result.exit_code == 0, result.output
    # Without a card the pixels go in as stored: the same as the (H, W, 3) array by hand.
    np.save(tmp_path / "raw.npy", np.load(colour_case["rgb"]).astype(np.float32))
    reference = _explain(colour_case["nhwc"], tmp_path / "raw.npy", tmp_path / "r.npy")
    assert reference.exit_code == 0, reference.output
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), np.load(tmp_path / "r.npy"), atol=1e-6)

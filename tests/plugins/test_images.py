"""The segattr-images plugin: PNG/TIFF in, explained like the same array given as .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from segattr_onnx.bundled import example_model_path
from segattr_onnx.cli import main
from segattr_onnx.files import read_image


def test_greyscale_and_colour_images_are_read_as_documented(tmp_path: Path) -> None:
    grey = (np.arange(64 * 48) % 251).reshape(64, 48).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png").array, grey)
    colour = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.tiff")
    read = read_image(tmp_path / "colour.tiff").array
    assert read.shape == (3, 16, 20)
    np.testing.assert_array_equal(read, np.moveaxis(colour, -1, 0))


def test_a_png_is_explained_like_its_pixels(tmp_path: Path) -> None:
    pixels = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "slice.png")
    np.save(tmp_path / "slice.npy", pixels.astype(np.float32))
    maps = []
    for name in ("slice.png", "slice.npy"):
        out = tmp_path / f"{name}.map.npy"
        result = CliRunner().invoke(
            main,
            [
                "explain",
                str(example_model_path()),
                str(tmp_path / name),
                "--out",
                str(out),
                "--method",
                "gradcam",
                "--provider",
                "cpu",
                "--quiet",
            ],
        )
        assert result.exit_code == 0, result.output
        maps.append(np.load(out))
    np.testing.assert_array_equal(maps[0], maps[1])

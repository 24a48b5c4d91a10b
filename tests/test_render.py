"""Overlays and reports: PNGs that decode to what was drawn, HTML that carries every part."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segattr_onnx.bundled import example_model_path
from segattr_onnx.cli import main
from segattr_onnx.render import CONTOUR_COLOUR, overlay_image, png_bytes
from segattr_onnx.synthetic import make_case, save_case


def decode_png(data: bytes) -> np.ndarray:
    """A minimal independent PNG reader for 8-bit RGB, filter 0 (what png_bytes writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, width = 8, b"", 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    rows = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert all(rows[r * stride] == 0 for r in range(height))
    pixels = [rows[r * stride + 1 : (r + 1) * stride] for r in range(height)]
    return np.frombuffer(b"".join(pixels), np.uint8).reshape(height, width, 3)


def test_png_round_trips() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(png_bytes(rgb)), rgb)


def test_overlay_outlines_the_mask_and_colours_by_the_map() -> None:
    image = np.random.default_rng(1).standard_normal((20, 30))
    attribution = np.zeros((20, 30))
    attribution[:, 15:] = 1.0
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:12] = True
    picture = overlay_image(image, attribution, mask, scale=1)
    assert picture.shape == (20, 30, 3)
    assert (picture[5, 8] == CONTOUR_COLOUR).all() and not (picture[10, 8] == CONTOUR_COLOUR).all()
    hot, cold = picture[:, 20:].reshape(-1, 3).mean(0), picture[:, :4].reshape(-1, 3).mean(0)
    assert hot[0] > cold[0] + 50  # the map's high end is warm (red/yellow)


def test_volumes_get_three_planes_through_the_target() -> None:
    volume = np.random.default_rng(2).standard_normal((8, 10, 12))
    mask = np.zeros(volume.shape, bool)
    mask[2:4, 3:6, 4:9] = True
    picture = overlay_image(volume, np.zeros(volume.shape), mask, scale=1)
    # Planes (10x12), (8x12), (8x10) side by side with 4-pixel gaps, padded to height 10.
    assert picture.shape == (10, 12 + 4 + 12 + 4 + 10, 3)
    assert (picture == CONTOUR_COLOUR).all(axis=-1).any()


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_explain_writes_an_overlay_and_a_self_contained_report(tmp_path: Path) -> None:
    case = tmp_path / "case.npz"
    save_case(make_case(90_002, dim=2, size=64), case)
    overlay, report = tmp_path / "map.png", tmp_path / "report.html"
    args = [
        "explain",
        str(example_model_path()),
        str(case),
        "--out",
        str(tmp_path / "m.npy"),
        "--overlay",
        str(overlay),
        "--report",
        str(report),
        "--score",
        "--labels",
        str(case),
        "--steps",
        "0",
        "--provider",
        "cpu",
        "--quiet",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert decode_png(overlay.read_bytes()).shape == (128, 128, 3)  # 64² drawn at scale 2
    parser = _Images()
    parser.feed(report.read_text())
    text = " ".join(parser.text)
    layers = json.loads(result.stdout)["layers"]
    assert len(parser.sources) == 3 + len(layers)  # input, prediction, final map, each layer
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")  # nothing outside the file
        decode_png(base64.b64decode(source.split(",", 1)[1]))
    assert "attribution_quality" in text and "kwc" in text and layers[0] in text
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.stderr  # pictures are never replaced


def test_pictures_must_have_their_own_suffix(tmp_path: Path) -> None:
    case = tmp_path / "case.npz"
    save_case(make_case(90_003, dim=2, size=64), case)
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(example_model_path()),
            str(case),
            "--out",
            str(tmp_path / "m.npy"),
            "--overlay",
            str(tmp_path / "map.jpg"),
            "--provider",
            "cpu",
        ],
    )
    assert result.exit_code == 2 and ".png" in result.stderr
    assert not (tmp_path / "m.npy").exists()


def test_the_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium opens the report and paints its images (the maps' warm colours)."""
    browser = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if browser is None:
        pytest.skip("no Chromium binary (apt-get install chromium; .ci/run installs it)")
    case = tmp_path / "case.npz"
    save_case(make_case(90_005, dim=2, size=64), case)
    report = tmp_path / "report.html"
    result = CliRunner().invoke(
        main,
        [
            "explain",
            str(example_model_path()),
            str(case),
            "--out",
            str(tmp_path / "m.npy"),
            "--report",
            str(report),
            "--provider",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    warm = (pixels[..., 0] > 200) & (pixels[..., 2] < 120)
    assert warm.sum() > 500  # decoded map images, not broken-image icons or empty boxes

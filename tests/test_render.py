"""Overlays and reports: PNGs that decode to what was drawn, HTML that carries every part."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from importlib.metadata import EntryPoint
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segattr_onnx import plugins
from segattr_onnx.bundled import example_model_path
from segattr_onnx.cli import main
from segattr_onnx.plugins import ImageData
from segattr_onnx.render import (
    CONTOUR_COLOUR,
    axis_codes,
    overlay_image,
    planes,
    png_bytes,
    report_html,
    slice_positions,
)
from segattr_onnx.synthetic import make_case, save_case

UNET3D = Path(__file__).parent / "fixtures" / "models" / "unet3d.onnx"  # takes 16³


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
    """The page's pictures (but the colour bar), text, every tag and attribute, and the rows
    of its last table (the run's facts)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "img" and attributes.get("alt") != "colour scale of the maps":
            self.sources.append(attributes["src"])
        if tag == "table":
            self.rows = []
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag) -> None:
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Images:
    parser = _Images()
    parser.feed(page)
    return parser


def assert_no_network(page: str) -> None:
    """Nothing in the page points outside it: every src/href is a data URI (or a fragment),
    no stylesheet link, external script, frame or CSS import, no script that fetches."""
    parsed = parse(page)
    for tag, attributes in parsed.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base"), tag
        assert not (tag == "script" and "src" in attributes), "external script"
        for name in ("src", "href", "srcset", "poster", "action", "data", "background"):
            value = attributes.get(name)
            assert value is None or value.startswith(("data:", "#")), (tag, name, value[:60])
    assert "http://" not in page and "https://" not in page  # base64 holds no ':'
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*//", page)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(?!data:)", page)
    for word in ("fetch(", "XMLHttpRequest", "import(", "WebSocket", "sendBeacon"):
        assert word not in page, word


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
    page = report.read_text()
    parser = parse(page)
    text = " ".join(parser.text)
    layers = json.loads(result.stdout)["layers"]
    assert len(parser.sources) == 3 + len(layers)  # input, prediction, final map, each layer
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")  # nothing outside the file
        decode_png(base64.b64decode(source.split(",", 1)[1]))
    assert "attribution_quality" in text and "kwc" in text and layers[0] in text
    assert "colour scale of the maps" in page and "<script" not in page  # a 2D page: no slider
    assert_no_network(page)
    facts = dict(parser.rows)  # the last table: the run's facts
    model_bytes = example_model_path().read_bytes()
    assert facts["model sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert facts["model card"] == "none"  # none beside the bundled model, none given
    assert_recent_utc(facts["date (UTC)"])
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


def assert_recent_utc(text: str) -> None:
    """An ISO 8601 UTC time stamp of the last minutes."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text), text
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert timedelta(0) <= datetime.now(timezone.utc) - when < timedelta(minutes=10)


def chromium() -> str:
    """The headless browser; missing, the test skips, except under CI=true, where it fails
    (.ci/run installs it, so a CI run without it has lost the rendering checks)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    message = "no Chromium binary (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, so the browser tests must run")
    pytest.skip(message)


def run_chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *flags,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def screenshot(url: str, shot: Path, size: str = "1200,1600") -> np.ndarray:
    run_chromium(url, shot.parent / "profile", f"--screenshot={shot}", f"--window-size={size}")
    assert shot.is_file(), "Chromium wrote no screenshot"
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def test_the_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    """Headless Chromium opens the report and paints its images (the maps' warm colours)."""
    chromium()
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
    pixels = screenshot(report.as_uri(), tmp_path / "shot.png")
    warm = (pixels[..., 0] > 200) & (pixels[..., 2] < 120)
    assert warm.sum() > 500  # decoded map images, not broken-image icons or empty boxes


# A volume read by a plugin that knows its affine, like segattr-medical's NIfTI reader.
VOLUME_AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])  # axis 0 → left, 1 → posterior, 2 → superior


def read_volume(path: Path) -> ImageData:
    return ImageData(np.load(path), {"affine": VOLUME_AFFINE, "spacing": (2.0, 2.0, 3.0)}, path)


def register_volume_reader(registry: plugins.PluginRegistry) -> None:
    registry.add_reader([".testvol"], read_volume)


@pytest.fixture(scope="module")
def volume_report(tmp_path_factory) -> SimpleNamespace:
    """`segattr explain --report` on a 16³ volume with an affine, through a model card."""
    folder = tmp_path_factory.mktemp("volume")
    case = folder / "case.testvol"
    with case.open("wb") as stream:
        np.save(stream, make_case(90_007, dim=3, size=32).image[::2, ::2, ::2])
    card = folder / "unet3d.card.toml"
    card.write_text('[input]\nintensity = "zscore"\n')
    report = folder / "report.html"
    entries = [EntryPoint("volumes", f"{__name__}:register_volume_reader", "g")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins, "entry_points", lambda group: entries)
        patch.setattr(plugins, "_registry", None)
        result = CliRunner().invoke(
            main,
            [
                "explain",
                str(UNET3D),
                str(case),
                "--out",
                str(folder / "m.npy"),
                "--card",
                str(card),
                "--report",
                str(report),
                "--provider",
                "cpu",
                "--quiet",
                "--json",
            ],
        )
        patch.setattr(plugins, "_registry", None)
    assert result.exit_code == 0, result.output
    return SimpleNamespace(
        path=report, page=report.read_text(), card=card, summary=json.loads(result.stdout)
    )


def test_a_volume_report_has_a_slider_per_plane(volume_report) -> None:
    page, layers = volume_report.page, volume_report.summary["layers"]
    parsed = parse(page)
    sliders = [a for tag, a in parsed.tags if tag == "input" and a.get("type") == "range"]
    assert [s["data-plane"] for s in sliders] == ["0", "1", "2"]
    assert all(s["max"] == "15" for s in sliders)  # 16 slices each, none left out
    panels = 3 + len(layers)  # input, prediction, final map, each layer
    assert len(parsed.sources) == 3 * panels
    data = json.loads(re.search(r"const \{F, S\} = (\{.*?\});\n", page).group(1))
    assert data["S"] == {str(axis): list(range(16)) for axis in range(3)}
    for axis in "012":
        assert len(data["F"][axis]) == panels
        assert all(len(frames) == 16 for frames in data["F"][axis])
        frame = data["F"][axis][2][0]  # the final map, slice 0
        assert decode_png(base64.b64decode(frame.split(",", 1)[1])).shape == (16, 16, 3)
    assert "of 16 slices embedded" not in page and "thinned" not in page  # all of them
    assert_no_network(page)


def test_orientation_letters_follow_the_affine(volume_report) -> None:
    """NIfTI's convention: the affine maps voxels to RAS+; a letter names where an axis's
    index grows, and a slice's top/left edges face index 0 of its row/column axes."""
    assert axis_codes(np.eye(4)) == ("R", "A", "S")
    assert axis_codes(np.diag([-1.0, 1.0, 1.0, 1.0])) == ("L", "A", "S")
    assert axis_codes(np.diag([-0.8, -0.8, 2.5, 1.0])) == ("L", "P", "S")  # LPS
    swapped = np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])
    assert axis_codes(swapped) == ("A", "I", "L")
    turn = np.deg2rad(20)  # oblique: each axis takes the world axis it is closest to
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    assert axis_codes(oblique) == ("R", "A", "S")
    assert axis_codes(np.zeros((4, 4))) is None and axis_codes(np.full((4, 4), np.nan)) is None
    assert axis_codes(np.ones((3, 3))) is None
    named = {p.axis: (p.name, p.rows, p.columns, p.edges) for p in planes(np.eye(4))}
    assert named == {
        0: ("sagittal", 1, 2, ("P", "A", "I", "S")),
        1: ("coronal", 0, 2, ("L", "R", "I", "S")),
        2: ("axial", 0, 1, ("L", "R", "P", "A")),
    }
    flipped = {p.axis: (p.name, p.edges) for p in planes(np.diag([-1.0, 1.0, -1.0, 1.0]))}
    assert flipped == {
        0: ("sagittal", ("P", "A", "S", "I")),
        1: ("coronal", ("R", "L", "S", "I")),
        2: ("axial", ("R", "L", "P", "A")),
    }
    assert [p.name for p in planes(None)] == ["axis 0", "axis 1", "axis 2"]
    assert all(p.edges is None for p in planes(None))
    # The CLI passes the reader's affine (L, P, S) on: names and letters in the page.
    page = volume_report.page
    for title in ("sagittal (array axis 0)", "coronal (array axis 1)", "axial (array axis 2)"):
        assert f"<h3>{title}</h3>" in page
    axial = page[page.index("axial (array axis 2)") :]
    letters = re.search(
        r'<b class="t">(\w)</b><b class="l">(\w)</b><img[^>]*><b class="r">(\w)</b>'
        r'<b class="b">(\w)</b>',
        axial,
    ).groups()
    assert letters == ("R", "A", "P", "L")  # rows: axis 0 (→ L), columns: axis 1 (→ P)


def test_axis_codes_agree_with_nibabel() -> None:
    """The numpy port gives nibabel's aff2axcodes (there where segattr-medical brings it)."""
    orientations = pytest.importorskip("nibabel.orientations")
    rng = np.random.default_rng(6)
    for trial in range(2000):
        affine = np.eye(4)
        if trial % 2:
            affine[:3, :3] = rng.standard_normal((3, 3))
        else:  # near an axis permutation with flips: a scan's usual affine
            axes = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
            affine[:3, :3] = (axes + 0.2 * rng.standard_normal((3, 3))) * rng.uniform(0.3, 3, 3)
        affine[:3, 3] = rng.uniform(-100, 100, 3)
        assert axis_codes(affine) == tuple(orientations.aff2axcodes(affine)), affine


def test_a_volume_without_affine_names_axes_and_thins_long_axes() -> None:
    volume = np.random.default_rng(3).standard_normal((100, 6, 5))
    mask = np.zeros(volume.shape, bool)
    mask[70:74, 2:4, 2:4] = True
    explanation = SimpleNamespace(
        method="kwc",
        variant="p2",
        map=np.random.default_rng(4).random(volume.shape),
        layers=[SimpleNamespace(layer="conv", map=np.random.default_rng(5).random((25, 3, 3)))],
        summary=lambda: {"method": "kwc"},
    )
    page = report_html(volume, mask.astype(float), mask, [explanation], None, {"model": "m"})
    assert "<h3>axis 0</h3>" in page and 'class="o"' not in page  # no letters drawn
    data = json.loads(re.search(r"const \{F, S\} = (\{.*?\});\n", page).group(1))
    kept = data["S"]["0"]
    assert len(kept) == 64 and 72 in kept and kept[0] == 0 and kept[-1] == 99
    assert "64 of 100 slices embedded" in page
    assert data["S"]["1"] == list(range(6)) and data["S"]["2"] == list(range(5))
    assert_no_network(page)
    assert slice_positions(10, 3, 64) == list(range(10))
    assert slice_positions(1000, 999, 64)[-1] == 999 and len(slice_positions(1000, 5, 64)) == 64


def test_the_volume_report_names_its_model_card_and_model(volume_report) -> None:
    facts = dict(parse(volume_report.page).rows)
    assert facts["model sha256"] == hashlib.sha256(UNET3D.read_bytes()).hexdigest()
    assert facts["model card"] == str(volume_report.card)
    assert_recent_utc(facts["date (UTC)"])


def test_the_slider_changes_the_shown_slices(volume_report, tmp_path: Path) -> None:
    """In Chromium: moving each slider (its input event) repaints that plane's pictures; a
    URL fragment opens chosen slices."""
    page = volume_report.page
    centres = [int(m) for m in re.findall(r'<output id="at\d">(\d+)</output>', page)]
    assert len(centres) == 3 and all(c != 0 for c in centres)  # the target is not at slice 0
    moved = tmp_path / "moved.html"
    moved.write_text(
        page.replace(
            "</body>",
            "<script>document.querySelectorAll('input[type=range]').forEach((r) => "
            "{ r.value = 0; r.dispatchEvent(new Event('input')); });</script></body>",
        )
    )
    before = screenshot(volume_report.path.as_uri(), tmp_path / "before.png")
    after = screenshot(moved.as_uri(), tmp_path / "after.png")
    assert before.shape == after.shape
    changed = np.abs(before - after).sum(-1) > 30
    coloured = (np.ptp(before, -1) > 40) | (np.ptp(after, -1) > 40)  # pictures', not text
    assert (changed & coloured).sum() > 2000
    dom = run_chromium(
        volume_report.path.as_uri() + "#axis0=0&axis1=5&axis2=15",
        tmp_path / "profile",
        "--dump-dom",
    ).stdout
    shown = re.findall(r'<output id="at\d">(\d+)</output>', dom)
    assert shown == ["0", "5", "15"], shown
    first = re.search(r'<img [^>]*data-plane="1" data-panel="2"[^>]*>', dom).group(0)
    data = json.loads(re.search(r"const \{F, S\} = (\{.*?\});\n", page).group(1))
    assert data["F"]["1"][2][5] in first  # the final map's picture of slice 5


def test_the_report_makes_no_network_request(volume_report, tmp_path: Path) -> None:
    """Checked in the HTML, and in Chromium's network log: the page asks for nothing (a page
    that does is caught the same way, so the log is read right)."""
    assert_no_network(volume_report.page)
    leaky = tmp_path / "leaky.html"
    leaky.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/x.png">')

    def page_requests(url: str, name: str) -> list[str]:
        log = tmp_path / f"{name}.json"
        run_chromium(url, tmp_path / name, f"--log-net-log={log}", "--dump-dom")
        text = log.read_text().rstrip()
        events = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")
        kinds = {v: k for k, v in events["constants"]["logEventTypes"].items()}
        return [
            event["params"]["url"]
            for event in events["events"]
            if kinds[event["type"]] == "URL_REQUEST_START_JOB"
            and "file://" in event.get("params", {}).get("network_isolation_key", "")
            and not event["params"]["url"].startswith(("file:", "data:"))
        ]  # the browser's own background requests have another isolation key

    assert page_requests(leaky.as_uri(), "leaky") == ["http://127.0.0.1:9/x.png"]
    assert page_requests(volume_report.path.as_uri(), "report") == []

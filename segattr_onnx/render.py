"""Pictures people look at: a map over its image (PNG) and a one-file HTML report.

Images are drawn with numpy and written as PNG with zlib, so the core needs no imaging
library. A 2D case is one panel; a volume's overlay gets three panels, one slice per plane
through the middle of the predicted target, so a reviewer sees where the map sits relative to
the mask. A volume's report has a slider per plane through (up to 64 of) its slices, named and
lettered from the input's affine when it has one; its slices are PNG data URIs in the page.
"""

from __future__ import annotations

import base64
import html
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segattr_onnx.arrays import upsample

# Anchor colours of the map's colour scale (dark blue → red → yellow), interpolated to 256.
_ANCHORS = np.array(
    [[0, 0, 64], [32, 0, 160], [200, 30, 90], [250, 120, 20], [255, 240, 60]], dtype=np.float64
)
_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.uint8)
CONTOUR_COLOUR = np.array([0, 255, 255], dtype=np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (H, W, 3) uint8 array."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def is_colour(image: np.ndarray) -> bool:
    """A 2D colour picture: (H, W, 3), channels last as pictures hold them."""
    return image.ndim == 3 and image.shape[-1] == 3


def _grey(image: np.ndarray) -> np.ndarray:
    """The picture under a map as RGB bytes: grey levels, or the image's own colours, with the
    1st-99th percentile stretched to the full range (the model's input may be normalised)."""
    low, high = np.percentile(image, [1, 99])
    scaled = np.clip((image - low) / (high - low), 0, 1) if high > low else np.zeros_like(image)
    if is_colour(image):
        return (scaled * 255).astype(np.uint8)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    neighbours = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inner & ~neighbours


def overlay_panel(
    image: np.ndarray, attribution: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """One 2D panel: the map's colours over the grey image (opacity grows with the map), and
    the predicted mask's outline."""
    return _blend(_grey(np.asarray(image, dtype=np.float64)), attribution, mask)


def _blend(grey: np.ndarray, attribution: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The map's colours over grey RGB bytes, and the mask's outline."""
    grey = grey.astype(np.float64)
    values = np.clip(np.asarray(attribution, dtype=np.float64), 0, 1)
    colour = _LUT[(values * 255).astype(np.uint8)].astype(np.float64)
    alpha = (0.25 + 0.5 * values)[..., None]
    blended = (grey * (1 - alpha) + colour * alpha).astype(np.uint8)
    if mask is not None:
        blended[_contour(np.asarray(mask, dtype=bool))] = CONTOUR_COLOUR
    return blended


def slices_through(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, ...]:
    """The slice index per axis through the middle of the mask (or of the volume)."""
    if mask is not None and mask.any():
        return tuple(int(np.median(axis)) for axis in np.nonzero(mask))
    return tuple(size // 2 for size in shape)


def overlay_image(
    image: np.ndarray, attribution: np.ndarray, mask: np.ndarray | None = None, scale: int = 2
) -> np.ndarray:
    """RGB picture of a map over its image (grey, or (H, W, 3) colour): one panel in 2D,
    three planes for a volume."""
    image = np.asarray(image, dtype=np.float64)
    spatial = image.shape[:-1] if is_colour(image) else image.shape
    if attribution.shape != spatial:
        attribution = upsample(attribution, spatial)
    if len(spatial) == 2:
        panels = [overlay_panel(image, attribution, mask)]
    else:
        centre = slices_through(mask, image.shape)
        panels = []
        for axis in range(3):
            pick = [slice(None)] * 3
            pick[axis] = centre[axis]
            picked = tuple(pick)
            panels.append(
                overlay_panel(
                    image[picked], attribution[picked], None if mask is None else mask[picked]
                )
            )
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 4, 3), 255, np.uint8)
    padded = [
        np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels
    ]
    joined = np.concatenate([part for p in padded for part in (p, gap)][:-1], axis=1)
    return joined.repeat(scale, axis=0).repeat(scale, axis=1)


def write_overlay(
    path: Path, image: np.ndarray, attribution: np.ndarray, mask: np.ndarray | None = None
) -> None:
    Path(path).write_bytes(png_bytes(overlay_image(image, attribution, mask)))


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def _img(rgb: np.ndarray, caption: str) -> str:
    return (
        f'<figure><img alt="{html.escape(caption)}" src="{_data_uri(rgb)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(rows: Sequence[tuple[str, object]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_format(value))}</td></tr>"
        for key, value in rows
    )
    return f"<table>{cells}</table>"


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)


# World directions of NIfTI's RAS+ space (x: left → right, y: posterior → anterior, z: inferior
# → superior), and the plane that lies across each of them.
_WORLD = (("L", "R"), ("P", "A"), ("I", "S"))
_PLANE_ACROSS = ("sagittal", "coronal", "axial")
_OPPOSITE = {low: high for low, high in _WORLD} | {high: low for low, high in _WORLD}


def axis_codes(affine: object) -> tuple[str, str, str] | None:
    """The direction each array axis points to (its index growing), as letters of the RAS+
    world an affine maps voxels into: ``("R", "A", "S")`` for the identity. nibabel's
    ``aff2axcodes`` in numpy: the closest rotation to the affine's directions, then each axis
    takes the world axis it is nearest to. None for an affine that is not a usable 3D one."""
    try:
        matrix = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return None
    directions = matrix[:3, :3]
    zooms = np.sqrt((directions**2).sum(axis=0))
    if (zooms == 0).any():
        return None
    u, singular, vt = np.linalg.svd(directions / zooms)
    if singular.min() <= singular.max() * 3 * np.finfo(np.float64).eps:
        return None  # two axes point the same way: no orientation
    rotation = u @ vt
    codes = [""] * 3
    # The most clearly aligned axes choose first (as nibabel ≥ 5.4), and each world axis goes
    # to one array axis.
    for axis in np.argsort(-np.abs(rotation).max(axis=0), kind="stable"):
        column = rotation[:, axis]
        world = int(np.argmax(np.abs(column)))
        if np.allclose(column, 0):
            return None
        codes[axis] = _WORLD[world][int(column[world] > 0)]
        rotation[world, :] = 0
    return codes[0], codes[1], codes[2]


@dataclass(frozen=True)
class Plane:
    """The slices across one array axis, as the report shows them: rows run along ``rows``,
    columns along ``columns``; ``edges`` are the letters (top, bottom, left, right) when the
    orientation is known."""

    axis: int
    name: str
    rows: int
    columns: int
    edges: tuple[str, str, str, str] | None


def planes(affine: object = None) -> list[Plane]:
    """The three planes of a volume, named from its affine (see ``axis_codes``) or, without
    one, after the array axis they cut across ("axis 0")."""
    codes = axis_codes(affine) if affine is not None else None
    result = []
    for axis in range(3):
        rows, columns = (a for a in range(3) if a != axis)
        if codes is None:
            result.append(Plane(axis, f"axis {axis}", rows, columns, None))
            continue
        world = next(i for i, pair in enumerate(_WORLD) if codes[axis] in pair)
        edges = (_OPPOSITE[codes[rows]], codes[rows], _OPPOSITE[codes[columns]], codes[columns])
        result.append(Plane(axis, _PLANE_ACROSS[world], rows, columns, edges))
    return result


def slice_positions(size: int, keep: int, cap: int) -> list[int]:
    """At most ``cap`` slice indices of an axis of ``size``, evenly spaced, one of them
    ``keep`` (the slice through the target)."""
    if size <= cap:
        return list(range(size))
    picks = np.round(np.linspace(0, size - 1, max(cap, 2))).astype(int)
    picks[np.argmin(np.abs(picks - keep))] = keep
    return sorted({int(p) for p in picks})


def colour_bar() -> str:
    """The map's colour scale, low to high, as a figure."""
    strip = np.repeat(_LUT[None, :, :], 14, axis=0)
    return (
        '<figure class="bar"><div><span>0</span>'
        f'<img alt="colour scale of the maps" src="{_data_uri(strip)}" width="256" height="14">'
        "<span>1</span></div><figcaption>map value, low to high (drawn over the image at 25% to "
        "75% opacity as it grows; cyan outline: the predicted target)</figcaption></figure>"
    )


# Upper bounds on what a volume's report embeds: slices per plane, pixels per slice side
# (larger slices are thinned), and pixels in all (fewer slices when there are many layers).
MAX_SLICES = 64
MAX_SIDE = 128
MAX_PIXELS = 12_000_000

_SLIDER_SCRIPT = """
const show = (p, i) => {
  document.querySelectorAll('img[data-plane="' + p + '"]').forEach(
    (m) => { m.src = F[p][m.dataset.panel][i]; });
  document.getElementById('slider' + p).value = i;
  document.getElementById('at' + p).textContent = S[p][i];
};
document.querySelectorAll('input[data-plane]').forEach((r) =>
  r.addEventListener('input', () => show(r.dataset.plane, +r.value)));
new URLSearchParams(location.hash.slice(1)).forEach((v, k) => {
  const p = k.replace('axis', ''), s = S[p];
  if (!s || v === '' || isNaN(v)) return;
  let best = 0;
  s.forEach((x, i) => { if (Math.abs(x - v) < Math.abs(s[best] - v)) best = i; });
  show(p, best);
});
"""


def _volume_sections(
    image: np.ndarray,
    mask: np.ndarray | None,
    panels: Sequence[tuple[str | None, str, np.ndarray]],
    affine: object,
) -> tuple[list[str], str]:
    """Per plane a slider and, for the chosen slice, every panel (input, prediction, maps);
    the slices are embedded as PNG data URIs that a few lines of script switch between."""
    grey = _grey(image)
    centre = slices_through(mask, image.shape)
    through = "through the target" if mask is not None and mask.any() else "the middle one"
    frames: dict[int, list[list[str]]] = {}
    shown: dict[int, list[int]] = {}
    sections = [
        "<h2>Slices</h2><p>Each plane has a slider that moves every picture of that plane to "
        "another slice; <code>#axis0=12&amp;axis2=40</code> after the file name opens those "
        "slices.</p>"
    ]
    for plane in planes(affine):
        size = image.shape[plane.axis]
        step = max(1, -(-max(image.shape[plane.rows], image.shape[plane.columns]) // MAX_SIDE))
        cut = [slice(None, None, step)] * 3
        cut[plane.axis] = slice(None)
        thinned = image[tuple(cut)].shape
        slice_pixels = max(1, thinned[plane.rows] * thinned[plane.columns])
        budget = MAX_PIXELS // (3 * len(panels) * slice_pixels)
        positions = slice_positions(size, centre[plane.axis], max(2, min(MAX_SLICES, budget)))
        shown[plane.axis] = positions
        start = positions.index(centre[plane.axis])
        frames[plane.axis] = []
        for _, _, values in panels:
            uris = []
            for index in positions:
                pick = list(cut)
                pick[plane.axis] = index
                at = tuple(pick)
                uris.append(
                    _data_uri(_blend(grey[at], values[at], None if mask is None else mask[at]))
                )
            frames[plane.axis].append(uris)
        notes = []
        if len(positions) < size:
            notes.append(
                f"{len(positions)} of {size} slices embedded, evenly spaced (among them "
                f"slice {centre[plane.axis]}, {through})"
            )
        if step > 1:
            notes.append(f"one voxel in {step} along rows and columns (the slices are thinned)")
        if plane.edges is None:
            notes.append(f"rows run along axis {plane.rows}, columns along axis {plane.columns}")
        title = plane.name if plane.edges is None else f"{plane.name} (array axis {plane.axis})"
        sections.append(
            f'<section class="plane"><h3>{html.escape(title)}</h3><p><label>slice '
            f'<input type="range" id="slider{plane.axis}" data-plane="{plane.axis}" min="0" '
            f'max="{len(positions) - 1}" value="{start}"></label> <output id="at{plane.axis}">'
            f"{positions[start]}</output> (slices 0–{size - 1})"
            + "".join(f"; {html.escape(note)}" for note in notes)
            + "</p>"
        )
        zoom = max(1, 160 // max(thinned[plane.rows], thinned[plane.columns]))
        heading = None
        for number, (group, caption, _) in enumerate(panels):
            if number == 0 or group != heading:
                if number:
                    sections.append("</div>")
                heading = group
                if group is not None:
                    sections.append(f"<h4>{html.escape(group)}</h4>")
                sections.append('<div class="layers">')
            img = (
                f'<img alt="{html.escape(caption)}" data-plane="{plane.axis}" '
                f'data-panel="{number}" src="{frames[plane.axis][number][start]}" '
                f'width="{thinned[plane.columns] * zoom}" height="{thinned[plane.rows] * zoom}">'
            )
            if plane.edges is not None:
                top, bottom, left, right = plane.edges
                img = (
                    f'<div class="o"><b class="t">{top}</b><b class="l">{left}</b>{img}'
                    f'<b class="r">{right}</b><b class="b">{bottom}</b></div>'
                )
            sections.append(
                f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        sections.append("</div></section>")
    data = json.dumps({"F": frames, "S": shown}, separators=(",", ":"))
    script = f"const {{F, S}} = {data};{_SLIDER_SCRIPT}"
    return sections, script


def report_html(
    image: np.ndarray,
    prediction: np.ndarray,
    mask: np.ndarray | None,
    explanations: Sequence,
    scores: dict | None,
    facts: dict,
    affine: object = None,
) -> str:
    """A self-contained HTML page: input, prediction, each method's map and layer maps, the
    maps' colour scale, scores and the facts of the run (model and its sha256, card, date,
    target, passes, seconds, provider).

    A volume gets, per plane, a slider through its slices (named and lettered from
    ``affine``, NIfTI's voxel-to-RAS+ matrix, when given); everything is inside the file."""
    image = np.asarray(image, dtype=np.float64)
    spatial = image.shape[:-1] if is_colour(image) else image.shape
    sections = ["<h2>Map colour scale</h2>", colour_bar()]
    script = ""
    if len(spatial) == 3:
        volume = [(None, "input (outline: predicted target)", np.zeros(spatial, np.float32))]
        volume.append((None, "prediction P", _on_grid(np.clip(prediction, 0, 1), spatial)))
        for explanation in explanations:
            group = f"{explanation.method} ({explanation.variant})"
            volume.append((group, "final map", _on_grid(explanation.map, spatial)))
            for layer in explanation.layers:
                values = layer.map / (layer.map.max() or 1.0)
                volume.append((group, layer.layer, _on_grid(values, spatial)))
        slices, script = _volume_sections(image, mask, volume, affine)
        sections += slices
        for explanation in explanations:
            sections.append(f"<h2>{html.escape(explanation.method)} ({explanation.variant})</h2>")
            sections.append(_table(list(explanation.summary().items())))
    else:
        blank = np.zeros(image.shape)
        sections += [
            "<h2>Input and prediction</h2>",
            _img(overlay_image(image, blank, mask), "input (outline: predicted target)"),
            _img(overlay_image(image, np.clip(prediction, 0, 1), mask), "prediction P"),
        ]
        for explanation in explanations:
            sections.append(f"<h2>{html.escape(explanation.method)} ({explanation.variant})</h2>")
            sections.append(_img(overlay_image(image, explanation.map, mask), "final map"))
            layer_images = [
                _img(
                    overlay_image(
                        image, upsample(layer.map / (layer.map.max() or 1.0), spatial), mask
                    ),
                    layer.layer,
                )
                for layer in explanation.layers
            ]
            sections.append('<div class="layers">' + "".join(layer_images) + "</div>")
            sections.append(_table(list(explanation.summary().items())))
    if scores:
        sections.append("<h2>Scores</h2>")
        sections.append(_table([(k, v) for k, v in scores.items() if not isinstance(v, list)]))
    sections.append("<h2>Run</h2>")
    sections.append(_table(list(facts.items())))
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:75em}figure{display:inline-block;"
        "margin:.5em;vertical-align:top}img{image-rendering:pixelated}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.2em .6em;"
        "text-align:left}.bar div{display:flex;align-items:center;gap:.4em}"
        ".o{display:inline-grid;grid-template-areas:'. t .' 'l i r' '. b .';align-items:center;"
        "justify-items:center;gap:1px 3px}.o img{grid-area:i}.o b{font-size:.8em;color:#555}"
        ".o .t{grid-area:t}.o .b{grid-area:b}.o .l{grid-area:l}.o .r{grid-area:r}"
        "input[type=range]{width:20em;vertical-align:middle}.plane figure{width:min-content}"
        ".plane figcaption{overflow-wrap:anywhere;font-size:.85em}"
    )
    scripts = f"<script>{script}</script>" if script else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>segattr-onnx report</title><style>{style}</style></head><body>"
        "<h1>segattr-onnx report</h1>" + "".join(sections) + scripts + "</body></html>"
    )


def _on_grid(values: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    """A map on the picture's grid (float32: volumes are large)."""
    values = np.asarray(values)
    if values.shape != tuple(spatial):
        values = upsample(values, spatial)
    return values.astype(np.float32)

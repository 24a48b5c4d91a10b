"""Pictures people look at: a map over its image (PNG) and a one-file HTML report.

Images are drawn with numpy and written as PNG with zlib, so the core needs no imaging
library. A 2D case is one panel; a volume gets three panels, one slice per plane through the
middle of the predicted target, so a reviewer sees where the map sits relative to the mask.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from collections.abc import Sequence
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
    grey = _grey(np.asarray(image, dtype=np.float64)).astype(np.float64)
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


def _img(rgb: np.ndarray, caption: str) -> str:
    data = base64.b64encode(png_bytes(rgb)).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
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


def report_html(
    image: np.ndarray,
    prediction: np.ndarray,
    mask: np.ndarray | None,
    explanations: Sequence,
    scores: dict | None,
    facts: dict,
) -> str:
    """A self-contained HTML page: input, prediction, each method's map and layer maps, scores
    and the facts of the run (model, target, passes, seconds, provider)."""
    image = np.asarray(image, dtype=np.float64)
    blank = np.zeros(image.shape)
    sections = [
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
                    image, upsample(layer.map / (layer.map.max() or 1.0), image.shape), mask
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
        "margin:.5em}img{image-rendering:pixelated}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>segattr-onnx report</title><style>{style}</style></head><body>"
        "<h1>segattr-onnx report</h1>" + "".join(sections) + "</body></html>"
    )

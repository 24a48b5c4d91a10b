"""PNG, JPEG and TIFF input for segattr-onnx, read with pillow (which the core does not need)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segattr_onnx.plugins import ImageData, PluginRegistry

SUFFIXES = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]
_GREY_MODES = {"1", "L", "I", "I;16", "I;16B", "F"}
# Full scale of the stored values per mode; "I" and "F" hold any range, so none is known.
_MAX_VALUE = {"1": 1.0, "L": 255.0, "I;16": 65535.0, "I;16B": 65535.0}


def register(registry: PluginRegistry) -> None:
    registry.add_reader(SUFFIXES, read_image)


def read_image(path: Path) -> ImageData:
    """Greyscale → (H, W); colour → (3, H, W), channels first (``channel_axis`` 0); float32,
    values as stored. ``max_value`` (255, or 65535 for 16-bit) is what a card's ``unit``
    scaling divides by."""
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode in _GREY_MODES:
            array = np.asarray(image, dtype=np.float32)
            channel_axis = None
        else:
            array = np.moveaxis(np.asarray(image.convert("RGB"), dtype=np.float32), -1, 0)
            channel_axis = 0
    meta = {"mode": mode, "max_value": 255.0 if channel_axis == 0 else _MAX_VALUE.get(mode)}
    return ImageData(array, meta, path, channel_axis=channel_axis)

"""PNG, JPEG and TIFF input for segattr-onnx, read with pillow (which the core does not need)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segattr_onnx.plugins import ImageData, PluginRegistry

SUFFIXES = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]
_GREY_MODES = {"1", "L", "I", "I;16", "I;16B", "F"}


def register(registry: PluginRegistry) -> None:
    registry.add_reader(SUFFIXES, read_image)


def read_image(path: Path) -> ImageData:
    """Greyscale → (H, W); colour → (3, H, W), channels first; float32, values as stored."""
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        if mode in _GREY_MODES:
            array = np.asarray(image, dtype=np.float32)
        else:
            array = np.moveaxis(np.asarray(image.convert("RGB"), dtype=np.float32), -1, 0)
    return ImageData(array, {"mode": mode}, path)

"""Model cards: how to turn an image file into what a model takes, without writing code.

A vendor's model comes with conventions (CT windowed to [-1000, 400], z-scored MR, 256² input)
that the ONNX file does not record. A small TOML card next to the model (``model.card.toml``)
or given with ``--card`` states them once; ``segattr explain`` and ``segattr audit`` apply them
to every input::

    [input]
    intensity = "ct-window"      # "zscore", "ct-window" or "percentile"; none by default
    window = [-1000, 400]        # for ct-window: values clipped to it, then scaled to [0, 1]
    percentiles = [0.5, 99.5]    # for percentile: clipped to these, then scaled to [0, 1]
    resize = [256, 256]          # spatial size the model needs (linear resampling)
    spacing = [1.0, 1.0, 1.0]    # or: resample to this voxel spacing (from the file's header)
    channels_last = false        # files hold (..., C): move channels first

    [target]
    class_index = 1
    activation = "auto"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segattr_onnx.arrays import upsample
from segattr_onnx.errors import SegattrError
from segattr_onnx.files import load_toml, reject_unknown_keys
from segattr_onnx.target import Target

INTENSITY_PRESETS = ("zscore", "ct-window", "percentile")


def _pair(values, name: str, source: Path) -> tuple[float, float]:
    """Two increasing numbers (a window or a percentile range)."""
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 2
        or not all(isinstance(v, (int, float)) for v in values)
        or not values[0] < values[1]
    ):
        raise ModelCardError(f"{name} in {source.name} must be two increasing numbers: {values}")
    return float(values[0]), float(values[1])


def _positive(values, name: str, source: Path) -> tuple[float, ...] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and v > 0 for v in values
    ):
        raise ModelCardError(f"{name} in {source.name} must be positive numbers: {values}")
    return tuple(float(v) for v in values)


# The sections and keys a model card takes; anything else is refused, never ignored.
CARD_SECTIONS = {
    "input": frozenset(
        {"intensity", "window", "percentiles", "resize", "spacing", "channels_last"}
    ),
    "target": frozenset({"class_index", "output", "activation", "class_axis"}),
}


class ModelCardError(SegattrError):
    """The model card is missing, malformed or asks for something unknown."""


@dataclass(frozen=True)
class ModelCard:
    intensity: str | None = None
    window: tuple[float, float] = (-1000.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    channels_last: bool = False
    target: dict = field(default_factory=dict)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        source = Path(path)
        data = load_toml(source, "model card", ModelCardError)
        where = f"model card {source.name}"
        reject_unknown_keys(data, CARD_SECTIONS, where, ModelCardError)
        for name, keys in CARD_SECTIONS.items():
            if not isinstance(data.get(name, {}), dict):
                raise ModelCardError(f"[{name}] in {where} must be a table")
            places = {k: f"[{other}]" for other, ks in CARD_SECTIONS.items() for k in ks}
            section = data.get(name, {})
            reject_unknown_keys(section, keys, f"[{name}] of {where}", ModelCardError, places)
        section = data.get("input", {})
        intensity = section.get("intensity")
        if intensity is not None and intensity not in INTENSITY_PRESETS:
            raise ModelCardError(
                f"intensity {intensity!r} in {source.name} is unknown; use one of "
                f"{', '.join(INTENSITY_PRESETS)}"
            )
        resize = section.get("resize")
        if resize is not None and (
            not isinstance(resize, list) or not all(isinstance(d, int) and d > 0 for d in resize)
        ):
            raise ModelCardError(f"resize in {source.name} must be positive integers: {resize}")
        window = _pair(section.get("window", cls.window), "window", source)
        percentiles = _pair(section.get("percentiles", cls.percentiles), "percentiles", source)
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ModelCardError(f"percentiles in {source.name} must rise within [0, 100]")
        return cls(
            intensity=intensity,
            window=window,
            percentiles=percentiles,
            resize=None if resize is None else tuple(resize),
            spacing=_positive(section.get("spacing"), "spacing", source),
            channels_last=bool(section.get("channels_last", False)),
            target=dict(data.get("target", {})),
            source=source,
        )

    @classmethod
    def beside(cls, model: str | os.PathLike[str]) -> ModelCard | None:
        """The card next to a model file (``model.card.toml``), if there is one."""
        candidate = Path(model).with_suffix(".card.toml")
        return cls.load(candidate) if candidate.is_file() else None

    def prepare(self, image: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
        """A bare image (spatial axes, optionally a channel axis) made model-ready; ``spacing``
        is the file's voxel spacing, needed when the card resamples to its own."""
        values = np.asarray(image, dtype=np.float64)
        if self.channels_last:
            values = np.moveaxis(values, -1, 0)
        if self.intensity == "zscore":
            spread = float(values.std())
            values = (values - float(values.mean())) / (spread if spread > 0 else 1.0)
        elif self.intensity == "ct-window":
            low, high = self.window
            values = (np.clip(values, low, high) - low) / (high - low)
        elif self.intensity == "percentile":
            low, high = np.percentile(values, self.percentiles)
            values = (np.clip(values, low, high) - low) / ((high - low) or 1.0)
        if self.spacing is not None:
            if spacing is None:
                raise ModelCardError(
                    "the model card resamples to a spacing, but the input file records none; "
                    "give a NIfTI/NRRD/DICOM input or use 'resize'"
                )
            dims = len(self.spacing)
            if dims > values.ndim or len(spacing) < dims:
                raise ModelCardError(
                    f"the card's spacing has {dims} values but the image has "
                    f"{min(values.ndim, len(spacing))} spatial axes"
                )
            current = values.shape[-dims:]
            size = tuple(
                max(1, round(n * s / t))
                for n, s, t in zip(current, spacing[-dims:], self.spacing, strict=True)
            )
            values = upsample(values, size)
        if self.resize is not None and values.shape[-len(self.resize) :] != self.resize:
            values = upsample(values, self.resize)
        return values.astype(np.float32)

    def apply_target(self, target: Target) -> Target:
        """The card's target settings, where the command line left the default."""
        return Target(
            class_index=target.class_index
            if target.class_index is not None
            else self.target.get("class_index"),
            output=target.output or self.target.get("output"),
            activation=target.activation
            if target.activation != "auto"
            else self.target.get("activation", "auto"),
            region=target.region,
            class_axis=target.class_axis
            if target.class_axis is not None
            else self.target.get("class_axis"),
        )

"""Model cards: how to turn an image file into what a model takes, without writing code.

A vendor's model comes with conventions (CT windowed to [-1000, 400], z-scored MR, 256² input)
that the ONNX file does not record. A small TOML card next to the model (``model.card.toml``)
or given with ``--card`` states them once; ``segattr explain`` and ``segattr audit`` apply them
to every input::

    [input]
    intensity = "ct-window"      # "zscore", "ct-window", "percentile", "unit" or "imagenet"
    window = [-1000, 400]        # for ct-window: values clipped to it, then scaled to [0, 1]
    percentiles = [0.5, 99.5]    # for percentile: clipped to these, then scaled to [0, 1]
    resize = [256, 256]          # spatial size the model needs (linear resampling)
    spacing = [1.0, 1.0, 1.0]    # or: resample to this voxel spacing (from the file's header)
    channels_last = false        # arrays (.npy) hold (..., C); image readers say it themselves

Channels go where the model takes them: the card prepares a (C, *spatial) image, and
``Explainer.place_channels`` moves C last for a channels-last (NHWC) model. ``unit`` divides by
the file's full scale (255 for 8-bit images); ``imagenet`` does that, then subtracts
torchvision's ImageNet mean and divides by its standard deviation, channel by channel.

    [target]
    class_index = 1
    activation = "auto"
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segattr_onnx.arrays import upsample
from segattr_onnx.errors import SegattrError
from segattr_onnx.files import load_toml, reject_unknown_keys
from segattr_onnx.plugins import ImageData
from segattr_onnx.sliding_window import SlidingWindow, SlidingWindowError
from segattr_onnx.target import Target, check_target_table

INTENSITY_PRESETS = ("zscore", "ct-window", "percentile", "unit", "imagenet")
# torchvision's ImageNet statistics (RGB), the normalisation most 2D backbones were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _number(value, kinds: type | tuple[type, ...] = (int, float)) -> bool:
    """A TOML number of ``kinds``; a boolean is not one (``True`` is an int to Python)."""
    return isinstance(value, kinds) and not isinstance(value, bool)


def _pair(values, name: str, source: Path) -> tuple[float, float]:
    """Two increasing numbers (a window or a percentile range)."""
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 2
        or not all(_number(v) for v in values)
        or not values[0] < values[1]
    ):
        raise ModelCardError(f"{name} in {source.name} must be two increasing numbers: {values}")
    return float(values[0]), float(values[1])


def _positive(values, name: str, source: Path) -> tuple[float, ...] | None:
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not all(_number(v) and v > 0 for v in values):
        raise ModelCardError(f"{name} in {source.name} must be positive numbers: {values}")
    return tuple(float(v) for v in values)


# The sections and keys a model card takes; anything else is refused, never ignored.
CARD_SECTIONS = {
    "input": frozenset(
        {"intensity", "window", "percentiles", "resize", "spacing", "channels_last"}
    ),
    "target": frozenset({"class_index", "output", "activation", "class_axis"}),
    "inference": frozenset(
        {"patch", "overlap", "blend", "sigma_scale", "padding", "cval", "batch"}
    ),
}


class ModelCardError(SegattrError):
    """The model card is missing, malformed or asks for something unknown."""


def _sliding_window(section: dict | None, source: Path) -> SlidingWindow | None:
    """The card's ``[inference]``: how the model is run on inputs larger than its patch."""
    if section is None:
        return None
    where = f"[inference] of {source.name}"
    patch = section.get("patch")
    if patch is None:
        raise ModelCardError(f"{where} needs a patch, e.g. patch = [128, 128, 128]")
    if not isinstance(patch, list) or not all(_number(d, int) and d > 0 for d in patch):
        raise ModelCardError(f"patch in {where} must be positive integers, not {patch!r}")
    kinds = {"overlap": (int, float), "sigma_scale": (int, float), "cval": (int, float),
             "batch": int, "blend": str, "padding": str}  # fmt: skip
    for key, kind in kinds.items():
        value = section.get(key)
        if value is not None and not (
            _number(value, kind) if kind is not str else isinstance(value, str)
        ):
            raise ModelCardError(f"{key} in {where} must be a {_kind_name(kind)}, not {value!r}")
    settings = {key: section[key] for key in kinds if key in section}
    try:
        return SlidingWindow(tuple(patch), **settings)
    except SlidingWindowError as exc:
        raise ModelCardError(f"in {where}: {exc}") from None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return {str: "string", int: "whole number"}.get(kind, "number")  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelCard:
    intensity: str | None = None
    window: tuple[float, float] = (-1000.0, 400.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    resize: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    channels_last: bool = False
    target: dict = field(default_factory=dict)
    inference: SlidingWindow | None = None  # the model runs patch by patch, blended
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
            not isinstance(resize, list) or not all(_number(d, int) and d > 0 for d in resize)
        ):
            raise ModelCardError(f"resize in {source.name} must be positive integers: {resize}")
        channels_last = section.get("channels_last", False)
        if not isinstance(channels_last, bool):
            raise ModelCardError(
                f"channels_last in {source.name} must be true or false (a TOML boolean, "
                f"unquoted), not {channels_last!r}"
            )
        check_target_table(data.get("target", {}), f"[target] of {where}", ModelCardError)
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
            channels_last=channels_last,
            target=dict(data.get("target", {})),
            inference=_sliding_window(data.get("inference"), source),
            source=source,
        )

    @classmethod
    def beside(cls, model: str | os.PathLike[str]) -> ModelCard | None:
        """The card next to a model file (``model.card.toml``), if there is one."""
        candidate = Path(model).with_suffix(".card.toml")
        return cls.load(candidate) if candidate.is_file() else None

    def channel_axis(self, image: ImageData) -> int | None:
        """The image's channel axis: the reader's when it knows, else the card's word."""
        if image.channel_axis is not None:
            return image.channel_axis
        return -1 if self.channels_last else None

    @property
    def resamples(self) -> bool:
        """Whether prepared images change size (``resize`` or ``spacing``)."""
        return self.resize is not None or self.spacing is not None

    def spatial_shape(self, image: ImageData) -> tuple[int, ...]:
        """The image's spatial size as read (the map goes back onto it)."""
        shape = list(np.shape(image.array))
        axis = self.channel_axis(image)
        if axis is not None and shape:
            del shape[axis]
        return tuple(shape)

    def prepare_image(self, image: ImageData) -> np.ndarray:
        """An image as read by a reader, made model-ready: (C, *spatial) or bare *spatial."""
        return self.prepare(
            image.array,
            image.meta.get("spacing"),
            channel_axis=self.channel_axis(image),
            max_value=image.meta.get("max_value"),
        )

    def prepare(
        self,
        image: np.ndarray,
        spacing: tuple[float, ...] | None = None,
        channel_axis: int | None = None,
        max_value: float | None = None,
    ) -> np.ndarray:
        """A bare image made model-ready: channels (at ``channel_axis``, or last when the card
        says ``channels_last``) moved first, intensities scaled, spatial axes resampled.

        ``spacing`` is the file's voxel spacing, needed when the card resamples to its own;
        ``max_value`` the file's full scale, which ``unit`` and ``imagenet`` divide by.
        """
        values = np.asarray(image, dtype=np.float64)
        if channel_axis is None and self.channels_last:
            channel_axis = -1
        if channel_axis is not None:
            if values.ndim < 3:
                raise ModelCardError(
                    f"the image has shape {values.shape}: no room for a channel axis besides 2 "
                    "spatial ones; set channels_last = false for a single-channel image"
                )
            values = np.moveaxis(values, channel_axis, 0)
        spatial = values.ndim - (channel_axis is not None)
        for name, sizes in (("resize", self.resize), ("spacing", self.spacing)):
            if sizes is not None:
                spatial = _spatial_axes(values, channel_axis is not None, len(sizes), name)
        if self.intensity == "zscore":
            spread = float(values.std())
            values = (values - float(values.mean())) / (spread if spread > 0 else 1.0)
        elif self.intensity == "ct-window":
            low, high = self.window
            values = (np.clip(values, low, high) - low) / (high - low)
        elif self.intensity == "percentile":
            low, high = np.percentile(values, self.percentiles)
            values = (np.clip(values, low, high) - low) / ((high - low) or 1.0)
        elif self.intensity in ("unit", "imagenet"):
            values = values / _full_scale(values, max_value)
            if self.intensity == "imagenet":
                if channel_axis is None or values.shape[0] != len(IMAGENET_MEAN):
                    raise ModelCardError(
                        f"intensity 'imagenet' needs a colour (RGB) image; this one has "
                        f"{1 if channel_axis is None else values.shape[0]} channel(s) — use "
                        "'unit' or 'zscore' for other images"
                    )
                shape = (-1,) + (1,) * spatial
                mean = np.asarray(IMAGENET_MEAN).reshape(shape)
                values = (values - mean) / np.asarray(IMAGENET_STD).reshape(shape)
        if self.spacing is not None:
            if spacing is None:
                raise ModelCardError(
                    "the model card resamples to a spacing, but the input file records none; "
                    "give a NIfTI/NRRD/DICOM input or use 'resize'"
                )
            dims = len(self.spacing)
            if len(spacing) < dims:
                raise ModelCardError(
                    f"the card's spacing has {dims} values but the file records {len(spacing)}; "
                    "give one per spatial axis, or use 'resize'"
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


def card_for(image: ImageData, card: ModelCard | None) -> ModelCard | None:
    """The card that prepares ``image``: the user's, or an empty one for an image whose reader
    knows its channels (a colour PNG), so they reach the model where it takes them."""
    if card is None and image.channel_axis is not None:
        return ModelCard()
    return card


def _spatial_axes(values: np.ndarray, has_channels: bool, count: int, name: str) -> int:
    """How many trailing axes ``name`` (resize, spacing) applies to: one value per spatial
    axis. Axes of size 1 in front (an array's channel or batch axis) are carried along; a
    volume given a 2D size is refused rather than resized slice by slice."""
    axes = values.ndim - has_channels
    leading = values.shape[has_channels : has_channels + max(0, axes - count)]
    if count > axes or any(size != 1 for size in leading):
        raise ModelCardError(
            f"{name} has {count} values but the image has {axes} spatial axes (shape "
            f"{tuple(values.shape)}); give one value per spatial axis"
        )
    return count


def _full_scale(values: np.ndarray, max_value: float | None) -> float:
    """What ``unit`` divides by: the reader's full scale, else 255 or 65535 for whole numbers
    within those ranges (8- and 16-bit images saved as arrays)."""
    if max_value is None:
        whole = bool(np.all(values == np.round(values))) if values.size else True
        top = float(values.max()) if values.size else 0.0
        if not whole or float(values.min(initial=0.0)) < 0 or top > 65535:
            raise ModelCardError(
                "intensity 'unit' scales 8- or 16-bit values to [0, 1], but this image holds "
                f"values in [{float(values.min()):g}, {top:g}]; use 'percentile' or 'zscore'"
            )
        max_value = 255.0 if top <= 255 else 65535.0
    return float(max_value)


def warn_if_windowed(card: ModelCard | None) -> None:
    """Methods the sliding window does not serve yet (Grad-CAM++, plugins'): say that the
    whole input is run instead, so that nobody takes their map for one of the deployed
    prediction."""
    if card is not None and card.inference is not None:
        warn_if_windowed_gradients(card.inference, stacklevel=3)


def warn_if_windowed_gradients(window: SlidingWindow, stacklevel: int = 2) -> None:
    warnings.warn(
        f"the model card runs the model patch by patch ([inference], patch "
        f"{list(window.patch)}); this method does not follow it yet, and runs the model on "
        "the whole input (predict, scores, and KWC, Ablation-CAM, Score-CAM and Grad-CAM "
        "explanations follow it)",
        stacklevel=stacklevel,
    )

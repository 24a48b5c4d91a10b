"""Errors a user can act on.

Every error raised for bad input is a ``SegattrError``: the CLI prints its message as one line and
exits with code 2, so each message says what is wrong *and* what to do about it.
"""

from __future__ import annotations


class SegattrError(Exception):
    """Base class of every error caused by the user's model, data or options."""


class ModelFileError(SegattrError):
    """The model file is missing, unreadable or not ONNX."""


class UnsafeExternalDataError(SegattrError):
    """An external-data reference points outside the model's own folder."""


class NoKernelLayersError(SegattrError):
    """The model has no convolution, so there is nothing to attribute through."""


class InputShapeError(SegattrError):
    """The input shape is missing, malformed or does not fit the model."""


class ShapeInferenceError(SegattrError):
    """Shapes the analysis needs could not be inferred."""


class GraphRewriteError(SegattrError):
    """A requested graph rewrite cannot be done exactly on this model."""


class LayerSelectionError(SegattrError):
    """A layer name, pattern or group selected nothing usable."""


class ProviderError(SegattrError):
    """The requested ONNX Runtime execution provider is not usable here."""


class TargetError(SegattrError):
    """The output, class, activation or region to explain does not fit the model's output."""


class InputDataError(SegattrError):
    """The input array does not match what the model takes."""


class MethodError(SegattrError):
    """An unknown attribution method or a setting it does not support."""


class OutputFileError(SegattrError):
    """An output path would overwrite something, or cannot be written."""


class NumericalError(SegattrError):
    """The model produced NaN or infinite values, so no explanation can be computed."""


class ModelRunError(SegattrError):
    """ONNX Runtime loaded the model but failed running it on this input."""


class GradientRuleError(SegattrError):
    """A node between the selected layers and the target has no gradient rule."""

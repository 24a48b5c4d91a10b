"""The library side of the reference comparisons: one cached Explainer per fixture.

Kept apart from ``reference.py``, which must not use the code it checks.
"""

from __future__ import annotations

from functools import cache

from segattr_onnx import Explainer
from tests.conftest import fixture


@cache
def explainer(name: str) -> Explainer:
    return Explainer(fixture(name).path, provider="cpu")


@cache
def decoder_layers(name: str) -> tuple[str, ...]:
    analysis = explainer(name).analysis(fixture(name).test_shape)
    return tuple(layer.name for layer in analysis.layers if layer.group == "decoder")

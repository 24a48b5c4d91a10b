"""Deployment variants of a fixture model, made in code: an fp16 build, an int8 (QDQ) build and
a copy whose decoder is randomised. ``segattr compare``'s tests and
``benchmarks/compare_precisions.py`` use the same builders, so the documented figures are of
the models the tests check.

Only onnx and onnxruntime (its quantization and transformers tools) are needed: no torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

from segattr_onnx.graph.validation import in_topological_order


def fp16_copy(source: Path, target: Path) -> Path:
    """Weights and internal tensors in float16, float32 kept at the input and output (Cast
    nodes at the boundaries), as ONNX Runtime's own converter makes it.

    The converter appends the two boundary Casts after every other node; segattr-onnx reads
    that, but ``onnx.checker`` refuses it, so the nodes are put back in order here (with the
    loader's own sort).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notes on values clamped to the float16 range
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    model = in_topological_order(model, str(source))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target


def int8_copy(source: Path, target: Path, calibration: list[np.ndarray]) -> Path:
    """Static int8 quantisation in QDQ form (weights and activations), its ranges calibrated
    on ``calibration`` (inputs with their batch axis, float32)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load(str(source)).graph.input[0].name
    batches = [{name: np.asarray(x, dtype=np.float32)} for x in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return target


def randomised_decoder(
    source: Path, target: Path, shape: tuple[int, ...], seed: int = 0
) -> tuple[str, ...]:
    """A copy whose decoder kernel layers (as ``--layers decoder`` selects them) have seeded
    normal weights and biases of each tensor's own spread (``sanity.randomise_layers``): a
    model that no longer computes the same thing. Returns the layers rewritten."""
    from segattr_onnx import Explainer
    from segattr_onnx.graph.loading import load_model
    from segattr_onnx.graph.randomise import randomise_layers
    from segattr_onnx.methods.layers import select_layers

    layers = select_layers(Explainer(source, provider="cpu").analysis(shape), "decoder")
    randomised = randomise_layers(load_model(source), layers, seed)
    onnx.save(randomised.proto, str(target))
    return tuple(layer.name for layer in layers)

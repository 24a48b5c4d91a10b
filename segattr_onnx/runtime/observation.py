"""The observation pass: the one run of the unmodified model every case starts from.

One full pass gives the prediction P, every selected layer's activation A_ℓ and every tensor
the ablation suffixes read from outside (skip connections), so no layer needs a prefix pass of
its own. Activations are handed on channel first and as float32, whatever the layer's layout
and type; the gradient runs, which observe too, convert theirs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.rewrite import expose
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import ChunkedRunner
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.target import ResolvedTarget


@dataclass(frozen=True)
class Observation:
    """What one full pass of the unmodified model yields."""

    outputs: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]  # layer → (C, *S_ℓ) float32
    boundaries: dict[str, np.ndarray]  # tensors the ablation suffixes read, batch 1
    graph_nodes: int


def boundary_names(
    ablation: AblationRunner, layers: Sequence[KernelLayer], form: str | None
) -> list[str]:
    """Tensors of the original graph that the suffixes of ``layers`` read from outside."""
    if form is None:
        return []
    known = set(ablation.analysis.tensors)
    names: list[str] = []
    for layer in layers:
        boundary = ablation.ablated(layer.name, form).suffix.boundary_inputs
        if all(name in known for name in boundary):
            names.extend(n for n in boundary if n not in names)
    return names


def observe(
    analysis: ModelAnalysis,
    sessions: SessionCache,
    x: np.ndarray,
    layers: Sequence[KernelLayer],
    target: ResolvedTarget,
    boundaries: Sequence[str] = (),
) -> Observation:
    """One full pass exposing activations and suffix inputs; ``boundaries`` may be empty."""
    activation_names = [layer.output for layer in layers]
    extra = list(dict.fromkeys([*activation_names, *boundaries]))
    key = ("observe", tuple(extra))
    model = analysis.model.proto
    session = sessions.get(key, lambda: expose(model, extra, analysis.tensors))
    names = list(dict.fromkeys([target.output, *extra]))
    values = ChunkedRunner(session).run({analysis.input.name: x}, names)
    activations = {
        layer.name: channel_first(analysis, layer, values[layer.output]) for layer in layers
    }
    return Observation(
        outputs={target.output: values[target.output]},
        activations=activations,
        boundaries={name: values[name] for name in boundaries},
        graph_nodes=len(model.graph.node),
    )


def channel_first(analysis: ModelAnalysis, layer: KernelLayer, value: np.ndarray) -> np.ndarray:
    """A_ℓ as (C, *S_ℓ) float32; a QLinearConv output is dequantised with its own scale."""
    values = np.moveaxis(np.asarray(value), layer.channel_axis, 1)[0]
    if np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float32, copy=False)
    node = analysis.index.nodes[layer.node_index]
    if layer.op == "QLinearConv":
        scale = analysis.index.constant_value(node.input[6])
        zero = analysis.index.constant_value(node.input[7])
        scale = 1.0 if scale is None else float(np.asarray(scale).reshape(-1)[0])
        zero = 0.0 if zero is None else float(np.asarray(zero).reshape(-1)[0])
        return ((values.astype(np.float32) - zero) * scale).astype(np.float32)
    # ConvInteger: integer accumulators are the real values up to a positive scale.
    return values.astype(np.float32)

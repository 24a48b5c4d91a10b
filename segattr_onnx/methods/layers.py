"""Choosing which kernel layers a method explains through: by group, by name, or by pattern.

Groups come from the catalogue (ALGORITHMS.md §1): ``decoder`` is every post-bottleneck layer
(the head excluded), the default of every adapted method; ``last`` is the last of them, the
single-layer form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from segattr_onnx.errors import LayerSelectionError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis

REGEX_PREFIX = "re:"

_GROUP_FILTERS: dict[str, Callable[[KernelLayer], bool]] = {
    "decoder": lambda layer: layer.group == "decoder",
    "encoder": lambda layer: layer.group == "encoder",
    "bottleneck": lambda layer: layer.group == "bottleneck",
    "encoder+decoder": lambda layer: layer.group in ("encoder", "decoder"),
    "decoder-no-transpose": lambda layer: layer.group == "decoder" and layer.op != "ConvTranspose",
    "all": lambda layer: True,
}
LAYER_GROUPS = (*_GROUP_FILTERS, "last")


def select_layers(
    analysis: ModelAnalysis, spec: str | Sequence[str] | None = "decoder"
) -> list[KernelLayer]:
    """The selected layers in graph order; a clear error when the selection is empty."""
    if spec is None:
        spec = "decoder"
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "last":
            decoder = [layer for layer in analysis.layers if layer.group == "decoder"]
            chosen = decoder[-1:]
        elif spec in _GROUP_FILTERS:
            chosen = [layer for layer in analysis.layers if _GROUP_FILTERS[spec](layer)]
        elif spec.startswith(REGEX_PREFIX):
            chosen = _by_pattern(analysis, spec[len(REGEX_PREFIX) :])
        else:
            chosen = _by_names(analysis, [part.strip() for part in spec.split(",") if part])
    else:
        chosen = _by_names(analysis, list(spec))
    if not chosen:
        raise LayerSelectionError(
            f"layer selection {spec!r} matches no kernel layer of this model; run "
            "'segattr inspect MODEL' to see its layers and groups"
        )
    return chosen


def _by_pattern(analysis: ModelAnalysis, pattern: str) -> list[KernelLayer]:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise LayerSelectionError(f"layer pattern {pattern!r} is not a valid regex: {exc}") from exc
    return [
        layer
        for layer in analysis.layers
        if compiled.search(layer.name) or compiled.search(layer.node_name)
    ]


def _by_names(analysis: ModelAnalysis, names: list[str]) -> list[KernelLayer]:
    by_name = {layer.name: layer for layer in analysis.layers}
    by_name.update({layer.node_name: layer for layer in analysis.layers if layer.node_name})
    unknown = [name for name in names if name not in by_name]
    if unknown:
        groups = ", ".join(LAYER_GROUPS)
        raise LayerSelectionError(
            f"no kernel layer named {unknown[0]!r}; give layer names as 'segattr inspect' lists "
            f"them, a group ({groups}) or a pattern 're:REGEX'"
        )
    wanted = {by_name[name].name for name in names}
    return [layer for layer in analysis.layers if layer.name in wanted]

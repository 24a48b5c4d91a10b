"""Choosing which kernel layers a method explains through: by group, by name, or by pattern.

Groups come from the catalogue and are computed for the output being explained
(docs/layer-groups.md): ``decoder`` is every post-bottleneck layer (the head excluded), the
default of every adapted method; ``last`` is the single-layer form, the last kernel layer on the
path to that output before its classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from segattr_onnx.errors import LayerSelectionError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.grouping import OFF_PATH, LayerGrouping
from segattr_onnx.methods.layer_patterns import SafePattern
from segattr_onnx.text import setting

REGEX_PREFIX = "re:"
_GROUP_FILTERS: dict[str, Callable[[str, KernelLayer], bool]] = {
    "decoder": lambda group, layer: group == "decoder",
    "encoder": lambda group, layer: group == "encoder",
    "bottleneck": lambda group, layer: group == "bottleneck",
    "encoder+decoder": lambda group, layer: group in ("encoder", "decoder"),
    "decoder-no-transpose": lambda group, layer: group == "decoder" and layer.op != "ConvTranspose",
    "all": lambda group, layer: True,
}
LAYER_GROUPS = (*_GROUP_FILTERS, "last")


def is_group_selection(spec: str | Sequence[str] | None) -> bool:
    """True when ``spec`` names a group, whose layers depend on the output explained."""
    return spec is None or (isinstance(spec, str) and spec.strip() in LAYER_GROUPS)


def select_layers(
    analysis: ModelAnalysis,
    spec: str | Sequence[str] | None = "decoder",
    output: str | None = None,
) -> list[KernelLayer]:
    """The selected layers in graph order; a clear error when the selection is empty.

    Groups are those of ``output`` (default: the model's primary output)."""
    if spec is None:
        spec = "decoder"
    if isinstance(spec, str):
        spec = spec.strip()
        if spec in LAYER_GROUPS:
            chosen = _by_group(analysis, spec, analysis.grouping(output))
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


def _by_group(analysis: ModelAnalysis, spec: str, grouping: LayerGrouping) -> list[KernelLayer]:
    groups = grouping.groups
    if spec == "last":
        return _last_layer(analysis, grouping)
    chosen = [layer for layer in analysis.layers if _GROUP_FILTERS[spec](groups[layer.name], layer)]
    if not chosen and spec != "all":
        present = sorted({g for g in groups.values() if g != OFF_PATH})
        raise LayerSelectionError(
            f"layer group {spec!r} is empty for output {grouping.output!r} (grouping rule "
            f"{grouping.rule}; its groups: {', '.join(present)}); choose another group, "
            "'last', or layer names as 'segattr inspect' (inspect_model in Python) lists them"
        )
    return chosen


def _last_layer(analysis: ModelAnalysis, grouping: LayerGrouping) -> list[KernelLayer]:
    """The last kernel layer on the path to the output, before the classifier convolutions
    (P1 leaves those out); the classifier itself when nothing else feeds the output."""
    groups = grouping.groups
    on_path = [layer for layer in analysis.layers if groups[layer.name] != OFF_PATH]
    decoder = [layer for layer in on_path if groups[layer.name] == "decoder" and not layer.is_gate]
    features = [layer for layer in on_path if groups[layer.name] != "head" and not layer.is_gate]
    for candidates in (decoder, features, on_path):
        if candidates:
            return candidates[-1:]  # graph order: the one nearest the output
    raise LayerSelectionError(
        f"no kernel layer feeds output {grouping.output!r}; explain another output "
        f"({setting('--output-name', 'Target(output=...)')}) that convolutions compute"
    )


def _by_pattern(analysis: ModelAnalysis, pattern: str) -> list[KernelLayer]:
    compiled = SafePattern(pattern)
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

"""``segattr inspect``: what segattr-onnx sees in a model, as a table or as JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from segattr_onnx.graph.catalogue import ModelAnalysis, analyse_model
from segattr_onnx.graph.grouping import RULE_DESCRIPTIONS
from segattr_onnx.graph.loading import LoadedModel
from segattr_onnx.graph.shapes import parse_shape
from segattr_onnx.runtime.providers import probe_device
from segattr_onnx.text import printable


@dataclass(frozen=True)
class InspectReport:
    """A model's analysis plus the device its sessions would run on."""

    analysis: ModelAnalysis
    provider: str
    output: str | None = None  # whose layer groups are shown; None: the primary output

    def to_dict(self) -> dict:
        data = self.analysis.to_dict()
        data["provider"] = self.provider
        if self.analysis.groupings:
            grouping = self.analysis.grouping(self.output)
            data["grouping"] = grouping.to_dict()
            data["bottleneck"] = grouping.names("bottleneck")
            data["post_bottleneck"] = grouping.names("decoder")
            for layer in data["layers"]:
                layer["group"] = grouping.groups[layer["name"]]
        return data

    def format_table(self) -> str:
        """Human-readable summary: input, outputs, then one row per kernel layer."""
        a = self.analysis
        lines = [
            f"model     {a.model.display_name}",
            f"input     {a.input.name}  shape {_dims(a.input.declared_shape)}  analysed as "
            f"{_dims(a.input.shape)}  layout {a.input.layout}  {a.input.dtype}"
            f"{'' if a.input.dynamic_batch else '  (batch fixed at 1)'}",
        ]
        for output in a.outputs:
            activation = output.activation or "none (logits)"
            lines.append(
                f"output    {output.name}  shape {_dims(output.shape)}  channel axis "
                f"{output.channel_axis}  final activation {activation}"
            )
        lines.append(f"provider  {self.provider}")
        groups = {layer.name: layer.group for layer in a.layers}
        if a.groupings:
            grouping = a.grouping(self.output)
            groups = grouping.groups
            lines.append(
                f"groups    for output {grouping.output}: rule {grouping.rule} "
                f"({RULE_DESCRIPTIONS[grouping.rule]})"
                + (f"; backbone ends at {grouping.backbone_end}" if grouping.backbone_end else "")
            )
        bottleneck = [name for name, group in groups.items() if group == "bottleneck"]
        lines.append(
            f"layers    {len(a.layers)} kernel layers; bottleneck: {', '.join(bottleneck) or '-'}"
        )
        lines.append("")
        headers = ("#", "name", "op", "kernels", "spatial", "group", "depth", "block ends with")
        rows = [
            (
                str(position),
                layer.name,
                layer.op,
                str(layer.kernels),
                "x".join(map(str, layer.spatial_shape)),
                groups[layer.name] + (" (gate)" if layer.is_gate else ""),
                str(layer.depth),
                "+".join(layer.block_ops) or "-",
            )
            for position, layer in enumerate(a.layers)
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
        return "\n".join(printable(line.rstrip()) for line in lines)


def _dims(dims) -> str:
    if dims is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in dims)


def inspect_model(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    input_shape: str | Sequence[int] | None = None,
    provider: str = "auto",
    output: str | None = None,
) -> InspectReport:
    """Analyse a model's kernel layers and groups (those of ``output``, default the primary
    output); see ``InspectReport.to_dict`` for the fields."""
    shape = parse_shape(input_shape) if input_shape is not None else None
    analysis = analyse_model(model, shape)
    if output is not None:
        analysis.grouping(output)  # an unknown output, or one no kernel feeds, is an error now
    return InspectReport(analysis=analysis, provider=probe_device(provider), output=output)

"""``segattr inspect``: what segattr-onnx sees in a model, as a table or as JSON (named so as
not to shadow the standard library's ``inspect``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import onnx

from segattr_onnx.graph.catalogue import ModelAnalysis, analyse_model
from segattr_onnx.graph.grouping import RULE_DESCRIPTIONS
from segattr_onnx.graph.loading import LoadedModel
from segattr_onnx.graph.shapes import parse_shape
from segattr_onnx.runtime.ablation import run_bytes_per_item
from segattr_onnx.runtime.chunks import PROCESS_SLACK
from segattr_onnx.runtime.memory import format_bytes, resident_bytes
from segattr_onnx.runtime.providers import probe_device
from segattr_onnx.text import printable


@dataclass(frozen=True)
class MemoryReport:
    """What the model takes, so a user can choose ``--memory-budget`` before a long run.

    ``pass_bytes`` is the estimate batches are sized with: one more input in a run of the
    whole model. ``resident_bytes`` is what this process holds after loading and analysing
    the model (interpreter included): the floor under any budget.
    """

    weights_bytes: int
    pass_bytes: int | None
    resident_bytes: int | None
    budget_bytes: int | None = None
    items_per_batch: int | None = None  # whole-model runs the budget holds at once

    def describe(self) -> str:
        parts = [f"weights {format_bytes(self.weights_bytes)}"]
        if self.pass_bytes is not None:
            parts.append(f"one input in a run ~{format_bytes(self.pass_bytes)}")
        if self.resident_bytes is not None:
            parts.append(f"this process holds {format_bytes(self.resident_bytes)}")
        if self.budget_bytes is not None:
            fits = (
                f"{self.items_per_batch} input(s) per run"
                if self.items_per_batch
                else "below what the process holds: runs go one at a time"
            )
            parts.append(f"budget {format_bytes(self.budget_bytes)}: {fits}")
        return "; ".join(parts)


def memory_report(analysis: ModelAnalysis, memory_budget: int | None = None) -> MemoryReport:
    """The model's weights, the estimated cost of one input in a whole-model run, what the
    process holds now and, under ``memory_budget`` (whole process), how many inputs fit."""
    proto = analysis.model.proto
    weights = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    weights += _external_bytes(analysis)
    per_item = run_bytes_per_item(proto, analysis.tensors, [analysis.input.name])
    resident = resident_bytes()
    items = None
    if memory_budget is not None and per_item and resident is not None:
        items = max(0, (memory_budget - resident) // math.ceil(per_item * PROCESS_SLACK))
    return MemoryReport(weights, per_item, resident, memory_budget, items)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0  # counted from the files (``_external_bytes``)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = math.prod(tensor.dims) if tensor.dims else 1
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return count * itemsize


def _external_bytes(analysis: ModelAnalysis) -> int:
    total = 0
    for tensor in analysis.model.proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            if "length" in info and info["length"].isdigit():
                total += int(info["length"])
    return total


@dataclass(frozen=True)
class InspectReport:
    """A model's analysis plus the device its sessions would run on."""

    analysis: ModelAnalysis
    provider: str
    output: str | None = None  # whose layer groups are shown; None: the primary output
    memory: MemoryReport | None = None

    def to_dict(self) -> dict:
        data = self.analysis.to_dict()
        data["provider"] = self.provider
        if self.memory is not None:
            data["memory"] = asdict(self.memory)
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
        if self.memory is not None:
            lines.append(f"memory    {self.memory.describe()}")
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
    memory_budget: int | None = None,
) -> InspectReport:
    """Analyse a model's kernel layers and groups (those of ``output``, default the primary
    output) and the memory it takes (under ``memory_budget``, whole-process bytes, how many
    inputs a run holds); see ``InspectReport.to_dict`` for the fields."""
    shape = parse_shape(input_shape) if input_shape is not None else None
    analysis = analyse_model(model, shape)
    if output is not None:
        analysis.grouping(output)  # an unknown output, or one no kernel feeds, is an error now
    return InspectReport(
        analysis=analysis,
        provider=probe_device(provider),
        output=output,
        memory=memory_report(analysis, memory_budget),
    )

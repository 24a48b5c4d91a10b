"""What is being explained: one output, one class, one activation, one region.

Every method and every metric scores predictions through the same ``Target`` (Xplique's habit of
keeping the task apart from the method), so "the segmentation" means the same thing everywhere:
the foreground probability map P of class c, summed over the region R, T(x) = Σ_R P
(docs/algorithms.md §1).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segattr_onnx.arrays import largest_component
from segattr_onnx.errors import SegattrError, TargetError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis, OutputDescription
from segattr_onnx.text import setting

ACTIVATIONS = ("auto", "sigmoid", "softmax", "none")
REGIONS = ("all", "largest-component")  # the regions a config names by word (Region.coerce)


def check_target_table(table: dict, where: str, error: type[SegattrError]) -> None:
    """Refuse a ``[target]`` value (of a model card or an audit config) of the wrong TOML type
    or outside what it allows, naming the key, the value and what is allowed: a quoted number
    or a boolean must never reach ``Target`` (where it fails late, or means something else)."""

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    rules = {
        "class_index": (
            lambda v: whole(v) and v >= 0,
            "a non-negative integer (0, 1, ...), unquoted",
        ),
        "class_axis": (whole, "an integer (1, or -1 for the last axis), unquoted"),
        "output": (lambda v: isinstance(v, str) and v != "", "an output name (a string)"),
        "activation": (
            lambda v: isinstance(v, str) and v in ACTIVATIONS,
            "one of " + ", ".join(repr(a) for a in ACTIVATIONS),
        ),
        "region": (
            lambda v: isinstance(v, str) and v in REGIONS,
            "one of " + ", ".join(repr(r) for r in REGIONS),
        ),
    }
    for key, value in table.items():
        if key in rules and not rules[key][0](value):
            raise error(f"{key} = {value!r} in {where} is not allowed: use {rules[key][1]}")


@dataclass(frozen=True)
class Region:
    """Which voxels of P count: all of them, a given mask, or the predicted mask's largest blob."""

    kind: str = "all"
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    description: str = "all voxels"

    @classmethod
    def all(cls) -> Region:
        return cls()

    @classmethod
    def largest_component(cls) -> Region:
        return cls("largest-component", description="largest connected component of the mask")

    @classmethod
    def from_mask(cls, mask: np.ndarray, description: str = "user mask") -> Region:
        """A region of interest or a ground-truth mask (0/1 or boolean), output's spatial shape."""
        values = np.asarray(mask)
        binary = values.dtype == bool or (
            values.dtype.kind in "biuf" and bool(np.isin(values, (0, 1)).all())
        )
        if not binary:
            raise TargetError(
                f"the region ({description}) must hold only 0 and 1; for a label map "
                f"choose the label with {setting('--region-label', 'Region.from_labels')}"
            )
        return cls("mask", values.astype(bool), description)

    @classmethod
    def from_labels(cls, labels: np.ndarray, value: int) -> Region:
        """The voxels of a label map equal to ``value`` (a ground-truth mask)."""
        return cls.from_mask(np.asarray(labels) == value, f"ground-truth label {value}")

    @classmethod
    def coerce(cls, region: Region | str | np.ndarray | None) -> Region:
        if region is None or isinstance(region, Region):
            return region or cls()
        if isinstance(region, str):
            if region == "all":
                return cls.all()
            if region == "largest-component":
                return cls.largest_component()
            raise TargetError(
                f"region {region!r} is unknown; use 'all', 'largest-component' or a mask array"
            )
        return cls.from_mask(region)


@dataclass(frozen=True)
class Target:
    """The user's choice; ``resolve`` completes it from the model's graph."""

    class_index: int | None = None
    output: str | None = None
    activation: str = "auto"
    region: Region | str | np.ndarray | None = None
    class_axis: int | None = None  # override when the graph does not show it

    def resolve(
        self, analysis: ModelAnalysis, layers: Sequence[KernelLayer] = ()
    ) -> ResolvedTarget:
        """Fix the output, class and activation for this model, with clear errors.

        Without an output name, the output the selected ``layers`` all feed is chosen (deep
        supervision heads do not), the largest when several are.
        """
        output = _pick_output(analysis, self.output, layers)
        if output.shape is None:
            raise TargetError(
                f"the shape of output {output.name!r} is unknown; give the input size "
                f"({setting('--input-shape', 'input_shape=')}) so it can be inferred"
            )
        channel_axis = self._class_axis(analysis, output)
        if channel_axis is not None and not isinstance(output.shape[channel_axis], int):
            raise TargetError(
                f"the number of classes of output {output.name!r} (its axis {channel_axis}) is "
                "unknown: the graph's shapes do not say it; check that the model runs with "
                "onnxruntime on its own"
            )
        classes = 1 if channel_axis is None else int(output.shape[channel_axis])
        class_index = self.class_index
        if class_index is None:
            # One channel is the foreground; with several, channel 0 is conventionally background.
            class_index = 0 if classes == 1 else 1
        if not 0 <= class_index < classes:
            raise TargetError(
                f"class index {class_index} is out of range: output {output.name!r} has "
                f"{classes} class channel(s); pass "
                f"{setting('--class-index', 'Target(class_index=...)')} between 0 and "
                f"{classes - 1}"
            )
        if self.activation not in ACTIVATIONS:
            raise TargetError(
                f"activation {self.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
            )
        activation = self.activation
        if activation == "auto":
            if output.activation is not None:
                activation = "none"  # the graph already ends in Sigmoid/Softmax
            else:
                activation = "sigmoid" if classes == 1 else "softmax"
        if activation == "softmax" and classes == 1:
            raise TargetError(
                f"output {output.name!r} has one channel; softmax over it is always 1 — use "
                "activation 'sigmoid' or 'none'"
            )
        exclusive = activation == "softmax" or (
            activation == "none" and output.activation == "softmax"
        )
        return ResolvedTarget(
            output=output.name,
            channel_axis=channel_axis,
            classes=classes,
            class_index=class_index,
            activation=activation,
            exclusive_classes=exclusive,
            region=Region.coerce(self.region),
        )

    def _class_axis(self, analysis: ModelAnalysis, output: OutputDescription) -> int | None:
        """The class axis: the user's, the graph's, else the input's layout convention."""
        rank = len(output.shape or ())
        if self.class_axis is not None:
            # A plain int: numpy's integers would otherwise travel into head specs and keys.
            axis = int(self.class_axis) + rank if self.class_axis < 0 else int(self.class_axis)
            if not 0 < axis < rank:
                raise TargetError(
                    f"class axis {self.class_axis} does not exist in output {output.name!r} of "
                    f"rank {rank}; give an axis between 1 and {rank - 1}"
                )
            return axis
        if output.channel_axis is not None:
            return output.channel_axis
        spatial = len(analysis.input.spatial_shape)
        if rank == spatial + 1:
            return None  # (N, *S): one foreground map with the class axis squeezed away
        if rank == spatial + 2:
            # The graph does not show it (e.g. a Reshape after the head): assume the output is
            # laid out like the input, and say so.
            axis = 1 if analysis.input.channel_axis in (None, 1) else rank - 1
            warnings.warn(
                f"the class axis of output {output.name!r} is not visible in the graph; "
                f"assuming axis {axis} like the input's layout (pass "
                f"{setting('--class-axis', 'Target(class_axis=...)')} to set it)",
                stacklevel=3,
            )
            return axis
        raise TargetError(
            f"output {output.name!r} has shape {output.shape}, which is not (N, classes, "
            "*spatial), (N, *spatial, classes) or (N, *spatial); pass "
            f"{setting('--output-name', 'Target(output=...)')} to explain another output"
        )


def default_output(analysis: ModelAnalysis) -> str:
    """The output explained when the user names none and selects layers by group: the
    segmentation-shaped output the most kernel layers feed (deep-supervision side outputs are
    fed by fewer), the largest on ties, with a warning naming the others."""
    if analysis.primary_output is None:
        raise TargetError("no output of the model is computed by a convolution; nothing to explain")
    if analysis.primary_ties:
        others = ", ".join(repr(name) for name in analysis.primary_ties)
        verb = "qualifies" if len(analysis.primary_ties) == 1 else "qualify"
        warnings.warn(
            f"explaining output {analysis.primary_output!r}, the largest of the outputs the most "
            f"kernel layers feed; {others} also {verb} — pass "
            f"{setting('--output-name', 'Target(output=...)')} to choose",
            stacklevel=3,
        )
    return analysis.primary_output


def _pick_output(
    analysis: ModelAnalysis, name: str | None, layers: Sequence[KernelLayer]
) -> OutputDescription:
    names = ", ".join(o.name for o in analysis.outputs)
    if name is not None:
        for output in analysis.outputs:
            if output.name == name:
                return output
        raise TargetError(f"the model has no output {name!r}; its outputs are: {names}")
    if len(analysis.outputs) == 1:
        return analysis.outputs[0]
    if not layers and analysis.primary_output is not None:
        return _pick_output(analysis, default_output(analysis), layers)
    index = analysis.index
    reach = {layer.name: index.descendant_nodes([layer.output]) for layer in layers}

    def fed_by(output: OutputDescription) -> int:
        producer = index.producer.get(output.name)
        return sum(producer in descendants for descendants in reach.values())

    def size(output: OutputDescription) -> int:
        dims = [d for d in (output.shape or ()) if isinstance(d, int)]
        return int(np.prod(dims)) if dims else 0

    if layers and max(fed_by(o) for o in analysis.outputs) == 0:
        raise TargetError(
            f"no output of the model depends on the selected layers; choose the output with "
            f"{setting('--output-name', 'Target(output=...)')} ({names}) and layers that feed it"
        )
    # Most selected layers feeding it, then the largest: the main head of deep supervision.
    most = max(fed_by(o) for o in analysis.outputs)
    candidates = [o for o in analysis.outputs if fed_by(o) == most]
    chosen = max(candidates, key=size)
    if len(candidates) > 1:
        others = ", ".join(repr(o.name) for o in candidates if o is not chosen)
        warnings.warn(
            f"explaining output {chosen.name!r}, the largest the selected layers feed; "
            f"{others} also qualif{'ies' if len(candidates) == 2 else 'y'} — pass "
            f"{setting('--output-name', 'Target(output=...)')} to choose",
            stacklevel=3,
        )
    return chosen


@dataclass(frozen=True)
class ResolvedTarget:
    """A target bound to one model's output: turns raw outputs into P and P into scores."""

    output: str
    channel_axis: int | None  # None: the output is (N, *S), one foreground map
    classes: int
    class_index: int
    activation: str  # what segattr-onnx applies: "sigmoid", "softmax" or "none"
    exclusive_classes: bool  # softmax classes (argmax masks) rather than independent sigmoids
    region: Region

    def probabilities(self, output: np.ndarray) -> np.ndarray:
        """P for each batch row: (N, *S) float32 from the raw output (N, …) in its own layout."""
        values = np.asarray(output)
        if values.dtype != np.float32:
            values = values.astype(np.float32)
        if self.channel_axis is None:
            values = values[:, None]
        else:
            values = np.moveaxis(values, self.channel_axis, 1)
        channel = values[:, self.class_index]
        if self.activation == "softmax":
            # softmax_c = 1 / Σ_j exp(l_j − l_c): one exp pass, and an overflow to inf gives the
            # right limit 0 rather than NaN.
            with np.errstate(over="ignore", invalid="ignore"):  # NaN is caught by the caller
                total = np.exp(values - channel[:, None]).sum(axis=1)
            return np.reciprocal(total)
        if self.activation == "sigmoid":
            with np.errstate(over="ignore"):
                return np.reciprocal(1.0 + np.exp(-channel))
        return np.array(channel)

    def region_mask(self, output: np.ndarray) -> np.ndarray | None:
        """R for one case as a boolean array of P's shape, or None for all voxels."""
        probabilities = self.probabilities(output)[0]
        region = self.region
        if region.kind == "all":
            return None
        if region.kind == "mask":
            assert region.mask is not None
            mask = np.squeeze(region.mask) if region.mask.ndim > probabilities.ndim else region.mask
            if mask.shape != probabilities.shape:
                raise TargetError(
                    f"the region mask has shape {region.mask.shape} but the prediction of "
                    f"{self.output!r} has spatial shape {probabilities.shape}; give a mask of "
                    "that shape"
                )
            chosen = mask
        else:
            chosen = largest_component(self.mask_of_class(output))
        if not chosen.any():
            raise TargetError(
                f"the target region ({region.description}) is empty for class "
                f"{self.class_index}: there is nothing to explain; pick another class or region"
            )
        return chosen

    def mask_of_class(self, output: np.ndarray) -> np.ndarray:
        """The predicted mask of one case from the raw output (batch axis first, in the
        output's own layout): argmax for exclusive (softmax) classes, P ≥ 0.5 otherwise, so
        nested multi-label channels (sigmoid per class) keep their own masks. Public because
        a model comparison takes the Dice of two models' masks, which must mean the same."""
        if self.exclusive_classes and self.channel_axis is not None:
            values = np.moveaxis(np.asarray(output), self.channel_axis, 1)[0]
            return np.argmax(values, axis=0) == self.class_index
        return self.probabilities(output)[0] >= 0.5

    def describe(self) -> dict:
        return {
            "output": self.output,
            "class_index": self.class_index,
            "activation": self.activation,
            "region": self.region.description,
        }


def region_sum(probabilities: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """Σ_R over the spatial axes for each batch row of (K, *S) probabilities, in float64."""
    rows = probabilities.reshape(len(probabilities), -1)
    if region is not None:
        rows = rows[:, region.reshape(-1)]
    return rows.sum(axis=1, dtype=np.float64)

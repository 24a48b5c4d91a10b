"""The result of explaining one case: the map, what it was made from, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segattr_onnx.arrays import upsample


@dataclass(frozen=True)
class LayerAttribution:
    """One layer's kernel weights (with the terms they came from) and its map M_ℓ."""

    layer: str
    group: str
    weights: np.ndarray  # (C,)
    terms: dict[str, np.ndarray]  # KWC: "dependent", "independent"; CAMs: "scores"
    map: np.ndarray  # M_ℓ at the layer's own spatial size


@dataclass(frozen=True)
class RunRecord:
    """One planned batch of work: what ran, on which (sub-)graph, how many passes and runs."""

    purpose: str  # "observation", "observation+gradient", "gradient", "prefix", "ablation", ...
    # "masked-input"
    layer: str | None
    graph: str  # "full", "observed" (full model, extra outputs), "boundary" (up to the layer
    # only: the inputs a suffix needs), "suffix" (only what follows the layer) or "linear"
    # (only what follows the layer's first readers, whose outputs come from its contributions)
    graph_nodes: int
    passes: int  # forward passes (items) through that graph
    session_runs: int  # ONNX Runtime run calls (chunks, plus layer_runs)
    batch_size: int
    reused_rows: int = 0  # rows taken from an earlier explanation of the same case
    skipped_windows: int = 0  # sliding windows not re-run: they do not touch the region
    layer_runs: int = 0  # runs besides the chunks of rows: a linear tail's readers (Y(1) and
    # B) and each reader's contributions, once per group of channels; the part of the graph no
    # row reaches (a skip half), once


@dataclass(frozen=True)
class Explanation:
    """Which input regions made the model draw its mask, by one method on one case."""

    map: np.ndarray  # float32 in [0, 1], the input's spatial shape (H, W) or (D, H, W)
    method: str
    variant: str
    layers: tuple[LayerAttribution, ...]
    target: dict
    base_score: float  # S0 = T(x)
    prediction: np.ndarray = field(repr=False)  # P of the unmodified input
    runs: tuple[RunRecord, ...] = ()
    seconds: float = 0.0
    provider: str = "cpu"
    # The input-gradient methods' signed per-voxel attributions, (C_in, *S) float32 in the
    # input's channels-first order; None for the layer methods, whose evidence is per kernel.
    attributions: np.ndarray | None = field(default=None, repr=False)

    @property
    def layer_names(self) -> list[str]:
        return [layer.layer for layer in self.layers]

    @property
    def layer_maps(self) -> dict[str, np.ndarray]:
        return {layer.layer: layer.map for layer in self.layers}

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return {layer.layer: layer.weights for layer in self.layers}

    @property
    def forward_passes(self) -> int:
        return sum(run.passes for run in self.runs)

    @property
    def session_runs(self) -> int:
        return sum(run.session_runs for run in self.runs)

    def upsampled_layer_map(self, layer: str) -> np.ndarray:
        """up(M_ℓ) at the input's spatial size, for overlays of a single layer."""
        return upsample(self.layer_maps[layer], self.map.shape)

    def summary(self) -> dict:
        """The JSON shape of ``segattr explain --json``."""
        return {
            "method": self.method,
            "variant": self.variant,
            "layers": self.layer_names,
            "target": self.target,
            "base_score": self.base_score,
            "forward_passes": self.forward_passes,
            "session_runs": self.session_runs,
            # of which once per layer, besides the chunks of rows (linear tails)
            "layer_runs": sum(run.layer_runs for run in self.runs),
            "seconds": round(self.seconds, 4),
            "provider": self.provider,
            "map_shape": list(self.map.shape),
        }

"""The peer KWC: the straightforward torch implementation segattr-onnx is measured against.

This is how KWC is written when one has the source model (the authors' generic path): to
remove kernel k, edit the weights so the kernel's block outputs zero, re-run the whole model,
restore the weights; once per kernel for the dependent contribution and once per kernel for the
independent one (every other kernel removed). Weight edits cannot be batched (a batch shares
its weights), so it makes 1 + Σ 2·C_ℓ full forward passes, one at a time.

The formulas are those of docs/algorithms.md §3 (P2 form), computed in float64 like segattr-onnx's
in-graph reductions, so the two can be compared number for number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from unet import ConvBlock, UNet


@dataclass
class KwcLayer:
    name: str
    dependent: np.ndarray
    independent: np.ndarray
    weights: np.ndarray
    map: np.ndarray


@dataclass
class KwcResult:
    map: np.ndarray
    layers: list[KwcLayer]
    forward_passes: int


def decoder_kernel_layers(model: UNet) -> list[tuple[str, nn.Module, ConvBlock | None]]:
    """(ONNX node name, kernel module, its block) for every post-bottleneck kernel layer.

    The names are the TorchScript exporter's, so results line up with segattr-onnx's layers.
    """
    layers: list[tuple[str, nn.Module, ConvBlock | None]] = []
    for index, decoder in enumerate(model.decoders):
        layers.append((f"/decoders.{index}/up/ConvTranspose", decoder.up, None))
        for b, block in enumerate(decoder.blocks):
            name = f"/decoders.{index}/blocks/blocks.{b}/conv/Conv"
            layers.append((name, block.conv, block))
    return layers


def _kernel_parameters(
    kernel: nn.Module, block: ConvBlock | None
) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel axis) pairs that, zeroed for channel k, make the block output 0 there.

    Conv: weight and bias give a zero raw output; InstanceNorm then outputs its shift β_k, so β_k
    is zeroed too, and ReLU(0) = 0. ConvTranspose keeps its output channels on axis 1.
    """
    axis = 1 if isinstance(kernel, nn.modules.conv._ConvTransposeNd) else 0
    pairs = [(kernel.weight, axis), (kernel.bias, 0)]
    if block is not None:
        pairs.append((block.norm.bias, 0))
    return pairs


class _Ablated:
    """Zeroes the kernels where ``keep`` is False for the duration of a ``with`` block."""

    def __init__(self, kernel: nn.Module, block: ConvBlock | None, keep: np.ndarray) -> None:
        self.pairs = _kernel_parameters(kernel, block)
        self.remove = torch.from_numpy(~keep)
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> None:
        for tensor, axis in self.pairs:
            self.saved.append(tensor.detach().clone())
            view = tensor.data.movedim(axis, 0)
            view[self.remove] = 0

    def __exit__(self, *exc: object) -> None:
        for (tensor, _), saved in zip(self.pairs, self.saved, strict=True):
            tensor.data.copy_(saved)


def kwc_by_weight_editing(
    model: UNet,
    x: torch.Tensor,
    class_index: int,
    region: np.ndarray,
    progress: Callable[[], None] | None = None,
) -> KwcResult:
    """KWC P2 over the decoder layers, by editing weights and re-running the whole model."""
    layers = decoder_kernel_layers(model)
    activations: dict[str, torch.Tensor] = {}
    hooks = [
        kernel.register_forward_hook(
            lambda _m, _i, out, name=name: activations.__setitem__(name, out.detach())
        )
        for name, kernel, _ in layers
    ]
    passes = 0

    def predict() -> np.ndarray:
        nonlocal passes
        passes += 1
        if progress is not None:
            progress()
        with torch.no_grad():
            return model(x)[0, class_index].double().numpy()

    inside = region.astype(bool)
    try:
        p = predict()
    finally:
        for hook in hooks:
            hook.remove()
    p_region = p[inside]
    s0 = p_region.sum()
    results: list[KwcLayer] = []
    total = np.zeros(x.shape[2:], dtype=np.float64)
    for name, kernel, block in layers:
        channels = activations[name].shape[1]
        dependent = np.empty(channels)
        independent = np.empty(channels)
        for k in range(channels):
            drop_k = np.ones(channels, dtype=bool)
            drop_k[k] = False
            with _Ablated(kernel, block, drop_k):
                p_without = predict()[inside]
            with _Ablated(kernel, block, ~drop_k):
                p_alone = predict()[inside]
            dependent[k] = np.maximum(p_region - p_without, 0).sum()
            independent[k] = np.minimum(p_alone, p_region).sum()
        weights = dependent * independent / s0
        magnitude = activations[name][0].double().abs()
        layer_map = torch.einsum("k,k...->...", torch.from_numpy(weights), magnitude)
        layer_map = layer_map / magnitude.max()
        results.append(KwcLayer(name, dependent, independent, weights, layer_map.numpy()))
        total += _upsample(layer_map, tuple(x.shape[2:]))
    return KwcResult(total / total.max(), results, passes)


def _upsample(layer_map: torch.Tensor, size: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation with half-pixel centres (torch's align_corners=False)."""
    if tuple(layer_map.shape) == size:
        return layer_map.numpy()
    mode = "bilinear" if len(size) == 2 else "trilinear"
    resized = nn.functional.interpolate(
        layer_map[None, None], size=size, mode=mode, align_corners=False
    )
    return resized[0, 0].numpy()

"""The benchmark model: one torch U-Net, used as torch by the peers and as ONNX by segattr-onnx.

Every comparison in ``benchmarks/`` runs on the same weights: the peers (pytorch-grad-cam, the
weight-editing torch KWC) on this module, segattr-onnx on its ONNX export. The architecture is
the classic one (two conv blocks per level, ConvTranspose up-sampling, skip concatenation,
1×1 head, softmax), with InstanceNorm as in nnU-Net and MONAI, because a Conv's raw output
is then the same tensor in torch and in the exported graph (BatchNorm would be folded into the
Conv on export), so layer activations can be compared across the two.

Each block owns its ReLU module, so a tool that swaps one module (pytorch-grad-cam's
AblationLayer) changes one block only. Benchmark-only: torch is never a runtime dependency.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
WIDTHS = {2: (8, 16, 32, 64), 3: (4, 8, 16, 32)}


class ConvBlock(nn.Module):
    """conv3 → InstanceNorm (affine) → ReLU."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        self.conv = conv(cin, cout, kernel_size=3, padding=1, bias=True)
        self.norm = norm(cout, affine=True)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def double_block(dims: int, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ConvBlock(dims, cin, cout), ConvBlock(dims, cout, cout))


class Up(nn.Module):
    """ConvTranspose ×2, concatenate the skip, two conv blocks."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        tconv = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.up = tconv(cin, cout, kernel_size=2, stride=2, bias=True)
        self.blocks = double_block(dims, 2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net over ``widths`` (the last is the bottleneck), ``n_classes`` softmax channels."""

    def __init__(
        self, dims: int, in_channels: int = 1, n_classes: int = 2, widths: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        widths = widths or WIDTHS[dims]
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        head = nn.Conv2d if dims == 2 else nn.Conv3d
        self.encoders = nn.ModuleList()
        cin = in_channels
        for width in widths:
            self.encoders.append(double_block(dims, cin, width))
            cin = width
        self.pool = pool(2)
        self.decoders = nn.ModuleList(
            Up(dims, wide, narrow)
            for wide, narrow in zip(widths[::-1][:-1], widths[::-1][1:], strict=True)
        )
        self.head = head(widths[0], n_classes, kernel_size=1)
        self.final = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, encoder in enumerate(self.encoders):
            x = encoder(x if index == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.final(self.head(x))


def make_unet(dims: int, seed: int = 0, widths: tuple[int, ...] = ()) -> UNet:
    """A seeded U-Net in eval mode whose outputs vary over the image.

    He-normal kernels keep activations from shrinking layer after layer (torch's default init
    left the softmax near 0.5 everywhere, so every attribution would be flat).
    """
    torch.manual_seed(seed)
    model = UNet(dims, widths=widths)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                module.bias.normal_(0.0, 0.1)
            if isinstance(module, nn.modules.instancenorm._InstanceNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def export_onnx(model: UNet, dims: int, path: Path, opset: int = 17) -> Path:
    """TorchScript export with a free batch and free spatial dims (one file serves every size)."""
    size = 64 if dims == 2 else 32
    sample = torch.zeros((1, 1, *([size] * dims)))
    spatial = {0: "batch", **{2 + i: f"s{i}" for i in range(dims)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: spatial, OUTPUT_NAME: spatial},
        )
    return path


def make_case(dims: int, size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image: blobs the U-Net responds to unevenly, unlike white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, *([max(size // 8, 2)] * dims)), generator=generator)
    mode = "bilinear" if dims == 2 else "trilinear"
    smooth = nn.functional.interpolate(coarse, size=(size,) * dims, mode=mode)
    noise = 0.1 * torch.randn(smooth.shape, generator=generator)
    return (smooth + noise).float()


if __name__ == "__main__":  # quick look: export both and print node counts
    import onnx

    for d in (2, 3):
        out = export_onnx(make_unet(d), d, Path(f"/tmp/bench_unet{d}d.onnx"))
        print(out, len(onnx.load(str(out)).graph.node), "nodes")

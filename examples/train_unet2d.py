"""Train the bundled example model: a small 2D U-Net that segments spiked nodules only.

The task is the one of docs/algorithms.md §6: every image holds four blob-shaped nodules, and only
those carrying cone-shaped spikes are the target (label 3); unspiked ones (label 1) are
distractors and the spikes themselves (label 2) are background a good explanation should still
point at. The network must therefore look at the spikes to decide, which is what makes the
synthetic set a test of attribution methods.

Run (needs ``pip install torch==2.13.0``; the package itself never imports torch)::

    python examples/train_unet2d.py --out segattr_onnx/data/unet2d_synthetic.onnx

Prints the Dice on held-out seeds (never used for training) and exports to ONNX with free
batch and spatial dims.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segattr_onnx.synthetic import make_case

TRAIN_SEEDS = range(10_000, 10_000 + 600)
HELD_OUT_SEEDS = range(90_000, 90_000 + 50)


class Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class UNet2D(nn.Module):
    """Three levels, 8-16-32 channels (plus a 64-channel bottleneck): ~120k parameters."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = Block(1, w), Block(w, 2 * w), Block(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = Block(4 * w, 8 * w)
        self.up3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec3 = Block(8 * w, 4 * w)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = Block(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = Block(2 * w, w)
        self.head = nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)  # logits of (background, spiked nodule)


def dataset(seeds: range, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, targets = [], []
    for seed in seeds:
        case = make_case(seed, dim=2, size=size)
        images.append(case.image[None])
        targets.append((case.labels == 3).astype(np.int64))
    return np.stack(images).astype(np.float32), np.stack(targets)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    overlap = float((prediction & truth).sum())
    return 2 * overlap / max(float(prediction.sum() + truth.sum()), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="segattr_onnx/data/unet2d_synthetic.onnx")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    x_train, y_train = dataset(TRAIN_SEEDS, args.size)
    x_test, y_test = dataset(HELD_OUT_SEEDS, args.size)
    print(
        f"data: {len(x_train)} train, {len(x_test)} held out, {time.perf_counter() - started:.0f} s"
    )

    model = UNet2D()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=args.epochs * (len(x_train) // args.batch)
    )
    weights = torch.tensor([1.0, 3.0])  # the target is a small share of the image
    rng = np.random.default_rng(0)
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(x_train))
        total = 0.0
        for start in range(0, len(order) - args.batch + 1, args.batch):
            rows = order[start : start + args.batch]
            images = torch.from_numpy(x_train[rows])
            targets = torch.from_numpy(y_train[rows])
            if rng.random() < 0.5:  # flips keep the task's statistics
                images, targets = images.flip(-1), targets.flip(-1)
            logits = model(images)
            probability = logits.softmax(1)[:, 1]
            overlap = (probability * targets).sum((1, 2))
            soft_dice = 1 - (2 * overlap + 1) / (probability.sum((1, 2)) + targets.sum((1, 2)) + 1)
            loss = nn.functional.cross_entropy(logits, targets, weight=weights) + soft_dice.mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
        held_out = evaluate(model, x_test, y_test)
        elapsed = time.perf_counter() - started
        print(
            f"epoch {epoch + 1:2d}  loss {total:.3f}  held-out Dice {held_out:.3f}  {elapsed:.0f} s"
        )

    model.eval()
    final = evaluate(model, x_test, y_test)
    print(f"held-out Dice over {len(x_test)} seeds: {final:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        torch.from_numpy(x_test[:1]),
        args.out,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"},
        },
        opset_version=17,
        dynamo=False,
    )
    print(f"exported {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")


def evaluate(model: nn.Module, images: np.ndarray, targets: np.ndarray) -> float:
    """Mean Dice of the argmax mask over the held-out cases."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    predicted = logits.argmax(1) == 1
    return float(
        np.mean([dice(p, t.astype(bool)) for p, t in zip(predicted, targets, strict=True)])
    )


if __name__ == "__main__":
    main()

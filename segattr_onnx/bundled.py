"""The example model shipped with the package, so every command can be tried right away.

A small 2D U-Net trained on the synthetic set of docs/algorithms.md §6 to segment the spiked
nodules only (``examples/train_unet2d.py``; the package never imports torch). Its input is one
channel of the synthetic image, any size divisible by 8; its output, two-class logits.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLE_MODEL = Path(__file__).parent / "data" / "unet2d_synthetic.onnx"
EXAMPLE_HELD_OUT_SEEDS = range(90_000, 90_050)  # never used in training


def example_model_path() -> Path:
    """Path of the bundled trained 2D U-Net (ONNX)."""
    return EXAMPLE_MODEL

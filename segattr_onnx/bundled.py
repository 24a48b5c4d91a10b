"""The example models shipped with the package, so every command can be tried right away.

Small U-Nets trained on the synthetic set of docs/algorithms.md §6 to segment the spiked
nodules only (``examples/train_unet2d.py``, ``examples/train_unet3d.py``; the package never
imports torch). Input: one channel of the synthetic image, any size divisible by 8 (the 3D one
was trained at 32³ only); output: two-class logits.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLE_MODEL = Path(__file__).parent / "data" / "unet2d_synthetic.onnx"
EXAMPLE_HELD_OUT_SEEDS = range(90_000, 90_050)  # never used in training
EXAMPLE_3D_MODEL = Path(__file__).parent / "data" / "unet3d_synthetic.onnx"
EXAMPLE_3D_SIZE = 32  # the volume size it was trained at
EXAMPLE_3D_HELD_OUT_SEEDS = range(90_000, 90_020)  # neither trained on nor used to pick an epoch


def example_model_path() -> Path:
    """Path of the bundled trained 2D U-Net (ONNX)."""
    return EXAMPLE_MODEL


def example_3d_model_path() -> Path:
    """Path of the bundled trained 3D U-Net (ONNX), for 32³ synthetic volumes."""
    return EXAMPLE_3D_MODEL

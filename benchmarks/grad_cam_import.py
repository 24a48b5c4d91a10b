"""Importing pytorch-grad-cam where torchvision's compiled operators cannot load.

PyPI's torchvision for torch 2.13 is linked against the CUDA build of torch; beside the CPU
build (the one the benchmarks pin), ``import torchvision`` fails ("operator torchvision::nms
does not exist"). pytorch-grad-cam imports torchvision at package import, but only uses it for
image pre-processing helpers and detection targets, neither of which the benchmarks call. So,
only when the real import fails, a stand-in module with those names is registered; using one of
them raises, so nothing can silently depend on it.
"""

from __future__ import annotations

import sys
import types


def _unavailable(name: str):
    def stand_in(*_args, **_kwargs):
        raise RuntimeError(f"torchvision.{name} is unavailable here (CPU torch, CUDA torchvision)")

    return stand_in


def _install_stand_in() -> None:
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]
    root = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    for name in ("Compose", "Normalize", "ToTensor"):
        setattr(transforms, name, _unavailable(f"transforms.{name}"))
    functional.resize = _unavailable("transforms.functional.resize")
    ops.box_iou = _unavailable("ops.box_iou")
    transforms.functional = functional
    root.transforms, root.ops = transforms, ops
    sys.modules.update(
        {
            "torchvision": root,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
        }
    )


def import_grad_cam() -> types.ModuleType:
    """``pytorch_grad_cam``, importable with or without a working torchvision."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch raises RuntimeError or OSError
        _install_stand_in()
    import pytorch_grad_cam

    return pytorch_grad_cam

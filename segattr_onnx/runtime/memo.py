"""What one case has already computed, so another method (or a second call) reuses it.

Ablation rows are kept by what produced them (layer, form, statistic, suffix or full graph) and
then by the mask row; gradients by layer. A case is its input's bytes, its resolved target and
the Glorot seed; the explainer keeps the latest case's memo only, so memory stays bounded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from segattr_onnx.target import ResolvedTarget

if TYPE_CHECKING:
    from segattr_onnx.methods.base import AblationRequest
    from segattr_onnx.runtime.observation import Observation


@dataclass
class CaseMemo:
    """Statistic rows already computed for one case, keyed by what produced them."""

    key: tuple
    rows: dict[tuple, dict[bytes, np.ndarray]] = field(default_factory=dict)
    gradients: dict[str, np.ndarray] = field(default_factory=dict)  # layer → ∂T/∂A_ℓ
    # The backward graph's observations, by layer selection: a later gradient method on the
    # same layers reuses the very activations its gradients came with (a forward pass through
    # another graph rounds them differently, by up to float16's rounding on an fp16 model).
    observations: dict[tuple[str, ...], Observation] = field(default_factory=dict)


def case_key(x: np.ndarray, target: ResolvedTarget, seed: int) -> tuple:
    """Identifies a case for the memo: the input's bytes, the target and the Glorot seed."""
    region = target.region
    region_digest = (
        hashlib.sha1(np.ascontiguousarray(region.mask).tobytes()).hexdigest()
        if region.mask is not None
        else None
    )
    digest = hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()
    return (
        x.shape,
        str(x.dtype),
        digest,
        target.output,
        target.channel_axis,
        target.class_index,
        target.activation,
        target.exclusive_classes,
        region.kind,
        region_digest,
        seed,
    )


def ablation_key(request: AblationRequest, use_suffix: bool) -> tuple:
    """Which of ``CaseMemo.rows`` an ablation request's rows are kept in."""
    return (request.layer, request.form, request.statistic.name, use_suffix)


def row_keys(masks: np.ndarray) -> list[bytes]:
    """Each mask row's key within its request's rows: the kernels it keeps."""
    binary = (np.asarray(masks) != 0).astype(np.uint8)
    return [row.tobytes() for row in binary]

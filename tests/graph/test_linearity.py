"""The readers of a layer's blended output are linear in its kernel mask: Y(m) = Σ_c m_c K_c + B,
with K_c from one grouped convolution of Z. Checked against the rewritten model itself, run with
the mask: any mask, every "drop k" and every "keep only k" row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from segattr_onnx import Explainer
from segattr_onnx.graph.linearity import (
    CONTRIBUTION_SOURCE,
    CONTRIBUTION_WEIGHTS,
    ROWS_BASE,
    contributions_model,
    grouped_weights,
    linear_reads,
)
from segattr_onnx.graph.rewrite import insert_ablation
from segattr_onnx.methods.layers import select_layers
from tests.conftest import assert_close, fixture, run_reference

FIXTURES = ["unet2d_torchscript", "unet3d", "unet2d_dynamo"]


def _run(model: onnx.ModelProto, feeds: dict, outputs: list[str], elem_type: int, base_dir=None):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in outputs:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    names = [o.name for o in exposed.graph.output]
    values = run_reference(exposed, feeds, base_dir)
    return [values[names.index(name)] for name in outputs]


@pytest.mark.parametrize("name", FIXTURES)
def test_readers_outputs_are_the_sum_of_per_channel_contributions(name: str) -> None:
    fx = fixture(name)
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    analysis = explainer.analysis(x.shape)
    base_dir = explainer.model.external_data_dir
    rng = np.random.default_rng(1)
    linear_layers = 0
    for layer in select_layers(analysis, "decoder"):
        model, site = insert_ablation(analysis, layer.name, form="block")
        reads = linear_reads(model, site)
        if reads is None:
            continue
        linear_layers += 1
        channels = site.channels
        keep_all = site.masks_to_feed(np.ones((1, channels)))
        for read in reads:
            z, full = _run(model, {"image": x, site.mask_input: keep_all},
                           [site.source, read.output], site.elem_type, base_dir)  # fmt: skip
            weights = grouped_weights(model, site, read, base_dir and str(base_dir))
            outputs = full.shape[1]
            values = full.size
            grouped = contributions_model(model, site, read, channels, values)
            flat = full.reshape(1, values).astype(np.float32)
            # With a zero base and the weights as they are, the rows are the contributions
            # K_c themselves; with Y(1) and the weights negated, the "drop c" rows.
            (contributions,) = run_reference(grouped, {CONTRIBUTION_SOURCE: z,
                CONTRIBUTION_WEIGHTS: weights, ROWS_BASE: np.zeros_like(flat)})  # fmt: skip
            (dropped,) = run_reference(grouped, {CONTRIBUTION_SOURCE: z,
                CONTRIBUTION_WEIGHTS: -weights, ROWS_BASE: flat})  # fmt: skip
            contributions = contributions.astype(np.float64).reshape(channels, outputs, -1)
            dropped = dropped.astype(np.float64).reshape(channels, outputs, -1)
            full = full.astype(np.float64).reshape(full.shape[1], -1)
            rest = full - contributions.sum(axis=0)  # bias and the Concat's other inputs
            masks = np.vstack(
                [rng.integers(0, 2, (2, channels)), 1 - np.eye(channels), np.eye(channels)]
            )
            (ablated,) = _run(model, {"image": np.repeat(x, len(masks), 0),
                                      site.mask_input: site.masks_to_feed(masks)},
                              [read.output], site.elem_type, base_dir)  # fmt: skip
            ablated = ablated.astype(np.float64).reshape(len(masks), full.shape[0], -1)
            predicted = np.einsum("kc,cov->kov", masks, contributions) + rest
            what = f"{name} {layer.name} → {read.node}"
            assert_close(predicted, ablated, 1e-5, what)
            for k in range(channels):  # the engine's two row forms, without the sum
                assert_close(full - contributions[k], ablated[2 + k], 1e-5, f"{what} drop {k}")
                assert_close(dropped[k], ablated[2 + k], 1e-5, f"{what} formed drop {k}")
                keep = contributions[k] + rest
                assert_close(keep, ablated[2 + channels + k], 1e-5, f"{what} keep {k}")
    assert linear_layers >= 2, f"{name}: only {linear_layers} decoder layers read linearly"


def test_a_reader_that_is_not_a_convolution_makes_the_site_non_linear() -> None:
    """The first decoder layer's output, read linearly by the next convolution, is also read
    by a Relu added here: the site is no longer linear. P1's random kernels never are."""
    fx = fixture("unet2d_torchscript")
    analysis = Explainer(fx.path, provider="cpu").analysis(fx.input(0).shape)
    layer = select_layers(analysis, "decoder")[0]
    model, site = insert_ablation(analysis, layer.name, form="block")
    assert linear_reads(model, site) is not None  # its only reader is the next convolution
    extra = helper.make_node("Relu", [site.blended], ["side"])
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("side", 1, None))
    assert linear_reads(model, site) is None
    _, raw_site = insert_ablation(analysis, layer.name, form="raw")
    assert linear_reads(model, raw_site) is None  # P1 blends with random kernels: not linear

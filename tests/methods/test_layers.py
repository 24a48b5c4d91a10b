"""Layer selection: groups, the single last layer, exact names and regex patterns."""

from __future__ import annotations

import pytest

from segattr_onnx.errors import LayerSelectionError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.methods.layers import select_layers
from tests.conftest import MANIFEST, fixture


@pytest.fixture(scope="module")
def analysis():
    spec = fixture("unet2d_torchscript")
    return analyse_model(str(spec.path), spec.test_shape)


def _modules(layers) -> list[str]:
    by_node = {entry["onnx_node"]: entry["module"] for entry in _manifest_layers()}
    return [by_node[layer.node_name] for layer in layers]


def _manifest_layers():
    return MANIFEST["unet2d_torchscript"]["kernel_layers"]


@pytest.mark.parametrize(
    ("spec", "modules"),
    [
        (
            "decoder",
            [
                "up1.up",
                "up1.blocks.0.conv",
                "up1.blocks.1.conv",
                "up2.up",
                "up2.blocks.0.conv",
                "up2.blocks.1.conv",
            ],
        ),
        (
            "decoder-no-transpose",
            ["up1.blocks.0.conv", "up1.blocks.1.conv", "up2.blocks.0.conv", "up2.blocks.1.conv"],
        ),
        ("encoder", ["enc1.0.conv", "enc1.1.conv", "enc2.0.conv", "enc2.1.conv"]),
        ("bottleneck", ["bottleneck.0.conv", "bottleneck.1.conv"]),
        ("last", ["up2.blocks.1.conv"]),
    ],
)
def test_groups_select_the_manifest_layers(analysis, spec: str, modules: list[str]) -> None:
    assert _modules(select_layers(analysis, spec)) == modules


def test_encoder_plus_decoder_is_both_groups_in_graph_order(analysis) -> None:
    chosen = select_layers(analysis, "encoder+decoder")
    assert [layer.group for layer in chosen] == ["encoder"] * 4 + ["decoder"] * 6
    assert [layer.node_index for layer in chosen] == sorted(layer.node_index for layer in chosen)


def test_names_and_patterns(analysis) -> None:
    names = [layer.name for layer in analysis.layers]
    assert [layer.name for layer in select_layers(analysis, f"{names[8]},{names[1]}")] == [
        names[1],
        names[8],
    ]
    assert [layer.name for layer in select_layers(analysis, [names[3]])] == [names[3]]
    assert _modules(select_layers(analysis, "re:ConvTranspose")) == ["up1.up", "up2.up"]


@pytest.mark.parametrize("spec", ["nope", "re:[", "re:^zzz$"])
def test_selections_that_match_nothing_say_how_to_list_layers(analysis, spec: str) -> None:
    with pytest.raises(LayerSelectionError):
        select_layers(analysis, spec)

"""Target: which output, class, activation and region define P and T(x) = Σ_R P."""

from __future__ import annotations

import numpy as np
import pytest

from segattr_onnx.errors import TargetError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.target import Region, Target, region_sum
from tests.conftest import fixture


def _analysis(name: str):
    spec = fixture(name)
    return analyse_model(str(spec.path), spec.test_shape)


@pytest.mark.parametrize(
    ("name", "class_index", "activation"),
    [
        ("unet2d_torchscript", 1, "softmax"),  # two logit channels: softmax, foreground class 1
        ("unet2d_dynamo", 0, "none"),  # the graph already ends in Sigmoid
        ("unet2d_nhwc", 0, "sigmoid"),  # one logit channel, channels-last
        ("unet3d", 1, "none"),  # the graph already ends in Softmax
    ],
)
def test_defaults_are_read_from_the_graph(name: str, class_index: int, activation: str) -> None:
    resolved = Target().resolve(_analysis(name))
    assert (resolved.class_index, resolved.activation) == (class_index, activation)


def test_probabilities_follow_the_spec_formulas() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    analysis = _analysis("unet3d")
    softmax = Target(class_index=2, activation="softmax").resolve(analysis)
    expected = np.exp(logits[:, 2]) / np.exp(logits).sum(axis=1)
    np.testing.assert_allclose(softmax.probabilities(logits), expected, rtol=1e-6)
    sigmoid = Target(class_index=0, activation="sigmoid").resolve(analysis)
    np.testing.assert_allclose(sigmoid.probabilities(logits), 1 / (1 + np.exp(-logits[:, 0])), 1e-6)
    identity = Target(class_index=1, activation="none").resolve(analysis)
    np.testing.assert_array_equal(identity.probabilities(logits), logits[:, 1])


def test_channels_last_outputs_use_their_own_class_axis() -> None:
    resolved = Target().resolve(_analysis("unet2d_nhwc"))
    logits = np.random.default_rng(1).standard_normal((1, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(
        resolved.probabilities(logits)[0], 1 / (1 + np.exp(-logits[0, ..., 0])), rtol=1e-6
    )


def test_region_mask_restricts_the_score() -> None:
    mask = np.zeros((32, 32), bool)
    mask[4:10, 4:10] = True
    resolved = Target(region=Region.from_mask(mask)).resolve(_analysis("unet2d_torchscript"))
    logits = np.random.default_rng(2).standard_normal((1, 2, 32, 32)).astype(np.float32)
    region = resolved.region_mask(logits)
    probabilities = resolved.probabilities(logits)
    assert np.isclose(region_sum(probabilities, region)[0], probabilities[0][mask].sum())


def test_largest_component_region_is_the_biggest_predicted_blob() -> None:
    resolved = Target(region="largest-component").resolve(_analysis("unet2d_torchscript"))
    logits = np.zeros((1, 2, 32, 32), np.float32)
    logits[0, 1, 2:5, 2:5] = 5.0  # 9 voxels of class 1
    logits[0, 1, 20:30, 20:25] = 5.0  # 50 voxels of class 1
    region = resolved.region_mask(logits)
    assert region.sum() == 50 and region[20:30, 20:25].all()


def test_ground_truth_labels_become_a_region() -> None:
    labels = np.zeros((32, 32), np.int64)
    labels[3:6, 3:6] = 3
    region = Region.from_labels(labels, 3)
    assert region.kind == "mask" and region.mask.sum() == 9


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (Target(class_index=5), "out of range"),
        (Target(output="nope"), "no output 'nope'"),
        (Target(activation="relu"), "unknown"),
    ],
)
def test_bad_targets_say_what_to_do(target: Target, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        target.resolve(_analysis("unet2d_torchscript"))


def test_softmax_over_one_channel_is_refused() -> None:
    with pytest.raises(TargetError, match="one channel"):
        Target(activation="softmax").resolve(_analysis("unet2d_nhwc"))


def test_empty_or_misshapen_regions_are_refused() -> None:
    analysis = _analysis("unet2d_torchscript")
    logits = np.zeros((1, 2, 32, 32), np.float32)
    with pytest.raises(TargetError, match="empty"):
        Target(region=np.zeros((32, 32), bool)).resolve(analysis).region_mask(logits)
    with pytest.raises(TargetError, match="shape"):
        Target(region=np.ones((16, 16), bool)).resolve(analysis).region_mask(logits)
    logits[0, 0] = 1.0  # background wins everywhere: no predicted blob of class 1
    with pytest.raises(TargetError, match="empty"):
        Target(region="largest-component").resolve(analysis).region_mask(logits)


def test_largest_component_of_independent_sigmoid_channels_uses_that_channels_own_mask() -> None:
    """Nested multi-label channels (whole ⊃ core): argmax would hand the background to
    channel 0 and cut the core out of it; P ≥ 0.5 of the channel itself does neither."""
    analysis = _analysis("unet3d")
    logits = np.full((1, 3, 16, 16, 16), -5.0, np.float32)
    logits[0, 0, 2:10, 2:10, 2:10] = 5.0  # whole
    logits[0, 1, 4:8, 4:8, 4:8] = 9.0  # core, inside whole, with a larger logit
    resolved = Target(class_index=0, activation="sigmoid", region="largest-component")
    region = resolved.resolve(analysis).region_mask(logits)
    expected = np.zeros((16, 16, 16), bool)
    expected[2:10, 2:10, 2:10] = True
    np.testing.assert_array_equal(region, expected)


def test_softmax_outputs_take_the_argmax_mask() -> None:
    analysis = _analysis("unet3d")  # the graph ends in Softmax
    probabilities = np.zeros((1, 3, 16, 16, 16), np.float32)
    probabilities[0, 0] = 0.5
    probabilities[0, 1, 0:4, 0:4, 0:4] = 0.45  # the largest class there, below 0.5
    probabilities[0, 2, 0:4, 0:4, 0:4] = 0.05
    probabilities[0, 0, 0:4, 0:4, 0:4] = 0.4
    region = Target(region="largest-component").resolve(analysis).region_mask(probabilities)
    assert region.sum() == 64 and region[0:4, 0:4, 0:4].all()


def test_region_masks_must_be_binary_and_label_maps_name_their_label() -> None:
    labels = np.array([[0, 1], [2, 3]])
    with pytest.raises(TargetError, match=r"Region\.from_labels"):
        Region.from_mask(labels)
    np.testing.assert_array_equal(Region.from_labels(labels, 2).mask, labels == 2)
    np.testing.assert_array_equal(Region.from_mask(np.array([[0.0, 1.0]])).mask, [[False, True]])

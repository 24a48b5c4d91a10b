"""The synthetic benchmark (docs/algorithms.md §6): a seed names a case, its labels tell the truth.

Components are face-connected (scipy.ndimage's default), the strictest reading of "touches".
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segattr_onnx.errors import OutputFileError
from segattr_onnx.synthetic import (
    DEFAULT_SIZE,
    NOISE_AMPLITUDE,
    Label,
    SyntheticCase,
    make_case,
    save_case,
)

# Small grids keep the file fast; 3D at 48 still draws every spike as a connected chain.
SIZES = {2: 64, 3: 48}
NODULES = {2: 4, 3: 8}
CASES = [(dim, seed) for dim in (2, 3) for seed in range(6)]


@pytest.fixture(scope="module")
def cases() -> dict[tuple[int, int], SyntheticCase]:
    return {(dim, seed): make_case(seed, dim=dim, size=SIZES[dim]) for dim, seed in CASES}


@pytest.mark.parametrize("dim", [2, 3])
def test_a_seed_names_a_case(dim) -> None:
    first, again = make_case(7, dim, SIZES[dim]), make_case(7, dim, SIZES[dim])
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert first.nodules == again.nodules
    other = make_case(8, dim, SIZES[dim])
    assert not np.array_equal(first.image, other.image)
    assert not np.array_equal(first.labels, other.labels)


@pytest.mark.parametrize(("dim", "size"), [(2, 32), (2, 64), (3, 32), (3, 40)])
def test_shapes_dtypes_and_range(dim, size) -> None:
    case = make_case(3, dim, size)
    assert case.image.shape == case.labels.shape == (size,) * dim
    assert case.image.dtype == np.float32
    assert case.labels.dtype == np.uint8
    assert set(np.unique(case.labels)) <= {int(label) for label in Label}
    assert case.image.min() >= -1.0 and case.image.max() <= 1.0
    assert case.seed == 3


def test_default_size_is_128_in_2d() -> None:
    assert make_case(0, dim=2).labels.shape == (DEFAULT_SIZE, DEFAULT_SIZE) == (128, 128)


@pytest.mark.parametrize(("dim", "seed"), CASES)
def test_spikes_touch_only_spiked_nodules(cases, dim, seed) -> None:
    labels = cases[dim, seed].labels
    spike_components, count = ndimage.label(labels == Label.SPIKE)
    assert count > 0, "a spiked nodule must show its spikes"
    for index in range(1, count + 1):
        rim = ndimage.binary_dilation(spike_components == index) & (labels != Label.SPIKE)
        touched = set(np.unique(labels[rim]))
        assert Label.TARGET in touched
        assert Label.DISTRACTOR not in touched


@pytest.mark.parametrize(("dim", "seed"), CASES)
def test_one_component_per_nodule_and_at_least_one_target(cases, dim, seed) -> None:
    case = cases[dim, seed]
    bodies, count = ndimage.label(np.isin(case.labels, [Label.DISTRACTOR, Label.TARGET]))
    assert count == NODULES[dim]
    for index in range(1, count + 1):
        assert len(np.unique(case.labels[bodies == index])) == 1, "a nodule has one label"
    _, with_spikes = ndimage.label(case.labels > 0)
    assert with_spikes == NODULES[dim], "nodules and their spikes never touch another nodule"
    _, targets = ndimage.label(case.labels == Label.TARGET)
    assert targets >= 1
    assert targets == sum(nodule.spiked for nodule in case.nodules)


@pytest.mark.parametrize(("dim", "seed"), CASES)
def test_records_match_the_labels(cases, dim, seed) -> None:
    case = cases[dim, seed]
    assert len(case.nodules) == NODULES[dim]
    for nodule in case.nodules:
        centre = tuple(round(c) for c in nodule.centre)
        assert case.labels[centre] == (Label.TARGET if nodule.spiked else Label.DISTRACTOR)
        assert 0.5 <= nodule.brightness < 1.0


@pytest.mark.parametrize(("dim", "seed"), CASES)
def test_nodules_are_brighter_than_background(cases, dim, seed) -> None:
    case = cases[dim, seed]
    target = case.image[case.labels == Label.TARGET]
    background = case.image[case.labels == Label.BACKGROUND]
    assert target.mean() > background.mean() + 0.3
    assert 0.5 - NOISE_AMPLITUDE <= target.mean() <= 1.0
    # Nothing adds darkness: the floor is the noise's own.
    assert case.image.min() >= -NOISE_AMPLITUDE - 1e-6
    assert background.std() > 0.01, "the fractal noise is there"


def test_about_half_the_nodules_are_spiked() -> None:
    spiked = [n.spiked for seed in range(40) for n in make_case(seed, dim=2, size=32).nodules]
    assert 0.35 < np.mean(spiked) < 0.7


def test_the_layout_does_not_depend_on_the_size() -> None:
    coarse, fine = make_case(5, 2, 64), make_case(5, 2, 128)
    for small, large in zip(coarse.nodules, fine.nodules, strict=True):
        np.testing.assert_allclose(np.add(large.centre, 0.5), 2 * np.add(small.centre, 0.5))
        assert large.spiked == small.spiked
        assert len(large.spikes) == len(small.spikes)


@pytest.mark.parametrize("arguments", [{"dim": 4}, {"dim": 1}, {"size": 16}, {"seed": -1}])
def test_bad_arguments_are_refused(arguments) -> None:
    with pytest.raises(ValueError):
        make_case(**{"seed": 0, "dim": 2, **arguments})


def test_save_case_round_trips_and_never_overwrites_by_accident(tmp_path) -> None:
    case, other = make_case(1, 2, 32), make_case(2, 2, 32)
    path = save_case(case, tmp_path / "case.npz")
    with np.load(path) as saved:
        assert sorted(saved.files) == ["image", "labels"]
        np.testing.assert_array_equal(saved["image"], case.image)
        np.testing.assert_array_equal(saved["labels"], case.labels)
        assert saved["image"].dtype == np.float32 and saved["labels"].dtype == np.uint8
    with pytest.raises(OutputFileError, match="already exists"):
        save_case(other, path)
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["labels"], case.labels)
    save_case(other, path, force=True)
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["labels"], other.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"], "no temporary file left"


def test_save_case_refuses_bad_paths(tmp_path) -> None:
    case = make_case(1, 2, 32)
    with pytest.raises(OutputFileError, match=r"\.npz"):
        save_case(case, tmp_path / "case.npy")
    with pytest.raises(OutputFileError, match="does not exist"):
        save_case(case, tmp_path / "missing" / "case.npz")


REFERENCE_IMAGE_SUM = 3716.441209914138
REFERENCE_IMAGE_ABS_SUM = 5194.006579514947


def test_a_seed_keeps_naming_the_same_case() -> None:
    """The committed paper table and the bundled model's held-out seeds depend on it."""
    import hashlib

    case = make_case(90000, dim=2, size=128)
    labels_digest = hashlib.sha256(case.labels.tobytes()).hexdigest()
    assert labels_digest == "ec6cf1a6bf432d693aa2bbfaa3b8a8e4c04b2b0eca7ff00eb6cd5845a9ce0d63"
    image = case.image.astype(np.float64)
    assert image.sum() == pytest.approx(REFERENCE_IMAGE_SUM, rel=1e-6)
    assert np.abs(image).sum() == pytest.approx(REFERENCE_IMAGE_ABS_SUM, rel=1e-6)

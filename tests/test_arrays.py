"""Array conventions: up() is half-pixel linear interpolation, minmax, connected components."""

from __future__ import annotations

import io
import zipfile
from collections import deque
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segattr_onnx.arrays import (
    connected_components,
    largest_component,
    minmax,
    minmax_rows,
    scale_by_max,
    upsample,
)
from segattr_onnx.errors import InputDataError
from segattr_onnx.files import load_array


def _linear_point(values: np.ndarray, position: tuple[float, ...]) -> float:
    """Multilinear interpolation at one point, written out corner by corner."""
    total = 0.0
    lows = [int(np.floor(p)) for p in position]
    for corner in product((0, 1), repeat=values.ndim):
        weight, index = 1.0, []
        for axis, (low, bit) in enumerate(zip(lows, corner, strict=True)):
            frac = position[axis] - low
            weight *= frac if bit else 1.0 - frac
            index.append(min(low + bit, values.shape[axis] - 1))
        total += weight * values[tuple(index)]
    return total


def _reference_resize(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each output voxel's centre mapped back with half-pixel centres, clamped to the edges."""
    result = np.zeros(shape)
    for out_index in np.ndindex(*shape):
        position = tuple(
            min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            for i, n_in, n_out in zip(out_index, values.shape, shape, strict=True)
        )
        result[out_index] = _linear_point(values, position)
    return result


@pytest.mark.parametrize(
    ("source", "target"),
    [((4, 4), (32, 32)), ((5, 7), (16, 21)), ((8, 8), (3, 5)), ((2, 3, 4), (8, 6, 9))],
)
def test_upsample_is_half_pixel_linear_interpolation(source, target) -> None:
    values = np.random.default_rng(0).standard_normal(source)
    np.testing.assert_allclose(upsample(values, target), _reference_resize(values, target), 1e-12)


def test_upsample_matches_torch_align_corners_false() -> None:
    """Against torch's trilinear interpolate, computed once by
    tests/fixtures/make_torch_references.py (the tests do not need torch)."""
    reference = np.load(Path(__file__).parent / "fixtures" / "torch_references.npz")
    values = reference["trilinear_input"]
    np.testing.assert_allclose(
        upsample(values, (12, 10, 7)), reference["trilinear_12x10x7"], atol=1e-12
    )


def test_upsample_carries_leading_axes() -> None:
    stack = np.random.default_rng(2).standard_normal((3, 4, 5))
    resized = upsample(stack, (8, 10))
    for row in range(3):
        np.testing.assert_allclose(resized[row], upsample(stack[row], (8, 10)))


def test_minmax_and_scale_by_max_handle_constant_maps() -> None:
    np.testing.assert_array_equal(minmax(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(scale_by_max(np.zeros(4)), np.zeros(4))
    np.testing.assert_allclose(scale_by_max(np.array([1.0, 4.0])), [0.25, 1.0])
    rows = minmax_rows(np.array([[1.0, 3.0], [5.0, 5.0]]))
    np.testing.assert_allclose(rows, [[0.0, 1.0], [0.0, 0.0]])


def _bfs_components(mask: np.ndarray) -> list[set[tuple[int, ...]]]:
    seen: set[tuple[int, ...]] = set()
    components = []
    for start in zip(*np.nonzero(mask), strict=True):
        start = tuple(int(i) for i in start)
        if start in seen:
            continue
        queue, component = deque([start]), {start}
        seen.add(start)
        while queue:
            voxel = queue.popleft()
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    near = list(voxel)
                    near[axis] += step
                    near_t = tuple(near)
                    if 0 <= near[axis] < mask.shape[axis] and mask[near_t] and near_t not in seen:
                        seen.add(near_t)
                        component.add(near_t)
                        queue.append(near_t)
        components.append(component)
    return components


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        bool,
        st.one_of(
            st.tuples(st.integers(1, 12), st.integers(1, 12)),
            st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
        ),
    )
)
def test_connected_components_equal_breadth_first_search(mask: np.ndarray) -> None:
    labels, count = connected_components(mask)
    expected = _bfs_components(mask)
    assert count == len(expected)
    found = [
        {tuple(int(i) for i in v) for v in zip(*np.nonzero(labels == label), strict=True)}
        for label in range(1, count + 1)
    ]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))
    assert not labels[~mask].any()


def test_largest_component_keeps_only_the_biggest_blob() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True  # 4 voxels
    mask[5:9, 5:8] = True  # 12 voxels
    mask[0, 9] = True
    largest = largest_component(mask)
    assert largest.sum() == 12 and largest[5:9, 5:8].all()
    assert not largest_component(np.zeros((4, 4), bool)).any()


def _npy_bytes(shape: tuple, dtype: str = "<f4", payload: int = 0) -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(payload)


@pytest.mark.parametrize(
    ("shape", "payload", "message"),
    [
        ((1 << 20, 1 << 20, 1 << 10), 16, "more than this machine can hold"),  # 4 PiB claimed
        ((4, 4), 8, "truncated or forged"),  # 64 bytes claimed, 8 stored
    ],
)
def test_an_npy_header_that_lies_is_refused_before_allocating(
    tmp_path: Path, shape: tuple, payload: int, message: str
) -> None:
    path = tmp_path / "forged.npy"
    path.write_bytes(_npy_bytes(shape, payload=payload))
    with pytest.raises(InputDataError, match=message):
        load_array(path)


def test_an_npz_member_that_would_inflate_past_memory_is_refused(tmp_path: Path) -> None:
    """A zip bomb: the central directory's sizes are read before anything is inflated."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.npy", _npy_bytes((4, 4), payload=64))
    data = bytearray(path.read_bytes())
    # Forge the member's uncompressed size in the central directory (4 GiB for 64 bytes).
    directory = data.rfind(b"PK\\x01\\x02")
    data[directory + 24 : directory + 28] = (0xFFFFFFFF).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(InputDataError):
        load_array(path)


def test_a_config_that_is_a_device_is_refused_not_read_forever() -> None:
    from segattr_onnx.audit import AuditConfig, AuditConfigError

    with pytest.raises(AuditConfigError, match="not a regular file"):
        AuditConfig.load("/dev/zero")

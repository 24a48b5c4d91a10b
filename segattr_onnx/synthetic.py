"""Synthetic cases with known ground truth: spiked and unspiked nodules (docs/algorithms.md §6).

Why this exists: the metrics that judge an explanation against labels (AQ, RFA, EPA) need cases
where we know what a good explanation must highlight. Spiked nodules are the segmentation target,
unspiked ones are lookalike distractors, so the only evidence that tells them apart is the spikes,
which lie *outside* the target mask (label 2). A map that lights up the spikes has found what the
model had to look at; one that lights up only the nodule bodies has not.

How, and the choices §6 leaves open (each one is a named constant below):

- §6 gives sizes on a grid that is then resampled to 128 (about 0.4×): that grid is taken as
  ``FRAME_SIDE`` = 320 units per side. The geometry is laid out in those units and evaluated
  directly at the centres of the output voxels (one voxel = 320/size units), which is drawing at
  320 and sampling down without paying for a 320³ grid. Any ``size`` therefore gives the same
  case at another resolution: 0.4× at 128, 0.2× at 64.
- A nodule is a core sphere plus six smaller spheres whose centres lie inside the core (so each
  overlaps it) along six directions: ±x, ±y, ±z in 3D, a hexagon in 2D, turned by one random
  rotation. Its edge is deformed by a smooth random radial factor of at most ±10 %. Because the
  satellite centres lie inside the core, the body is star-shaped about its centre, which lets the
  deformation and the spike bases be computed along rays.
- A spiked nodule carries 3 to 6 cones pointing in random directions; each base sits on the body's
  surface (sunk by its own radius, so the cone always joins the body) and the height is measured
  from there. Cones thinner than a voxel would fall apart on the grid, so every cone is at least
  half a voxel diagonal wide (``√dim/2`` voxels): the voxels it passes through then form one
  connected chain. At 128 this widens only the tips; at 32 spikes become short rods.
- One nodule per grid cell, placed at random inside its cell. Nodules, spikes included, are kept
  at least two voxels of the coarsest grid apart (bounding balls are checked, and a nodule is
  redrawn until it fits), so every connected component of the labels belongs to exactly one
  nodule, and the layout is the same at every size.
- The intensity is the brightness on the body and on its spikes, softened by a Gaussian of half a
  voxel (the partial-volume edge that resampling would leave). Fractal noise is value noise on
  4, 8 and 16 control points per side, weights 1, ½, ¼, cubic-spline upsampled, scaled so that its
  largest magnitude is ``NOISE_AMPLITUDE`` = 0.5; the sum is clipped to [−1, 1].

Everything random comes from ``numpy.random.default_rng(seed)``, in a fixed order, so a seed and
a size name a case.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, replace
from enum import IntEnum
from itertools import product
from pathlib import Path

import numpy as np
from scipy import ndimage

from segattr_onnx.files import check_new_file, write_bytes

FRAME_SIDE = 320.0  # units per side of the grid §6 gives sizes on; 128 voxels is then 0.4×
DEFAULT_SIZE = 128  # voxels per side, 2D and 3D alike, so one nodule looks the same in both
MIN_SIZE = 32  # below this a core sphere is under three voxels and spikes are a voxel or two

CORE_RADIUS = (30.0, 50.0)
SATELLITE_RADIUS = (20.0, 30.0)
SATELLITE_OFFSET = (0.5, 0.8)  # × core radius: the centre is inside the core, so they overlap
EDGE_DEFORMATION = 0.1  # largest relative change of the radius along any direction
DEFORMATION_WAVES = 4
DEFORMATION_FREQUENCY = (2.0, 5.0)  # radians per unit of direction: a few lobes, no ripples
BRIGHTNESS = (0.5, 1.0)

SPIKE_PROBABILITY = 0.5
SPIKES_PER_NODULE = (3, 6)  # inclusive
SPIKE_BASE_RADIUS = (2.0, 5.0)
SPIKE_HEIGHT = (20.0, 50.0)

NOISE_AMPLITUDE = 0.5
NOISE_CONTROL_POINTS = (4, 8, 16)  # per side, one octave each, coarse to fine
NOISE_PERSISTENCE = 0.5
EDGE_SOFTENING = 0.5  # voxels, Gaussian sigma

SEPARATION_VOXELS = 2.0  # of MIN_SIZE: centres of two nodules are over √3 voxels apart
PLACEMENT_TRIES = 20  # draws of one nodule before the layout starts again
LAYOUT_TRIES = 100


class Label(IntEnum):
    """The four classes of ``SyntheticCase.labels``."""

    BACKGROUND = 0
    DISTRACTOR = 1  # an unspiked nodule: looks like the target but is not
    SPIKE = 2  # the discriminating background a good explanation must highlight
    TARGET = 3  # a spiked nodule: what the model segments


@dataclass(frozen=True)
class Spike:
    """One cone, in index coordinates of the output grid (voxel i is centred on i)."""

    base: tuple[float, ...]
    apex: tuple[float, ...]
    base_radius: float


@dataclass(frozen=True)
class Nodule:
    """What was drawn for one nodule, in index coordinates and voxels of the output grid."""

    centre: tuple[float, ...]
    core_radius: float
    brightness: float
    spikes: tuple[Spike, ...]

    @property
    def spiked(self) -> bool:
        """Spiked nodules are the target (label 3); the others are distractors (label 1)."""
        return bool(self.spikes)


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One seeded case: ``image`` float32 in [−1, 1], ``labels`` uint8 (see ``Label``)."""

    seed: int
    image: np.ndarray
    labels: np.ndarray
    nodules: tuple[Nodule, ...]


@dataclass(frozen=True, eq=False)
class _Shape:
    """A nodule in frame units: body spheres, edge deformation, brightness and cones."""

    centre: np.ndarray  # (dim,)
    sphere_offsets: np.ndarray  # (7, dim), the core first at offset 0
    sphere_radii: np.ndarray  # (7,)
    wave_directions: np.ndarray  # (waves, dim) unit vectors
    wave_frequencies: np.ndarray  # (waves,)
    wave_phases: np.ndarray  # (waves,)
    wave_amplitudes: np.ndarray  # (waves,), summing to at most EDGE_DEFORMATION
    brightness: float
    spikes: tuple[tuple[np.ndarray, np.ndarray, float], ...]  # (base, apex, base radius)


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A rotation drawn uniformly (QR of a Gaussian matrix, signs fixed, determinant +1)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _satellite_directions(dim: int) -> np.ndarray:
    """Six unit directions before rotation: the ± axes in 3D, a hexagon in 2D."""
    if dim == 3:
        return np.concatenate([np.eye(3), -np.eye(3)])
    angles = np.arange(6) * (np.pi / 3)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Directions drawn uniformly on the unit sphere (circle in 2D)."""
    vectors = rng.standard_normal((count, dim))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _radial_factor(shape: _Shape, units: np.ndarray) -> np.ndarray:
    """1 + g(u): the smooth edge deformation along each unit direction (rows of ``units``)."""
    waves = np.sin(units @ shape.wave_directions.T * shape.wave_frequencies + shape.wave_phases)
    return 1.0 + waves @ shape.wave_amplitudes


def _boundary_distance(shape: _Shape, unit: np.ndarray) -> float:
    """How far the deformed body reaches from its centre along one unit direction.

    The body is star-shaped about the centre, so along a ray it ends where the last sphere the
    ray crosses ends: the far root of |t·u − offset| = radius, largest over the spheres.
    """
    along = shape.sphere_offsets @ unit
    across2 = np.sum(shape.sphere_offsets**2, axis=1) - along**2
    discriminant = shape.sphere_radii**2 - across2
    hit = discriminant >= 0
    far = along[hit] + np.sqrt(discriminant[hit])
    return float(far.max() * _radial_factor(shape, unit[None, :])[0])


def _body_balls(shape: _Shape) -> tuple[np.ndarray, np.ndarray]:
    """Balls that hold the deformed body: each sphere grown by what the deformation can add."""
    reach = np.linalg.norm(shape.sphere_offsets, axis=1) + shape.sphere_radii
    return shape.centre + shape.sphere_offsets, shape.sphere_radii + EDGE_DEFORMATION * reach


def _bounding_balls(shape: _Shape, floor: float, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Balls that hold the body and every cone, for the cheap separation test."""
    centres, radii = _body_balls(shape)
    centres, radii = [centres], [radii]
    for base, apex, base_radius in shape.spikes:
        steps = max(2, math.ceil(np.linalg.norm(apex - base) / spacing) + 1)
        fractions = np.linspace(0.0, 1.0, steps)
        centres.append(base + fractions[:, None] * (apex - base))
        radii.append(np.maximum(base_radius * (1 - fractions), floor) + spacing / 2)
    return np.concatenate(centres), np.concatenate(radii)


def _apart(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]) -> bool:
    """True when no ball of one set comes within the other's (radii already hold the margin)."""
    gaps = np.linalg.norm(first[0][:, None, :] - second[0][None, :, :], axis=2)
    return bool(np.all(gaps > first[1][:, None] + second[1][None, :]))


def _draw_shape(
    rng: np.random.Generator, cell_low: np.ndarray, cell_side: float, spiked: bool, margin: float
) -> _Shape:
    """One nodule at a random place in its cell, its body kept inside the cell (less margin)."""
    dim = len(cell_low)
    rotation = _random_rotation(rng, dim)
    core = rng.uniform(*CORE_RADIUS)
    offsets = rng.uniform(*SATELLITE_OFFSET, size=6) * core
    radii = rng.uniform(*SATELLITE_RADIUS, size=6)
    sphere_offsets = np.concatenate(
        [np.zeros((1, dim)), offsets[:, None] * (_satellite_directions(dim) @ rotation.T)]
    )
    sphere_radii = np.concatenate([[core], radii])
    amplitudes = rng.dirichlet(np.ones(DEFORMATION_WAVES)) * rng.uniform(0.5, 1.0)
    extent = float(np.max(offsets + radii, initial=core)) * (1 + EDGE_DEFORMATION)
    slack = max(cell_side / 2 - extent - margin / 2, 0.0)
    centre = cell_low + cell_side / 2 + rng.uniform(-slack, slack, size=dim)
    shape = _Shape(
        centre=centre,
        sphere_offsets=sphere_offsets,
        sphere_radii=sphere_radii,
        wave_directions=_unit_vectors(rng, DEFORMATION_WAVES, dim),
        wave_frequencies=rng.uniform(*DEFORMATION_FREQUENCY, size=DEFORMATION_WAVES),
        wave_phases=rng.uniform(0.0, 2 * np.pi, size=DEFORMATION_WAVES),
        wave_amplitudes=amplitudes * EDGE_DEFORMATION,
        brightness=float(rng.uniform(*BRIGHTNESS)),
        spikes=(),
    )
    if not spiked:
        return shape
    count = int(rng.integers(SPIKES_PER_NODULE[0], SPIKES_PER_NODULE[1] + 1))
    spikes = []
    for unit in _unit_vectors(rng, count, dim):
        base_radius = float(rng.uniform(*SPIKE_BASE_RADIUS))
        height = rng.uniform(*SPIKE_HEIGHT)
        surface = _boundary_distance(shape, unit)
        base = centre + (surface - base_radius) * unit
        spikes.append((base, centre + (surface + height) * unit, base_radius))
    return replace(shape, spikes=tuple(spikes))


def _layout(rng: np.random.Generator, dim: int) -> list[_Shape]:
    """One nodule per grid cell, each redrawn until it keeps its distance from those before.

    A nodule that cannot fit beside the ones already drawn (their spikes may fill its cell)
    starts the whole layout again; the spiked/unspiked choice is kept. Distances are judged
    at the coarsest grid (``MIN_SIZE``), the widest cones and margin any size draws, so the
    layout does not depend on the size and one seed gives one case at every resolution.
    """
    cells = list(product((0, 1), repeat=dim))
    spiked = rng.random(len(cells)) < SPIKE_PROBABILITY
    if not spiked.any():
        spiked[rng.integers(len(cells))] = True  # §6: at least one target per case
    for _ in range(LAYOUT_TRIES):
        shapes = _try_layout(rng, cells, spiked, FRAME_SIDE / MIN_SIZE)
        if shapes is not None:
            return shapes
    raise RuntimeError("could not lay out the nodules apart")  # pragma: no cover


def _try_layout(
    rng: np.random.Generator, cells: list[tuple[int, ...]], spiked: np.ndarray, voxel: float
) -> list[_Shape] | None:
    """Nodules drawn cell by cell, or None when one does not fit beside the others."""
    margin = SEPARATION_VOXELS * voxel
    floor = _cone_floor(len(cells[0]), voxel)
    cell_side = FRAME_SIDE / 2
    shapes: list[_Shape] = []
    balls: list[tuple[np.ndarray, np.ndarray]] = []
    for cell, is_spiked in zip(cells, spiked, strict=True):
        cell_low = np.array(cell, dtype=np.float64) * cell_side
        for _ in range(PLACEMENT_TRIES):
            shape = _draw_shape(rng, cell_low, cell_side, bool(is_spiked), margin)
            centres, radii = _bounding_balls(shape, floor, spacing=voxel)
            candidate = (centres, radii + margin / 2)
            if all(_apart(candidate, placed) for placed in balls):
                break
        else:
            return None
        shapes.append(shape)
        balls.append(candidate)
    return shapes


def _cone_floor(dim: int, voxel: float) -> float:
    """Smallest cone radius drawn: half a voxel diagonal, so a cone never breaks apart."""
    return math.sqrt(dim) / 2 * voxel


def _box(low: np.ndarray, high: np.ndarray, voxel: float, size: int) -> tuple[slice, ...]:
    """The output voxels whose centres may lie in [low, high] (frame units), clipped."""
    first = np.clip(np.ceil(low / voxel - 0.5), 0, size).astype(int)
    last = np.clip(np.floor(high / voxel - 0.5) + 1, 0, size).astype(int)
    return tuple(slice(a, max(a, b)) for a, b in zip(first, last, strict=True))


def _voxel_centres(box: tuple[slice, ...], voxel: float) -> np.ndarray:
    """Frame coordinates of the voxel centres in ``box``, one row per voxel (C order)."""
    axes = [(np.arange(s.start, s.stop) + 0.5) * voxel for s in box]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def _body_mask(shape: _Shape, box: tuple[slice, ...], voxel: float) -> np.ndarray:
    """Voxels of ``box`` inside the deformed body.

    A point is inside when, pulled back along its ray by the deformation factor, it falls in
    one of the spheres: the deformation scales the star-shaped body radially.
    """
    relative = _voxel_centres(box, voxel) - shape.centre
    distance = np.linalg.norm(relative, axis=1, keepdims=True)
    units = np.divide(relative, distance, out=np.zeros_like(relative), where=distance > 0)
    undeformed = relative / _radial_factor(shape, units)[:, None]
    inside = np.zeros(len(relative), dtype=bool)
    for offset, radius in zip(shape.sphere_offsets, shape.sphere_radii, strict=True):
        inside |= np.sum((undeformed - offset) ** 2, axis=1) <= radius**2
    return inside.reshape([s.stop - s.start for s in box])


def _cone_mask(
    spike: tuple[np.ndarray, np.ndarray, float], box: tuple[slice, ...], voxel: float, floor: float
) -> np.ndarray:
    """Voxels of ``box`` inside one cone, never thinner than ``floor``."""
    base, apex, base_radius = spike
    axis = apex - base
    height = float(np.linalg.norm(axis))
    axis = axis / height
    relative = _voxel_centres(box, voxel) - base
    along = relative @ axis
    across = np.linalg.norm(relative - along[:, None] * axis, axis=1)
    radius = np.maximum(base_radius * (1 - along / height), floor)
    inside = (along >= 0) & (along <= height) & (across <= radius)
    return inside.reshape([s.stop - s.start for s in box])


def _draw_nodule(
    shape: _Shape, size: int, voxel: float, floor: float
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Body and spike masks of one nodule, on the smallest box of the output that holds both.

    Each part is evaluated on its own box only (a cone's box is small), which is what keeps a
    128³ case fast. Spike voxels not face-connected to the body are dropped: the cone floor
    should leave none, but a label 2 voxel must never float free of its nodule.
    """
    ball_centres, ball_radii = _body_balls(shape)
    extents = [
        (
            np.min(ball_centres - ball_radii[:, None], axis=0),
            np.max(ball_centres + ball_radii[:, None], axis=0),
        )
    ]
    for base, apex, base_radius in shape.spikes:
        reach = max(base_radius, floor)
        extents.append((np.minimum(base, apex) - reach, np.maximum(base, apex) + reach))
    box = _box(
        np.min([low for low, _ in extents], axis=0),
        np.max([high for _, high in extents], axis=0),
        voxel,
        size,
    )
    body = np.zeros([s.stop - s.start for s in box], dtype=bool)
    spikes = np.zeros_like(body)
    body_box = _box(*extents[0], voxel, size)
    body[_shift(body_box, box)] = _body_mask(shape, body_box, voxel)
    for spike, extent in zip(shape.spikes, extents[1:], strict=True):
        cone_box = _box(*extent, voxel, size)
        spikes[_shift(cone_box, box)] |= _cone_mask(spike, cone_box, voxel, floor)
    spikes &= ~body
    if spikes.any():
        components, _ = ndimage.label(body | spikes)  # face connectivity, as the tests read it
        spikes &= np.isin(components, np.unique(components[body]))
    return box, body, spikes


def _shift(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` expressed relative to the start of ``outer``."""
    return tuple(
        slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
    )


def _fractal_noise(rng: np.random.Generator, dim: int, size: int) -> np.ndarray:
    """Three octaves of value noise, largest magnitude ``NOISE_AMPLITUDE``.

    The octaves are summed on the finest control grid and upsampled once, so the cost of the
    cubic spline is paid once per case rather than once per octave.
    """
    finest = NOISE_CONTROL_POINTS[-1]
    total = np.zeros((finest,) * dim)
    for octave, points in enumerate(NOISE_CONTROL_POINTS):
        values = rng.standard_normal((points,) * dim) * NOISE_PERSISTENCE**octave
        total += ndimage.zoom(values, finest / points, order=3, mode="reflect", grid_mode=True)
    noise = ndimage.zoom(total, size / finest, order=3, mode="reflect", grid_mode=True)
    return noise * (NOISE_AMPLITUDE / np.abs(noise).max())


def _record(shape: _Shape, voxel: float) -> Nodule:
    """The public description of a drawn nodule, in output index coordinates."""

    def index(point: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in point / voxel - 0.5)

    return Nodule(
        centre=index(shape.centre),
        core_radius=float(shape.sphere_radii[0] / voxel),
        brightness=shape.brightness,
        spikes=tuple(
            Spike(base=index(base), apex=index(apex), base_radius=radius / voxel)
            for base, apex, radius in shape.spikes
        ),
    )


def make_case(seed: int, dim: int = 3, size: int | None = None) -> SyntheticCase:
    """The synthetic case named by ``seed``: a 2×2(×2) grid of nodules, image and labels."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, not {dim}")
    size = DEFAULT_SIZE if size is None else int(size)
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} voxels per side, not {size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, not {seed}")
    rng = np.random.default_rng(int(seed))
    voxel = FRAME_SIDE / size
    floor = _cone_floor(dim, voxel)
    shapes = _layout(rng, dim)
    labels = np.zeros((size,) * dim, dtype=np.uint8)
    intensity = np.zeros((size,) * dim, dtype=np.float64)
    for shape in shapes:
        box, body, spikes = _draw_nodule(shape, size, voxel, floor)
        region_labels = labels[box]
        region_labels[spikes] = Label.SPIKE
        region_labels[body] = Label.TARGET if shape.spikes else Label.DISTRACTOR
        intensity[box][body | spikes] = shape.brightness
    image = ndimage.gaussian_filter(intensity, EDGE_SOFTENING) + _fractal_noise(rng, dim, size)
    return SyntheticCase(
        seed=int(seed),
        image=np.clip(image, -1.0, 1.0).astype(np.float32),
        labels=labels,
        nodules=tuple(_record(shape, voxel) for shape in shapes),
    )


def save_case(case: SyntheticCase, path: str | os.PathLike[str], force: bool = False) -> Path:
    """Write ``image`` and ``labels`` to a ``.npz`` atomically; an existing file needs ``force``."""
    target = check_new_file(path, (".npz",), force)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, image=case.image, labels=case.labels)
    write_bytes(target, buffer.getvalue())
    return target

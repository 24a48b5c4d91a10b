"""Operators that move, copy or crop values without arithmetic: Transpose, the reshapes,
Expand, Concat, Split, Slice, Pad, Tile, DepthToSpace and SpaceToDepth."""

from __future__ import annotations

import numpy as np
import onnx

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _along_axis, _text, _unsupported, rule


@rule("Transpose")
def _transpose(b, node, dys, needs):
    rank = b.rank(node.input[0])
    perm = list(b.attribute(node, "perm", list(range(rank))[::-1]))
    inverse = [perm.index(axis) for axis in range(rank)]
    return {node.input[0]: b.op("Transpose", [dys[0]], perm=inverse)}


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, dys, needs):
    return {node.input[0]: b.reshape_like(dys[0], node.input[0])}


@rule("Expand")
def _expand(b, node, dys, needs):
    return {node.input[0]: b.unbroadcast(dys[0], node.input[0], node.output[0])}


@rule("Concat")
def _concat(b, node, dys, needs):
    rank = b.rank(node.output[0])
    axis = b.attribute(node, "axis") % rank
    grads, start = {}, 0
    for name in node.input:
        size = b.shape(name)[axis]
        if not isinstance(size, int):
            raise _unsupported(node, "an input of unknown size along the concatenation axis")
        if name in needs:
            grads[name] = b.slice(dys[0], [start], [start + size], [axis])
        start += size
    return grads


@rule("Split")
def _split(b, node, dys, needs):
    rank = b.rank(node.input[0])
    axis = b.attribute(node, "axis", 0) % rank
    parts = [
        dy if dy is not None else b.zeros_like(out)
        for dy, out in zip(dys, node.output, strict=True)
    ]
    return {node.input[0]: b.op("Concat", parts, axis=axis)}


@rule("Slice")
def _slice(b, node, dys, needs):
    x = node.input[0]
    shape = b.shape(x)
    rank = len(shape)
    if b.opset >= 10:
        names = [*list(node.input[1:5]), "", "", ""][:4]
        values = [b.constant_value(n) if n else None for n in names]
        if any(name and value is None for name, value in zip(names, values, strict=True)):
            raise _unsupported(node, "starts, ends, axes or steps computed at run time")
        starts, ends, axes, steps = values
    else:
        starts = np.array(b.attribute(node, "starts"))
        ends = np.array(b.attribute(node, "ends"))
        axes, steps = b.attribute(node, "axes"), None
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    if steps is not None and any(int(s) != 1 for s in np.asarray(steps).reshape(-1)):
        raise _unsupported(node, "steps other than 1")
    pads = [0] * (2 * rank)
    for start, end, axis in zip(
        np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1), axes, strict=True
    ):
        size = shape[axis]
        if not isinstance(size, int):
            raise _unsupported(node, "an unknown size along a sliced axis")
        start, end = int(start), int(end)
        start = min(max(start + size if start < 0 else start, 0), size)
        end = min(max(end + size if end < 0 else end, 0), size)
        pads[axis], pads[axis + rank] = start, size - max(end, start)
    return {x: b.pad(dys[0], pads)}


def _pad_amounts(b: GradientBuilder, node: onnx.NodeProto) -> list[int]:
    """[begin_0, ..., begin_r, end_0, ..., end_r] from the attribute (opset 2-10) or the pads
    input (11+), spread over every axis when the optional axes input (18+) names a few."""
    rank = b.rank(node.input[0])
    if b.opset < 11:
        pads = b.attribute(node, "pads")
        if pads is None:
            raise _unsupported(node, "the opset-1 paddings attribute")
        return [int(p) for p in pads]
    pads = b.constant_value(node.input[1])
    axes_name = node.input[3] if len(node.input) > 3 else ""
    axes = b.constant_value(axes_name) if axes_name else None
    if pads is None or (axes_name and axes is None):
        raise _unsupported(node, "pads or axes computed at run time")
    pads = [int(p) for p in pads]
    if axes is None:
        return pads
    full = [0] * (2 * rank)
    for i, axis in enumerate(int(a) % rank for a in axes.reshape(-1)):
        full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
    return full


@rule("Pad")
def _pad(b, node, dys, needs):
    """Constant: crop the border (and zero-fill what negative pads cut). Reflect, edge and wrap
    copy input rows into the border: per axis a 0/1 (out, in) matrix, read off numpy's pad of
    the row indices, whose transpose adds each border row back onto the row it copies."""
    x = node.input[0]
    mode = _text(b, node, "mode", "constant")
    rank = b.rank(x)
    pads = _pad_amounts(b, node)
    if mode in ("reflect", "edge", "wrap"):
        if min(pads) < 0:
            raise _unsupported(node, f"negative pads with mode {mode!r}")
        gradient = dys[0]
        for axis, size in enumerate(b.shape(x)):
            before, after = pads[axis], pads[axis + rank]
            if not before and not after:
                continue
            if not isinstance(size, int):
                raise _unsupported(node, f"{mode} padding an axis of unknown size")
            source = np.pad(np.arange(size), (before, after), mode=mode)  # out row → in row
            matrix = np.zeros((len(source), size), dtype=b.dtype(x))
            matrix[np.arange(len(source)), source] = 1
            gradient = _along_axis(b, gradient, axis, rank, matrix)
        return {x: gradient}
    if mode != "constant":
        raise _unsupported(node, f"mode {mode!r}")
    out_shape = b.shape(node.output[0])
    # Positive pads added rows: crop them. Negative pads cropped rows: pad them back with 0.
    starts = [max(p, 0) for p in pads[:rank]]
    ends = []
    for axis in range(rank):
        crop = max(pads[axis + rank], 0)
        if not crop:
            ends.append(np.iinfo(np.int64).max)  # up to the end, whatever its size
        elif isinstance(out_shape[axis], int):
            ends.append(out_shape[axis] - crop)
        else:
            raise _unsupported(node, "padding an axis of unknown size")
    dy = b.slice(dys[0], starts, ends, list(range(rank)))
    regrow = [max(-p, 0) for p in pads]
    return {x: b.pad(dy, regrow) if any(regrow) else dy}


@rule("Tile")
def _tile(b, node, dys, needs):
    """Y repeats X rᵢ times along axis i: view dY as (r₀, n₀, r₁, n₁, ...), sum the r axes."""
    x = node.input[0]
    if b.opset < 6:
        raise _unsupported(node, "the opset-1 tiles/axis inputs")
    repeats = b.constant_value(node.input[1])
    if repeats is None:
        raise _unsupported(node, "repeats computed at run time")
    shape = b.shape(x)
    if sum(not isinstance(d, int) for d in shape) > 1:
        raise _unsupported(node, "more than one axis of unknown size")
    view = []
    for count, size in zip(repeats.reshape(-1).tolist(), shape, strict=True):
        view += [int(count), size if isinstance(size, int) else -1]
    viewed = b.op("Reshape", [dys[0], b.const(np.array(view, np.int64), hint="tile_view")])
    return {x: b.reduce("ReduceSum", viewed, range(0, 2 * len(shape), 2), keepdims=0)}


def _regroup_adjoint(b: GradientBuilder, x: str, dy: str, view: list, perm: list[int]) -> str:
    """Adjoint of Reshape(view) → Transpose(perm) → Reshape: the same steps undone."""
    moved = b.op("Reshape", [dy, b.const(np.array([view[p] for p in perm], np.int64), hint="view")])
    back = b.op("Transpose", [moved], perm=[perm.index(a) for a in range(len(perm))])
    return b.reshape_like(back, x)


def _block_geometry(b: GradientBuilder, node: onnx.NodeProto):
    x = node.input[0]
    batch, channels, height, width = b.shape(x)
    if not all(isinstance(d, int) for d in (channels, height, width)):
        raise _unsupported(node, "unknown channel or spatial sizes")
    return (batch if isinstance(batch, int) else -1), channels, height, width


@rule("DepthToSpace")
def _depth_to_space(b, node, dys, needs):
    """DCR: (N, b, b, C/b², H, W) → perm (0, 3, 4, 1, 5, 2); CRD: (N, C/b², b, b, H, W) →
    perm (0, 1, 4, 2, 5, 3); then (N, C/b², H·b, W·b)."""
    x = node.input[0]
    n, c, h, w = _block_geometry(b, node)
    k = b.attribute(node, "blocksize")
    if _text(b, node, "mode", "DCR") == "CRD":
        view, perm = [n, c // (k * k), k, k, h, w], [0, 1, 4, 2, 5, 3]
    else:
        view, perm = [n, k, k, c // (k * k), h, w], [0, 3, 4, 1, 5, 2]
    return {x: _regroup_adjoint(b, x, dys[0], view, perm)}


@rule("SpaceToDepth")
def _space_to_depth(b, node, dys, needs):
    """(N, C, H/b, b, W/b, b) → perm (0, 3, 5, 1, 2, 4) → (N, C·b², H/b, W/b)."""
    x = node.input[0]
    n, c, h, w = _block_geometry(b, node)
    k = b.attribute(node, "blocksize")
    view, perm = [n, c, h // k, k, w // k, k], [0, 3, 5, 1, 2, 4]
    return {x: _regroup_adjoint(b, x, dys[0], view, perm)}

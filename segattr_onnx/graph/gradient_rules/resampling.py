"""Resize and Upsample (per-axis matrices read off the node's own Resize) and GridSample."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _along_axis, _text, _unsupported, rule


def _resize_matrix(
    b: GradientBuilder,
    node: onnx.NodeProto,
    axis: int,
    size_in: int,
    size_out: int,
    scale: float | None,
) -> np.ndarray:
    """The (out, in) matrix of the node's own Resize along one axis, read off by running that
    Resize on the identity basis: exact for every mode ONNX Runtime implements."""
    rank = b.rank(node.input[0])
    basis_shape = [size_in] + [1] * (rank - 1)
    basis_shape[axis] = size_in
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    opset = b.opset
    scales = np.ones(rank, np.float32)
    scales[axis] = scale if scale is not None else size_out / size_in
    sizes = np.array(basis_shape, np.int64)
    sizes[axis] = size_out
    empty = np.zeros(0, np.float32)
    constants: dict[str, np.ndarray] = {}
    if opset >= 11:
        # roi and scales are required inputs at 11-12 (empty when unused), optional from 13.
        constants["roi"] = empty
        constants["scales"] = scales if scale is not None else empty
        inputs = ["basis", "roi", "scales"]
        if scale is None:
            constants["sizes"] = sizes
            inputs.append("sizes")
        op_type = "Resize"
    elif opset >= 9:
        constants["scales"] = scales
        inputs, op_type = ["basis", "scales"], "Resize" if opset >= 10 else "Upsample"
    elif opset >= 7:
        attributes["scales"] = [float(v) for v in scales]
        inputs, op_type = ["basis"], "Upsample"
    else:
        raise _unsupported(node, f"opset {opset}")
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["out"], **attributes)],
        "resize_probe",
        [helper.make_tensor_value_info("basis", onnx.TensorProto.FLOAT, basis_shape)],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    probe = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=min(max(b.model.ir_version, 3), 10),
    )
    try:
        out = _run_probe(probe.SerializeToString(), tuple(basis_shape))
    except Exception as exc:  # ORT's own types: this node's settings cannot be replayed
        raise _unsupported(node, f"its resampling could not be replayed ({exc})") from exc
    rows = np.moveaxis(out, axis, -1).reshape(size_in, -1)  # row i: the resized basis vector e_i
    if rows.shape[1] != size_out:
        raise _unsupported(node, f"a probe gave {rows.shape[1]} outputs, expected {size_out}")
    return rows.T  # (out, in)


@functools.lru_cache(maxsize=256)
def _run_probe(probe: bytes, basis_shape: tuple[int, ...]) -> np.ndarray:
    """The probe's output on the identity basis, kept per probe (its bytes say everything
    about it): every explanation of a model rebuilds the same backward graph, and a session per
    resized axis cost more than the rest of that build."""
    size_in = max(basis_shape)
    basis = np.eye(size_in, dtype=np.float32).reshape(basis_shape)
    session = ort.InferenceSession(probe, providers=["CPUExecutionProvider"])
    out = session.run(None, {"basis": basis})[0]
    out.setflags(write=False)
    return out


@rule("Resize", "Upsample")
def _resize(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    transform = b.attribute(node, "coordinate_transformation_mode", b"half_pixel")
    if isinstance(transform, bytes):
        transform = transform.decode()
    if transform == "tf_crop_and_resize" or b.attribute(node, "axes") is not None:
        raise _unsupported(node, "crop-and-resize or the axes attribute")
    in_shape, out_shape = b.shape(x), b.shape(y)
    scales = None
    runtime_scales = False  # scales computed in the graph: only out/in is known here
    scale_input = 1 if node.op_type == "Upsample" or b.opset < 11 else 2
    if len(node.input) > scale_input and node.input[scale_input]:
        scales = b.constant_value(node.input[scale_input])
        runtime_scales = scales is None
        if scales is not None and scales.size == 0:
            scales = None
    gradient = dys[0]
    for axis, (size_in, size_out) in enumerate(zip(in_shape, out_shape, strict=True)):
        scale = float(scales[axis]) if scales is not None else None
        if size_in == size_out and (scale is None or scale == 1.0):
            continue
        if axis == 0:
            if scale is None or scale == 1.0:
                continue  # the batch: its symbols may differ by name, it is never resized
            raise _unsupported(node, "resizing the batch axis")
        if not (isinstance(size_in, int) and isinstance(size_out, int)):
            raise _unsupported(node, f"resizing the batch or an unknown axis ({axis})")
        if runtime_scales and size_out % size_in and size_in % size_out:
            # The forward pass maps coordinates with the run-time scale, which a non-integer
            # size ratio does not pin down (7 = ⌊5·1.4⌋ = ⌊5·1.5⌋): the matrix could be wrong.
            raise _unsupported(node, "scales computed at run time with a non-integer size ratio")
        matrix = _resize_matrix(b, node, axis, size_in, size_out, scale).astype(b.dtype(x))
        gradient = _along_axis(b, gradient, axis, len(in_shape), matrix)
    return {x: gradient}


def _grid_taps(
    grid: np.ndarray, spatial: tuple, nearest: bool, align_corners: bool, border: bool
) -> tuple[np.ndarray, np.ndarray]:
    """For each batch item and output point, the flat input positions GridSample reads and
    their weights, (N, O·T) each (T taps: 1 nearest, 2ᴰ linear), as ONNX Runtime computes them:
    grid[..., k] is the coordinate of spatial axis D−1−k, out-of-range taps weigh 0 (zeros
    padding) or coordinates are clamped first (border)."""
    batch, dims = grid.shape[0], len(spatial)
    per_axis = []
    for axis, size in enumerate(spatial):
        g = grid[..., dims - 1 - axis].astype(np.float64).reshape(batch, -1)
        c = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
        if border:
            c = np.clip(c, 0, size - 1)
        if nearest:
            per_axis.append([(np.rint(c), np.ones_like(c))])
        else:
            low = np.floor(c)
            per_axis.append([(low, 1 - (c - low)), (low + 1, c - low)])
    indices, weights = [], []
    for taps in np.ndindex(*(len(t) for t in per_axis)):
        position = [per_axis[a][t][0].astype(np.int64) for a, t in enumerate(taps)]
        weight = np.prod([per_axis[a][t][1] for a, t in enumerate(taps)], axis=0)
        inside = np.all([(p >= 0) & (p < s) for p, s in zip(position, spatial, strict=True)], 0)
        clipped = [np.clip(p, 0, s - 1) for p, s in zip(position, spatial, strict=True)]
        indices.append(np.ravel_multi_index(clipped, spatial))
        weights.append(np.where(inside, weight, 0.0))
    return np.stack(indices, -1).reshape(batch, -1), np.stack(weights, -1).reshape(batch, -1)


@rule("GridSample")
def _grid_sample(b, node, dys, needs):
    """With a constant grid GridSample is a fixed sparse linear map of the image: its taps and
    weights are computed here, and dY·weight is scatter-added back onto the tapped pixels. The
    grid itself is not differentiated; reflection padding and cubic modes are refused."""
    x, grid_name = node.input[0], node.input[1]
    if x not in needs:
        return {}
    grid = b.constant_value(grid_name)
    if grid is None or grid_name in needs:
        raise _unsupported(node, "a grid that is not a constant")
    mode = _text(b, node, "mode", "bilinear" if b.opset < 20 else "linear")
    padding = _text(b, node, "padding_mode", "zeros")
    if mode not in ("bilinear", "linear", "nearest") or padding not in ("zeros", "border"):
        raise _unsupported(node, f"mode {mode!r} with padding_mode {padding!r}")
    shape = b.shape(x)
    if not all(isinstance(d, int) for d in shape) or shape[0] != grid.shape[0]:
        raise _unsupported(node, "an input of unknown size or another batch than the grid's")
    align_corners = bool(b.attribute(node, "align_corners", 0))
    nearest, border = mode == "nearest", padding == "border"
    indices, weights = _grid_taps(grid, tuple(shape[2:]), nearest, align_corners, border)
    taps = weights.shape[1] // int(np.prod(b.shape(node.output[0])[2:]))
    flat = b.const(np.array([0, 0, -1], np.int64), hint="flat")
    rows = b.op("Reshape", [dys[0], flat])  # (N, C, O)
    weight_view = weights.reshape(shape[0], 1, -1, taps).astype(b.dtype(x))
    spread = b.op("Mul", [b.unsqueeze(rows, [3]), b.const(weight_view, hint="grid_weights")])
    updates = b.op("Reshape", [spread, flat])  # (N, C, O·T)
    where = b.op(
        "Expand",
        [b.const(indices.reshape(shape[0], 1, -1), hint="grid_taps"), b.shape_of(updates)],
    )
    zeros = b.op("Reshape", [b.zeros_like(x), flat])
    added = b.op("ScatterElements", [zeros, where, updates], axis=2, reduction="add")
    return {x: b.reshape_like(added, x)}

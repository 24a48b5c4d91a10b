"""Max, average and global average pooling."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from segattr_onnx.graph.gradient_rules._common import _unsupported, _window, rule


@rule("MaxPool")
def _max_pool(b, node, dys, needs):
    x = node.input[0]
    kernel = list(b.attribute(node, "kernel_shape"))
    strides, dilations, pads, auto_pad = _window(b, node, kernel)
    if b.attribute(node, "storage_order", 0):
        raise _unsupported(node, "column-major indices (storage_order=1)")
    if len(node.output) < 2 or not node.output[1]:
        indices = b.fresh("maxpool_indices")
        if len(node.output) < 2:
            node.output.append(indices)
        else:
            node.output[1] = indices
    indices = node.output[1]
    extents = [d * (k - 1) + 1 for d, k in zip(dilations, kernel, strict=True)]
    overlapping = any(s < e for s, e in zip(strides, extents, strict=True))
    plain = (
        not overlapping
        and not any(pads)
        and auto_pad == "NOTSET"
        and not b.attribute(node, "ceil_mode", 0)
        and all(d == 1 for d in dilations)
    )
    if plain:
        # Windows tile the input exactly: MaxUnpool, MaxPool's own inverse, routes the gradient.
        return {
            x: b.op(
                "MaxUnpool",
                [dys[0], indices, b.shape_of(x)],
                kernel_shape=kernel,
                strides=strides,
            )
        }
    # Otherwise scatter into the flattened input (indices are flat positions in it); windows
    # that overlap may pick one position several times, so those need scatter-add.
    if b.opset < (16 if overlapping else 11):
        raise _unsupported(node, "overlapping, padded or dilated windows at this opset")
    flat = b.const(np.array([-1], np.int64))
    flat_x = b.op("Reshape", [b.zeros_like(x), flat])
    flat_dy = b.op("Reshape", [dys[0], flat])
    flat_idx = b.op("Reshape", [indices, flat])
    extra = {"reduction": "add"} if overlapping else {}
    scattered = b.op("ScatterElements", [flat_x, flat_idx, flat_dy], **extra)
    return {x: b.reshape_like(scattered, x)}


@rule("AveragePool")
def _average_pool(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    if b.attribute(node, "ceil_mode", 0):
        raise _unsupported(node, "ceil_mode=1")
    if any(d != 1 for d in b.attribute(node, "dilations", [])):
        raise _unsupported(node, "dilated windows")
    kernel = list(b.attribute(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(b.attribute(node, "strides", [1] * spatial))
    pads = list(b.attribute(node, "pads", [0] * (2 * spatial)))
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        raise _unsupported(node, "auto_pad")
    channels = b.shape(x)[1]
    if not isinstance(channels, int):
        raise _unsupported(node, "an unknown channel count")
    size = int(np.prod(kernel))
    dy = dys[0]
    if any(pads) and not b.attribute(node, "count_include_pad", 0):
        # Border windows average fewer voxels: divide by each window's own count first.
        counts = b.op(
            "Mul",
            [
                b.op(
                    "AveragePool",
                    [
                        b.op(
                            "ConstantOfShape",
                            [b.shape_of(x)],
                            value=numpy_helper.from_array(np.ones(1, b.dtype(x)), "one"),
                        )
                    ],
                    kernel_shape=kernel,
                    strides=strides,
                    pads=pads,
                    count_include_pad=1,
                ),
                b.scalar(size, x),
            ],
        )
        dy, weight = b.op("Div", [dy, counts]), 1.0
    else:
        weight = 1.0 / size
    ones = b.const(np.full((channels, 1, *kernel), weight, dtype=b.dtype(x)), hint="avg_kernel")
    in_shape, out_shape = b.shape(x)[2:], b.shape(y)[2:]
    output_padding = [
        in_shape[i] - ((out_shape[i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + spatial])
        for i in range(spatial)
    ]
    attributes = dict(strides=strides, pads=pads, group=channels, kernel_shape=kernel)
    if any(output_padding):
        attributes["output_padding"] = output_padding
    return {x: b.op("ConvTranspose", [dy, ones], "avgpool_grad", **attributes)}


@rule("GlobalAveragePool")
def _global_average_pool(b, node, dys, needs):
    x = node.input[0]
    spatial = [d for d in b.shape(x)[2:]]
    if not all(isinstance(d, int) for d in spatial):
        raise _unsupported(node, "unknown spatial size")
    spread = b.op("Expand", [dys[0], b.shape_of(x)])
    return {x: b.op("Mul", [spread, b.scalar(1.0 / int(np.prod(spatial)), x)])}

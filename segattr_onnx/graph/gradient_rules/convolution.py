"""Conv and ConvTranspose, each differentiated through the other (or a flipped-kernel Conv)."""

from __future__ import annotations

import numpy as np
import onnx

from segattr_onnx.graph.backward import GradientBuilder
from segattr_onnx.graph.gradient_rules._common import _unsupported, _window, rule


def _conv_geometry(b: GradientBuilder, node: onnx.NodeProto, small: str, large: str):
    """Strides, dilations, kernel and explicit pads of a Conv (``small`` = its output) or a
    ConvTranspose (``small`` = its input), resolving auto_pad from the static shapes."""
    weight_shape = b.shape(node.input[1])
    kernel = list(b.attribute(node, "kernel_shape", weight_shape[2:]))
    spatial = len(kernel)
    strides, dilations, pads, auto_pad = _window(b, node, kernel)
    small_shape, large_shape = b.shape(small)[2:], b.shape(large)[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * spatial)
        for i in range(spatial):
            extent = dilations[i] * (kernel[i] - 1) + 1
            total = max(0, (small_shape[i] - 1) * strides[i] + extent - large_shape[i])
            low = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + spatial] = low, total - low
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    return kernel, strides, dilations, pads, small_shape, large_shape


def _flipped_transposed_kernel(b: GradientBuilder, weight: str, group: int) -> str:
    """W'[c, m] = flip(W[m, c]) per group: the kernel whose correlation is Conv's adjoint."""
    shape = b.shape(weight)
    out_channels, in_per_group = int(shape[0]), int(shape[1])
    spatial = list(shape[2:])
    rank = len(shape)
    grouped = b.op(
        "Reshape",
        [
            weight,
            b.const(np.array([group, out_channels // group, in_per_group, *spatial], np.int64)),
        ],
    )
    swapped = b.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, rank + 1)])
    merged = b.op(
        "Reshape",
        [
            swapped,
            b.const(np.array([group * in_per_group, out_channels // group, *spatial], np.int64)),
        ],
    )
    axes = list(range(2, rank))
    big = np.iinfo(np.int64).max
    return b.op(
        "Slice",
        [
            merged,
            b.const(np.full(len(axes), -1, np.int64)),
            b.const(np.full(len(axes), -big, np.int64)),
            b.const(np.array(axes, np.int64)),
            b.const(np.full(len(axes), -1, np.int64)),
        ],
        "flip",
    )


def _refuse_computed_weights(node, needs) -> None:
    """Weights or a bias computed from the path (a dynamic filter) would need their own
    gradient; dropping it would be silently wrong."""
    if any(name in needs for name in node.input[1:] if name):
        raise _unsupported(node, "weights or bias computed from the explained layers")


@rule("Conv")
def _conv(b, node, dys, needs):
    x, y = node.input[0], node.output[0]
    _refuse_computed_weights(node, needs)
    if x not in needs:
        return {}
    kernel, strides, dilations, pads, out_shape, in_shape = _conv_geometry(b, node, y, x)
    spatial = len(kernel)
    group = b.attribute(node, "group", 1)
    reach = [dilations[i] * (kernel[i] - 1) for i in range(spatial)]
    adjoint_pads = [reach[i] - pads[i] for i in range(spatial)] + [
        reach[i] - pads[i + spatial] for i in range(spatial)
    ]
    if all(s == 1 for s in strides) and min(adjoint_pads) >= 0 and b.opset >= 10:
        # Stride 1: the adjoint is a correlation with the flipped, channel-swapped kernel — a
        # plain Conv, which runtimes run far faster than ConvTranspose (notably in 3D).
        flipped = _flipped_transposed_kernel(b, node.input[1], group)
        return {
            x: b.op(
                "Conv",
                [dys[0], flipped],
                "conv_grad",
                dilations=dilations,
                pads=adjoint_pads,
                group=group,
                kernel_shape=kernel,
            )
        }
    # The transposed convolution's output is short by the rows the forward floor dropped.
    output_padding = []
    for i in range(spatial):
        produced = (out_shape[i] - 1) * strides[i] + reach[i] + 1 - pads[i] - pads[i + spatial]
        output_padding.append(in_shape[i] - produced)
    attributes = dict(
        strides=strides, dilations=dilations, pads=pads, group=group, kernel_shape=kernel
    )
    if any(output_padding):
        attributes["output_padding"] = output_padding
    return {x: b.op("ConvTranspose", [dys[0], node.input[1]], "conv_grad", **attributes)}


@rule("ConvTranspose")
def _conv_transpose(b, node, dys, needs):
    _refuse_computed_weights(node, needs)
    x, y = node.input[0], node.output[0]
    if x not in needs:
        return {}
    if b.attribute(node, "output_shape") is not None:
        raise _unsupported(node, "the output_shape attribute")
    auto_pad = b.attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad.startswith("SAME") and any(b.attribute(node, "output_padding", [])):
        # ONNX shape inference and ONNX Runtime disagree on this output's size.
        raise _unsupported(node, "auto_pad SAME together with output_padding")
    kernel, strides, dilations, pads, _, _ = _conv_geometry(b, node, x, y)
    attributes = dict(
        strides=strides,
        dilations=dilations,
        pads=pads,
        group=b.attribute(node, "group", 1),
        kernel_shape=kernel,
    )
    return {x: b.op("Conv", [dys[0], node.input[1]], "convT_grad", **attributes)}

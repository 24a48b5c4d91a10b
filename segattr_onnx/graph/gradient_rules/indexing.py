"""Gather, GatherElements, GatherND and TopK: the gradient goes back to the positions read."""

from __future__ import annotations

import numpy as np

from segattr_onnx.graph.gradient_rules._common import _unsupported, rule


@rule("Gather")
def _gather(b, node, dys, needs):
    """Scatter the gradient back to the gathered positions (1-D indices: class picks; a scalar
    index, as exporters write x[:, k], is the one-index case with its axis dropped)."""
    x, indices = node.input[0], node.input[1]
    if x not in needs:
        return {}
    rank = b.rank(x)
    axis = b.attribute(node, "axis", 0) % rank
    dy = dys[0]
    if b.rank(indices) == 0:
        dy = b.unsqueeze(dy, [axis])
        indices = b.op("Reshape", [indices, b.const(np.array([1], np.int64))])
        count = 1
    elif b.rank(indices) == 1:
        (count,) = b.shape(indices)
    else:
        raise _unsupported(node, "indices of rank 2 or more")
    view = [1] * rank
    view[axis] = -1
    spread = b.op(
        "Expand",
        [b.op("Reshape", [indices, b.const(np.array(view, np.int64))]), b.shape_of(dy)],
    )
    if count == 1:
        return {x: b.op("ScatterElements", [b.zeros_like(x), spread, dy], axis=axis)}
    if b.opset < 16:
        raise _unsupported(node, "several indices before opset 16 (they may repeat)")
    added = b.op("ScatterElements", [b.zeros_like(x), spread, dy], axis=axis, reduction="add")
    return {x: added}


@rule("TopK")
def _top_k(b, node, dys, needs):
    """Values go back to the positions TopK's own indices name (distinct along the axis)."""
    x = node.input[0]
    if dys[0] is None:
        return {}
    if b.opset < 11:
        raise _unsupported(node, "opset below 11 (no ScatterElements)")
    axis = b.attribute(node, "axis", -1) % b.rank(x)
    return {x: b.op("ScatterElements", [b.zeros_like(x), node.output[1], dys[0]], axis=axis)}


@rule("GatherElements")
def _gather_elements(b, node, dys, needs):
    x = node.input[0]
    if x not in needs:
        return {}
    if b.opset < 16:
        raise _unsupported(node, "opset below 16 (indices may repeat: needs scatter-add)")
    axis = b.attribute(node, "axis", 0)
    added = b.op(
        "ScatterElements",
        [b.zeros_like(x), node.input[1], dys[0]],
        axis=axis,
        reduction="add",
    )
    return {x: added}


@rule("GatherND")
def _gather_nd(b, node, dys, needs):
    x = node.input[0]
    if x not in needs:
        return {}
    if b.attribute(node, "batch_dims", 0):
        raise _unsupported(node, "batch_dims (ScatterND has none)")
    if b.opset < 16:
        raise _unsupported(node, "opset below 16 (indices may repeat: needs scatter-add)")
    added = b.op("ScatterND", [b.zeros_like(x), node.input[1], dys[0]], reduction="add")
    return {x: added}

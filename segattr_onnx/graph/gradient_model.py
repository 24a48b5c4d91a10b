"""The backward model: a model's own graph plus the gradient of the target score.

Grad-CAM and Grad-CAM++ need ∂T/∂A_ℓ, the gradient of the target score T = Σ_R P with respect to
each explained layer's raw output. segattr-onnx builds it into the ONNX graph itself (reverse
mode, node by node: ``graph.backward``), so the gradients run in ONNX Runtime like any forward
pass and the weights never enter Python. This module assembles that model for one target and
set of layers; the engine caches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segattr_onnx.graph.backward import add_vjp
from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.graph.constants import fold_constants
from segattr_onnx.graph.heads import ScoreHeadSpec, append_target_score
from segattr_onnx.graph.index import GraphIndex
from segattr_onnx.graph.rewrite import expose
from segattr_onnx.graph.shapes import TensorInfo, fully_known, infer_tensor_infos, merge_infos
from segattr_onnx.target import ResolvedTarget


def build_gradient_model(
    analysis: ModelAnalysis,
    target: ResolvedTarget,
    spec: ScoreHeadSpec,
    layer_names: Sequence[str],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The model plus T (the score head ``spec``) and ∂T/∂A_ℓ of each layer's raw output.

    Returns the model and, per layer, the name of its gradient output; the raw activations
    are outputs too, so one run of it also serves as the case's observation.
    """
    headed, score = _with_target_score(analysis, target, spec, batch=1)
    activations = {name: analysis.layer(name).output for name in layer_names}
    infos = _path_infos(analysis, headed, score, list(activations.values()), batch=1)
    seed = _seed(headed, spec, batch=1)
    model, gradients = add_vjp(headed, infos, {score: seed}, list(activations.values()))
    # The raw activations too: the same run then serves as the observation.
    model = expose(model, activations.values(), infos)
    outputs = {name: gradients[tensor] for name, tensor in activations.items()}
    return model, outputs


def build_input_gradient_model(
    analysis: ModelAnalysis,
    target: ResolvedTarget,
    spec: ScoreHeadSpec,
    batch: int,
) -> tuple[onnx.ModelProto, str, str]:
    """The model plus T per row and ∂T/∂x, the gradient with respect to its input, for a
    batch of exactly ``batch`` inputs (the input-gradient methods: Integrated Gradients,
    SmoothGrad, Gradient×Input).

    The batch is fixed because the model is folded for it: a dynamic export's size arithmetic
    (Shape → Gather → Reshape) then becomes literals the rules read, as for batch 1. Rows
    stay independent: T is one sum per row, seeded with a one per row, so row i's gradient is
    that of its own T. Returns the model and the names of the gradient and T outputs.
    """
    headed, score = _with_target_score(analysis, target, spec, batch)
    image = analysis.input.name
    infos = _path_infos(analysis, headed, score, [image], batch)
    seed = _seed(headed, spec, batch)
    model, gradients = add_vjp(headed, infos, {score: seed}, [image])
    return model, gradients[image], score


def _with_target_score(
    analysis: ModelAnalysis, target: ResolvedTarget, spec: ScoreHeadSpec, batch: int
) -> tuple[onnx.ModelProto, str]:
    """The model folded for ``batch`` inputs, with T = Σ_R P per row appended; the region
    input is shaped (1, *S) and broadcast over the rows."""
    output = analysis.tensors[target.output]
    assert output.shape is not None
    # Constant chains (padding sizes, slice bounds) become literals the rules can read.
    # The backward model runs one case (or a fixed batch) at a time: its sizes are known.
    sizes = {
        name: tuple(
            batch if (axis == 0 and isinstance(d, str)) else d for axis, d in enumerate(info.shape)
        )
        for name, info in analysis.tensors.items()
        if fully_known(info) and info.shape
    }
    folded = fold_constants(analysis.model.proto, analysis.model.external_data_dir, sizes)
    headed, score = append_target_score(folded, spec)
    spatial = tuple(
        d for axis, d in enumerate(output.shape) if axis not in (0, target.channel_axis)
    )
    for graph_input in headed.graph.input:
        if graph_input.name == spec.region_input:
            graph_input.CopyFrom(
                helper.make_tensor_value_info(
                    spec.region_input, onnx.TensorProto.FLOAT, spec.feed_shape(spatial)
                )
            )
    return headed, score


def _path_infos(
    analysis: ModelAnalysis,
    headed: onnx.ModelProto,
    score: str,
    sources: Sequence[str],
    batch: int,
) -> dict[str, TensorInfo]:
    """Shapes of every tensor the backward pass from T to ``sources`` goes through (static
    inference, then ORT's symbolic inference, then a probe run, as for the analysis)."""
    index = GraphIndex(headed.graph)
    path = index.descendant_nodes(sources) & index.ancestor_nodes([score])
    on_path = [o for i in path for o in index.nodes[i].output if o]
    known = {n for n, info in analysis.tensors.items() if fully_known(info)}
    shape = analysis.input.shape if batch == 1 else (batch, *analysis.input.shape[1:])
    infos = infer_tensor_infos(
        headed,
        {analysis.input.name: shape},
        analysis.input.dynamic_batch,
        required=[n for n in on_path if n not in known and n != score],
        external_data_dir=analysis.model.external_data_dir,
    )
    # The folded graph's own shapes first (folding is what makes some known).
    return merge_infos(infos, analysis.tensors)


def _seed(headed: onnx.ModelProto, spec: ScoreHeadSpec, batch: int) -> str:
    """∂T/∂T: a one per row, as a constant of the backward model."""
    seed = f"{spec.prefix}.seed"
    headed.graph.initializer.append(numpy_helper.from_array(np.ones(batch, np.float32), seed))
    return seed

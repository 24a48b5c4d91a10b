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
from segattr_onnx.graph.shapes import fully_known, infer_tensor_infos, merge_infos
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
    output = analysis.tensors[target.output]
    assert output.shape is not None
    # Constant chains (padding sizes, slice bounds) become literals the rules can read.
    # The backward model runs one case at a time: its sizes are known, batch included.
    one_case = {
        name: tuple(
            1 if (axis == 0 and isinstance(d, str)) else d for axis, d in enumerate(info.shape)
        )
        for name, info in analysis.tensors.items()
        if fully_known(info) and info.shape
    }
    folded = fold_constants(analysis.model.proto, analysis.model.external_data_dir, one_case)
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
    activations = {name: analysis.layer(name).output for name in layer_names}
    # Every tensor the backward pass goes through needs its shape (static inference,
    # then ORT's symbolic inference, then a probe run, as for the analysis).
    index = GraphIndex(headed.graph)
    path = index.descendant_nodes(activations.values()) & index.ancestor_nodes([score])
    on_path = [o for i in path for o in index.nodes[i].output if o]
    known = {n for n, info in analysis.tensors.items() if fully_known(info)}
    infos = infer_tensor_infos(
        headed,
        {analysis.input.name: analysis.input.shape},
        analysis.input.dynamic_batch,
        required=[n for n in on_path if n not in known and n != score],
        external_data_dir=analysis.model.external_data_dir,
    )
    # The folded graph's own shapes first (folding is what makes some known).
    infos = merge_infos(infos, analysis.tensors)
    seed = f"{spec.prefix}.seed"
    headed.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), seed))
    model, gradients = add_vjp(headed, infos, {score: seed}, list(activations.values()))
    # The raw activations too: the same run then serves as the observation.
    model = expose(model, activations.values(), infos)
    outputs = {name: gradients[tensor] for name, tensor in activations.items()}
    return model, outputs

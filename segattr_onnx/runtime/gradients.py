"""Gradient runs: ∂T/∂A_ℓ of the selected layers from one run of a backward graph.

``graph/gradient_model.py`` builds a model that computes T = Σ_R P and the gradient of each
layer's raw output alongside the forward pass. Building one costs more than running it, so the
last few (per target head and layer selection) are kept here; each case then runs one. Because
that run computes the whole forward pass, it is also the case's observation whenever the seed
of T (the region) is known before the prediction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import onnx

from segattr_onnx.errors import GradientRuleError, TargetError
from segattr_onnx.graph.catalogue import KernelLayer, ModelAnalysis
from segattr_onnx.graph.gradient_model import build_gradient_model
from segattr_onnx.graph.heads import ScoreHeadSpec
from segattr_onnx.graph.shapes import fully_known
from segattr_onnx.runtime.chunks import ChunkedRunner
from segattr_onnx.runtime.observation import Observation, channel_first
from segattr_onnx.runtime.score_heads import ScoreHeads
from segattr_onnx.runtime.sessions import SessionCache
from segattr_onnx.target import ResolvedTarget

GRADIENT_MODELS_KEPT = 4  # backward models (and their sessions' keys) kept per input size

GradientModel = tuple[onnx.ModelProto, ScoreHeadSpec, dict[str, str]]


def target_feeds(
    analysis: ModelAnalysis,
    spec: ScoreHeadSpec,
    target: ResolvedTarget,
    region: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The feeds that pick T = Σ_R P in a backward graph: R as 0/1 floats shaped like the
    head's region input (all ones for None) and the class index. A mask whose size is not the
    prediction's is refused here, for every graph that takes these feeds."""
    info = analysis.tensors[target.output]
    assert info.shape is not None
    spatial = tuple(
        int(d) for axis, d in enumerate(info.shape) if axis not in (0, target.channel_axis)
    )
    shape = spec.feed_shape(spatial)
    if region is not None and np.asarray(region).size != int(np.prod(shape)):
        raise TargetError(
            f"the region mask has shape {np.asarray(region).shape} but the prediction of "
            f"{target.output!r} has spatial shape {spatial}; give a mask of that shape"
        )
    values = np.ones(shape, np.float32) if region is None else np.asarray(region, np.float32)
    feeds = {spec.region_input: values.reshape(shape)}
    if spec.class_input is not None:
        feeds[spec.class_input] = np.array([target.class_index], np.int64)
    return feeds


class GradientRunner:
    """Builds, keeps and runs the backward models of one analysed model."""

    def __init__(self, analysis: ModelAnalysis, sessions: SessionCache, heads: ScoreHeads) -> None:
        self.analysis = analysis
        self.sessions = sessions
        self.heads = heads  # T is the score head's sum, so the backward model shares its spec
        self._models: OrderedDict[tuple, GradientModel] = OrderedDict()

    def can_observe(self, target: ResolvedTarget) -> bool:
        """True when the seed of the backward pass is known before the prediction is: the
        region does not depend on P (all voxels, or a mask the user gives), and the output's
        size is known to shape the region's feed."""
        info = self.analysis.tensors.get(target.output)
        return target.region.kind in ("all", "mask") and info is not None and fully_known(info)

    def observe(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        gradients: dict[str, np.ndarray],
    ) -> Observation:
        """The observation and ∂T/∂A of every layer (into ``gradients``) from one run of the
        backward graph, which computes the whole forward pass anyway."""
        region = None if target.region.kind == "all" else target.region.mask
        values, nodes = self.run(x, layers, target, region, gradients)
        return Observation(
            outputs={target.output: values[target.output]},
            activations={
                layer.name: channel_first(self.analysis, layer, values[layer.output])
                for layer in layers
            },
            boundaries={},
            graph_nodes=nodes,
        )

    def run(
        self,
        x: np.ndarray,
        layers: Sequence[KernelLayer],
        target: ResolvedTarget,
        region: np.ndarray | None,
        gradients: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], int]:
        """One run of the backward graph for ``layers``: the gradients go to ``gradients``
        (layer → ∂T/∂A_ℓ); the run's values (the target output and the raw activations too)
        and the graph's node count are returned."""
        names = tuple(layer.name for layer in layers)
        model, spec, outputs = self.model(target, names)
        # ORT's NCHWc layout transform reorders every tensor the backward graph reads outside
        # a convolution (a fifth of the run) and re-packs the weights on the first run of
        # each new session: without it a fresh explanation's one gradient run is ~1.5× faster.
        session = self.sessions.get(
            ("gradients", spec, names), lambda: model, disabled_optimizers=("NchwcTransformer",)
        )
        feeds = target_feeds(self.analysis, spec, target, region)
        exposed = [target.output, *(layer.output for layer in layers), *outputs.values()]
        wanted = list(dict.fromkeys(exposed))
        values = ChunkedRunner(session).run({self.analysis.input.name: x, **feeds}, wanted)
        for layer in layers:
            gradients[layer.name] = channel_first(self.analysis, layer, values[outputs[layer.name]])
        return values, len(model.graph.node)

    def model(self, target: ResolvedTarget, layer_names: Sequence[str]) -> GradientModel:
        """The model plus T = Σ_R P and ∂T/∂A_ℓ of each layer's raw output, as outputs; also
        the head's spec and each layer's gradient output name."""
        for name in layer_names:
            layer = self.analysis.layer(name)
            activation = self.analysis.tensors.get(layer.output)
            if activation is not None and not activation.is_float:
                raise GradientRuleError(
                    f"layer {name!r} ({layer.op}) outputs integers, which have no gradient; "
                    "explain it with a gradient-free method (kwc, scorecam, ablationcam) or "
                    "choose float layers"
                )
        spec = self.heads.spec(target)
        key = (spec, tuple(layer_names))
        if key in self._models:
            self._models.move_to_end(key)
        else:
            model, outputs = build_gradient_model(self.analysis, target, spec, layer_names)
            self._models[key] = (model, spec, outputs)
            while len(self._models) > GRADIENT_MODELS_KEPT:
                self._models.popitem(last=False)
        return self._models[key]

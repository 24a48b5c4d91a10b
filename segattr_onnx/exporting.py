"""``segattr export``: a model that outputs its own explanation, runnable with onnxruntime alone.

Deployments run an ONNX file, often far from Python and never with segattr-onnx installed. The
gradient methods need nothing but the model's own forward and backward passes, which
segattr-onnx already writes as ONNX nodes (``graph/backward.py``), and a few reductions
(``graph/saliency.py``). So the explained model is that backward model with the saliency head
appended and every helper output removed: the original outputs unchanged, plus ``saliency``.
The target's class and region are inputs whose defaults (initialisers of the same name) are
the ones chosen at export, so one exported file serves every class.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from segattr_onnx.errors import MethodError, OutputFileError, TargetError
from segattr_onnx.explainer import Explainer
from segattr_onnx.files import check_new_file, publish_file
from segattr_onnx.graph.loading import LoadedModel, external_data_files, iter_all_tensors
from segattr_onnx.graph.saliency import EXPORTABLE_METHODS, SaliencyLayer, append_saliency
from segattr_onnx.methods.base import VARIANTS
from segattr_onnx.methods.layers import is_group_selection, select_layers
from segattr_onnx.runtime.gradients import target_feeds
from segattr_onnx.target import Target, default_output
from segattr_onnx.text import setting

SALIENCY_OUTPUT = "saliency"
CLASS_INPUT = "saliency_class"
REGION_INPUT = "saliency_region"
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file


@dataclass(frozen=True)
class ExportedModel:
    """The explained model and what a caller needs to feed it."""

    proto: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    class_input: str | None  # int64 [1], default the exported class; None for a one-map output
    region_input: str  # float32 0/1 of the output's spatial shape (class axis 1), default all
    method: str
    variant: str
    layers: tuple[str, ...]
    target: dict

    def summary(self) -> dict:
        return {
            "method": self.method,
            "variant": self.variant,
            "layers": list(self.layers),
            "target": self.target,
            "input": {"name": self.input_name, "shape": list(self.input_shape)},
            "class_input": self.class_input,
            "region_input": self.region_input,
            "saliency_output": SALIENCY_OUTPUT,
        }


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name == old:
                node.input[position] = new
    for value in model.graph.input:
        if value.name == old:
            value.name = new


def _taken_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {n for node in graph.node for n in (*node.input, *node.output)}
    return names | {t.name for t in graph.initializer} | {v.name for v in graph.input}


def explained_model(
    model: Explainer | LoadedModel | onnx.ModelProto | str | os.PathLike[str],
    method: str = "gradcam",
    layers: str | Sequence[str] = "decoder",
    target: Target | None = None,
    variant: str = "p2",
    input_shape: Sequence[int] | None = None,
) -> ExportedModel:
    """The model plus a ``saliency`` output computing ``method``'s map for its input.

    ``input_shape`` (batch axis included, batch 1) fixes the input size the backward graph is
    built for; None takes the model's own declared size, which must then be fixed.
    """
    if method not in EXPORTABLE_METHODS:
        raise MethodError(
            f"method {method!r} cannot be exported; the gradient methods can: "
            f"{', '.join(EXPORTABLE_METHODS)}"
        )
    if variant not in VARIANTS:
        raise MethodError(f"variant {variant!r} is unknown; use 'p1' or 'p2'")
    explainer = model if isinstance(model, Explainer) else Explainer(model, provider="cpu")
    shape = _input_shape(explainer, input_shape)
    analysis = explainer.analysis(shape)
    target = target or Target()
    if target.output is None and is_group_selection(layers):
        target = replace(target, output=default_output(analysis))
    chosen = select_layers(analysis, layers, target.output)
    resolved = target.resolve(analysis, chosen)
    region = resolved.region
    if region.kind not in ("all", "mask"):
        raise TargetError(
            f"the region ({region.description}) depends on the prediction, which an exported "
            "model cannot recompute; export with region 'all' (and feed a mask at run time) "
            "or give a mask"
        )
    runner = explainer.gradient_runner(shape)
    names = tuple(layer.name for layer in chosen)
    backward, spec, gradients = runner.model(resolved, names)
    layer_tensors = [
        SaliencyLayer(
            activation=layer.output,
            gradient=gradients[layer.name],
            channel_axis=layer.channel_axis,
            shape=_static_shape(analysis.tensors[layer.output].shape),
            elem_type=analysis.tensors[layer.output].elem_type,
        )
        for layer in chosen
    ]
    original_outputs = [o.name for o in analysis.model.proto.graph.output]
    taken = _taken_names(backward)
    for name in (SALIENCY_OUTPUT, CLASS_INPUT, REGION_INPUT):
        if name in taken:
            raise MethodError(
                f"the model already has a tensor named {name!r}; rename it before exporting"
            )
    proto = append_saliency(
        backward, layer_tensors, method, variant, analysis.input.spatial_shape, SALIENCY_OUTPUT
    )
    kept = [o for o in proto.graph.output if o.name in (*original_outputs, SALIENCY_OUTPUT)]
    original = {o.name: o for o in analysis.model.proto.graph.output}
    del proto.graph.output[:]
    proto.graph.output.extend(original.get(o.name, o) for o in kept)
    # The defaults are the feeds explain gives the backward graph (a mask of the wrong size is
    # refused there).
    defaults = target_feeds(analysis, spec, resolved, region.mask)
    region_default = defaults[spec.region_input]
    _rename(proto, spec.region_input, REGION_INPUT)
    _set_input(proto, REGION_INPUT, TensorProto.FLOAT, region_default.shape, region_default)
    class_input = None
    if spec.class_input is not None:
        _rename(proto, spec.class_input, CLASS_INPUT)
        _set_input(proto, CLASS_INPUT, TensorProto.INT64, (1,), defaults[spec.class_input])
        class_input = CLASS_INPUT
    _fix_image_input(proto, analysis.input.name, analysis.input.shape)
    del proto.graph.value_info[:]  # stale after the rewrites; the checker infers them again
    proto.ir_version = max(proto.ir_version, 4)  # inputs with default initialisers
    proto.doc_string = (
        f"{proto.doc_string}\nsegattr-onnx export: output {SALIENCY_OUTPUT!r} is the {method} "
        f"({variant}) map of layers {', '.join(names)}"
    ).strip()
    return ExportedModel(
        proto=proto,
        input_name=analysis.input.name,
        input_shape=tuple(analysis.input.shape),
        class_input=class_input,
        region_input=REGION_INPUT,
        method=method,
        variant=variant,
        layers=names,
        target=resolved.describe(),
    )


def _static_shape(shape: Sequence | None) -> tuple[int, ...]:
    """A layer's shape for one case: the batch is 1, every other size known."""
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise MethodError(
            f"a layer's shape {shape} is not known for this input size; give "
            f"{setting('--input-shape', 'input_shape=')}"
        )
    return (1, *(int(d) for d in shape[1:]))


def _input_shape(explainer: Explainer, given: Sequence[int] | None) -> tuple[int, ...]:
    """The input size to export for: the one given, or the model's declared one when fixed."""
    if given is not None:
        shape = tuple(int(d) for d in given)
    else:
        graph = explainer.model.proto.graph
        initializers = {t.name for t in graph.initializer}
        image = next(v for v in graph.input if v.name not in initializers)
        dims = image.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if any(d is None for d in declared[1:]):
            size = setting("--input-shape 1x1x256x256", "input_shape=(1, 1, 256, 256)")
            raise MethodError(
                f"the model's input {image.name!r} has free dimensions; give the size to "
                f"export for ({size})"
            )
        shape = (1, *(int(d) for d in declared[1:]))  # type: ignore[arg-type]
    if shape[0] != 1:
        raise MethodError(
            f"an exported explanation takes one case: the batch must be 1, not {shape[0]}"
        )
    return shape


def _set_input(
    model: onnx.ModelProto, name: str, elem_type: int, shape: Sequence[int], default: np.ndarray
) -> None:
    """Declare ``name`` as a typed input with ``default`` as its initialiser (used when the
    caller does not feed it)."""
    for value in model.graph.input:
        if value.name == name:
            value.CopyFrom(helper.make_tensor_value_info(name, elem_type, list(shape)))
    model.graph.initializer.append(numpy_helper.from_array(default, name))


def _fix_image_input(model: onnx.ModelProto, name: str, shape: Sequence[int]) -> None:
    """The image input declared with the one size the backward graph was built for."""
    for value in model.graph.input:
        if value.name == name:
            elem_type = value.type.tensor_type.elem_type
            value.CopyFrom(helper.make_tensor_value_info(name, elem_type, list(shape)))


def _has_external_data(model: LoadedModel) -> bool:
    return bool(external_data_files(model)) if model.path is not None else False


def check_export_paths(out: str | os.PathLike[str], model: LoadedModel, force: bool) -> Path:
    """Refuse, before any work, an output (OUT, and OUT.data beside it) that exists without
    ``force``, is a link, is one of the model's own files, or lies in a folder that is missing
    or not writable."""
    target = Path(out)
    protected = tuple(str(p) for p in (model.path, *external_data_files(model)) if p is not None)
    for candidate, suffix in ((target, ".onnx"), (data_file(target), ".onnx.data")):
        if candidate.is_symlink():
            raise OutputFileError(
                f"{str(candidate)!r} is a symbolic link; choose another {setting('--out', 'path')}"
            )
        check_new_file(candidate, (suffix,), force, protected)
    return target


def data_file(out: Path) -> Path:
    """Where an exported model's external data goes: ``OUT.data`` beside it."""
    return out.with_name(out.name + ".data")


def save_exported(
    exported: ExportedModel, out: Path, source: LoadedModel, force: bool = False
) -> list[Path]:
    """Write the model (and, when the source kept its weights in external data, its weights
    in ``OUT.data`` beside it): both are written in a temporary folder beside OUT first, then
    published, the data first; a failure removes what was published. Without ``force``
    nothing existing is replaced, even a file that appeared during the export. Returns the
    files written."""
    proto = onnx.ModelProto()
    proto.CopyFrom(exported.proto)
    if source.external_data_dir is not None:
        # Tensors still point at the source's data file: read them in before writing anew.
        external_data_helper.load_external_data_for_model(proto, str(source.external_data_dir))
    external = _has_external_data(source)
    try:
        with tempfile.TemporaryDirectory(prefix=".segattr-export-", dir=out.parent) as folder:
            staged = Path(folder) / out.name
            if external:
                for tensor in iter_all_tensors(proto):
                    if tensor.HasField("data_location"):
                        tensor.ClearField("data_location")
                        del tensor.external_data[:]
                onnx.save_model(
                    proto,
                    str(staged),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data_file(out).name,
                    size_threshold=EXTERNAL_THRESHOLD,
                )
                pairs = [(data_file(staged), data_file(out)), (staged, out)]
            else:
                onnx.save_model(proto, str(staged))
                pairs = [(staged, out)]
            published: list[Path] = []
            try:
                for source_path, target_path in pairs:
                    publish_file(source_path, target_path, force)
                    published.append(target_path)
            except BaseException:
                for path in published:
                    path.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise OutputFileError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
    return [out, *([data_file(out)] if external else [])]

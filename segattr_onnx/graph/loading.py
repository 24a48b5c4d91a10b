"""Loading a user's ONNX model without trusting it and without ever writing to it.

Weights stored as external data are *not* read into memory: the graph proto keeps the references
(after checking that each one stays inside the model's folder) and ONNX Runtime reads the files
itself through ``external_data_dir``. This keeps every proto we rewrite far below protobuf's 2 GB
limit, whatever the size of the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from segattr_onnx.errors import ModelFileError, UnsafeExternalDataError
from segattr_onnx.graph.validation import check_functions, check_graph, in_topological_order


@dataclass(frozen=True)
class LoadedModel:
    """A model proto plus the folder its external data lives in (None when it has none)."""

    proto: onnx.ModelProto
    path: Path | None = None
    external_data_dir: Path | None = None

    @property
    def display_name(self) -> str:
        return str(self.path) if self.path is not None else self.proto.graph.name or "<model>"


def _tensors_of_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors_of_graph(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors_of_graph(subgraph)


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model stores, including those inside subgraphs and local functions."""
    yield from _tensors_of_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t


def external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def external_data_files(model: str | os.PathLike[str] | LoadedModel) -> list[Path]:
    """The external-data files a model file names (those that exist), sorted: what else a run
    of it reads, so no output may replace them. A file onnx cannot read names none here; the
    load that follows says what is wrong with it."""
    if isinstance(model, LoadedModel):
        if model.path is None:
            return []
        proto, folder = model.proto, model.path.parent
    else:
        try:
            proto = onnx.load_model(str(model), load_external_data=False)
        except Exception:  # onnx's DecodeError and OSError alike: not ours to report here
            return []
        folder = Path(model).parent
    locations = {external_location(t) for t in iter_all_tensors(proto)} - {None, ""}
    return [folder / name for name in sorted(locations) if (folder / name).is_file()]


def check_external_data(model: onnx.ModelProto, model_dir: Path) -> bool:
    """Refuse any external-data path that escapes ``model_dir``; return whether there is any.

    A model from someone else could name ``../../etc/passwd`` or an absolute path as its weights
    file; ONNX Runtime would read it. Resolving symlinks before comparing stops both tricks.
    """
    root = Path(os.path.realpath(model_dir))
    found = False
    for tensor in iter_all_tensors(model):
        location = external_location(tensor)
        if location is None:
            continue
        found = True
        if not location:
            raise UnsafeExternalDataError(
                f"tensor {tensor.name!r} is stored externally but names no file; "
                "re-export the model with its external data"
            )
        if os.path.isabs(location):
            raise UnsafeExternalDataError(
                f"tensor {tensor.name!r} reads external data from the absolute path {location!r}; "
                "only files inside the model's own folder are allowed"
            )
        resolved = Path(os.path.realpath(root / location))
        if resolved != root and root not in resolved.parents:
            raise UnsafeExternalDataError(
                f"tensor {tensor.name!r} reads external data from {location!r}, outside the "
                f"model's folder {root}; move the data file next to the model"
            )
        if not resolved.is_file():
            raise ModelFileError(
                f"external data file {location!r} for tensor {tensor.name!r} is missing from "
                f"{root}; copy it next to the model"
            )
    return found


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read an ONNX file safely: validated external data, nothing written back."""
    model_path = Path(path)
    if not model_path.exists():
        raise ModelFileError(f"model file {str(model_path)!r} does not exist")
    if not model_path.is_file():
        raise ModelFileError(f"{str(model_path)!r} is not a file; pass the path of an .onnx file")
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError(
            f"{str(model_path)!r} is not a readable ONNX model ({type(exc).__name__}); "
            "pass a file written by an ONNX exporter"
        ) from exc
    if proto.ir_version <= 0 or not proto.graph.node:
        # Protobuf happily parses many non-ONNX byte strings into an empty message.
        raise ModelFileError(
            f"{str(model_path)!r} is not an ONNX model (no graph found); "
            "pass a file written by an ONNX exporter"
        )
    has_external = check_external_data(proto, model_path.parent)
    proto = _inline_functions(proto, repr(str(model_path)))
    proto = in_topological_order(proto, repr(str(model_path)))
    check_graph(proto, repr(str(model_path)))
    external_dir = Path(os.path.realpath(model_path.parent)) if has_external else None
    return LoadedModel(proto=proto, path=model_path, external_data_dir=external_dir)


def _inline_functions(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Inline model-local functions so convolutions inside them are seen and rewritable.

    TorchScript's ``export_modules_as_functions`` wraps whole blocks in local functions; the
    catalogue and the rewrites work on the main graph only. Recursive or explosive functions
    are refused first (``check_functions``), and whatever else the inliner refuses is a
    ``ModelFileError`` too.
    """
    if not proto.functions:
        return proto
    from onnx import inliner

    check_functions(proto, name)
    try:
        return inliner.inline_local_functions(proto)
    except Exception as exc:  # onnx raises its checker's ValidationError, RuntimeError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"the local functions of {name} cannot be inlined ({reason}); re-export the model"
        ) from exc


def from_proto(
    proto: onnx.ModelProto, external_data_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """Wrap an in-memory model (a copy is taken, so the caller's proto is never changed)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    copy = _inline_functions(copy, "the given ModelProto")
    if not copy.graph.node:
        raise ModelFileError("the given ModelProto has an empty graph; pass a complete model")
    copy = in_topological_order(copy, "the given ModelProto")
    check_graph(copy, "the given ModelProto")
    directory = None
    if external_data_dir is not None:
        directory = Path(os.path.realpath(external_data_dir))
        if not check_external_data(copy, directory):
            directory = None
    else:
        for tensor in iter_all_tensors(copy):
            if external_location(tensor) is not None:
                raise ModelFileError(
                    "the given ModelProto references external data; pass external_data_dir= "
                    "(the folder the data files are in) or load it from its file"
                )
    return LoadedModel(proto=copy, path=None, external_data_dir=directory)


def as_loaded_model(model: LoadedModel | onnx.ModelProto | str | os.PathLike[str]) -> LoadedModel:
    """Accept a path, a proto or an already loaded model wherever the API takes a model."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return from_proto(model)
    return load_model(model)

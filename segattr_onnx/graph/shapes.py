"""Static shapes and dtypes of every tensor, for one concrete input size.

Attribution needs the spatial size of each kernel layer (to find the bottleneck, to size masks and
memory budgets), so the analysis fixes the model's free spatial dims to the size the user gives,
keeps the batch dim symbolic (so batch-carrying tensors can be told apart), and runs onnx's shape
inference with data propagation, falling back to ONNX Runtime's symbolic shape inference when
onnx leaves a dim unknown.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from segattr_onnx.errors import InputShapeError, ShapeInferenceError
from segattr_onnx.graph.validation import (
    check_computed_sizes,
    check_declared_outputs,
    check_kernel_ranks,
)
from segattr_onnx.text import setting

BATCH_SYMBOL = "segattr_batch"
Dim = int | str | None
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Shape (ints, symbols or None per dim; None when even the rank is unknown) and dtype."""

    shape: tuple[Dim, ...] | None
    elem_type: int

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    def nbytes_per_item(self) -> int | None:
        """Bytes of one batch item, or None when a non-batch dim is unknown."""
        if self.shape is None:
            return None
        count = 1
        for position, dim in enumerate(self.shape):
            if position == 0 and not isinstance(dim, int):
                continue
            if not isinstance(dim, int):
                return None
            count *= dim
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] > 0:
            count //= self.shape[0]
        return count * self.numpy_dtype.itemsize


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``1x1x128x128`` (or ``1,1,128,128``) into a tuple of positive ints."""
    if not isinstance(text, str):
        dims = tuple(int(d) for d in text)
    else:
        parts = [p for p in re.split(r"[x,\s]+", text.strip().lower()) if p]
        if not parts or not all(p.isdigit() for p in parts):
            raise InputShapeError(
                f"input shape {text!r} is not a list of sizes; write it like 1x1x128x128"
            )
        dims = tuple(int(p) for p in parts)
    if any(d <= 0 for d in dims):
        raise InputShapeError(f"input shape {dims} has a non-positive size; every size must be > 0")
    return dims


def declared_dims(value_info: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    """Dims as declared on a graph input/output: int, symbol name, or None."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def resolve_input_shape(
    value_info: onnx.ValueInfoProto, user_shape: Sequence[int] | None
) -> tuple[int, ...]:
    """The concrete batch-1 input shape to analyse: the declared one, completed by the user's."""
    declared = declared_dims(value_info)
    name = value_info.name
    if user_shape is not None:
        user = tuple(user_shape)
        if declared is not None and len(user) == len(declared) - 1:
            user = (1, *user)
        if declared is not None and len(user) != len(declared):
            raise InputShapeError(
                f"input shape {'x'.join(map(str, user_shape))} has {len(user)} dims but input "
                f"{name!r} has {len(declared)} ({_format_dims(declared)})"
            )
        for position, (given, want) in enumerate(zip(user, declared or user, strict=True)):
            if position > 0 and isinstance(want, int) and want > 0 and given != want:
                raise InputShapeError(
                    f"input shape {'x'.join(map(str, user))} does not fit input {name!r} "
                    f"({_format_dims(declared)}): dim {position} must be {want}"
                )
        return (1, *user[1:])
    if declared is None:
        raise InputShapeError(
            f"input {name!r} declares no shape; give its size "
            f"({setting('--input-shape 1x1x128x128', 'input_shape=(1, 1, 128, 128)')})"
        )
    free = [str(d) for d in declared[1:] if not (isinstance(d, int) and d > 0)]
    if free:
        example = ["1"] + [str(d) if isinstance(d, int) and d > 0 else "128" for d in declared[1:]]
        raise InputShapeError(
            f"input {name!r} has free dims ({_format_dims(declared)}); give concrete sizes, "
            + setting(
                f"e.g. --input-shape {'x'.join(example)}",
                f"e.g. input_shape=({', '.join(example)})",
            )
        )
    return (1, *(int(d) for d in declared[1:]))  # type: ignore[arg-type]


def _format_dims(dims: tuple[Dim, ...] | None) -> str:
    if dims is None:
        return "unknown"
    return "x".join("?" if d is None else str(d) for d in dims)


def _collect(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    graph = model.graph
    for value_info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value_info.type.tensor_type
        if not value_info.type.HasField("tensor_type"):
            continue
        infos[value_info.name] = TensorInfo(declared_dims(value_info), tensor_type.elem_type)
    for initializer in graph.initializer:
        infos[initializer.name] = TensorInfo(
            tuple(int(d) for d in initializer.dims), initializer.data_type
        )
    return infos


def inferred_value_infos(model: onnx.ModelProto, names: set[str]) -> dict[str, TensorInfo]:
    """Shapes onnx's inference finds for ``names`` (tensors a rewrite added), those with a
    known rank only; empty when inference fails (onnx raises several unrelated types), for
    callers that only estimate (memory, multiply-adds) and can do without."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return {}
    return {
        value.name: TensorInfo(declared_dims(value), value.type.tensor_type.elem_type)
        for value in inferred.graph.value_info
        if value.name in names and declared_dims(value)
    }


def _collect_outputs(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    return {
        o.name: TensorInfo(declared_dims(o), o.type.tensor_type.elem_type)
        for o in model.graph.output
        if o.type.HasField("tensor_type")
    }


def fully_known(info: TensorInfo | None) -> bool:
    """Every dim known, the batch excepted."""
    if info is None or info.shape is None:
        return False
    return all(isinstance(d, int) for d in info.shape[1:])


def infer_tensor_infos(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    dynamic_batch: bool,
    required: Iterable[str] = (),
    external_data_dir: str | None = None,
) -> dict[str, TensorInfo]:
    """Shapes/dtypes of all tensors with the inputs fixed to ``input_shapes`` (batch kept symbolic).

    ``required`` names tensors whose non-batch dims must come out known; if onnx's inference
    leaves any unknown, ONNX Runtime's symbolic inference is tried, and last a probe run of the
    model on zeros that reads the real shapes (contrib ops such as com.microsoft.FusedConv are
    known to neither static inference).
    """
    analysed = onnx.ModelProto()
    analysed.CopyFrom(model)
    # Exporters' value_info can carry stale symbols; the inferred ones for our fixed input win.
    del analysed.graph.value_info[:]
    for graph_input in analysed.graph.input:
        if graph_input.name not in input_shapes:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        wanted = input_shapes[graph_input.name]
        del dims[:]
        for position, size in enumerate(wanted):
            dim = dims.add()
            if position == 0 and dynamic_batch:
                dim.dim_param = BATCH_SYMBOL
            else:
                dim.dim_value = int(size)
    # Declared output shapes are checked, not trusted: inference sizes the outputs itself, a
    # declaration it contradicts is refused, and one stands only where inference cannot tell.
    declared = _collect_outputs(analysed)
    for graph_output in analysed.graph.output:
        if graph_output.type.HasField("tensor_type"):
            graph_output.type.tensor_type.ClearField("shape")
    required = list(required)
    infos: dict[str, TensorInfo] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(analysed, strict_mode=False, data_prop=True)
        infos = _collect(inferred)
    except Exception as exc:  # onnx raises several unrelated types here
        _log.info("onnx shape inference failed (%s); trying ONNX Runtime's", exc)
    check_declared_outputs(model, input_shapes, {n: info.shape for n, info in infos.items()})
    infos = merge_infos(infos, declared)
    if not all(fully_known(infos.get(name)) for name in required):
        infos = merge_infos(infos, _symbolic_infos(analysed))
    check_kernel_ranks(model, {name: info.shape for name, info in infos.items()})
    unknown = [name for name in required if not fully_known(infos.get(name))]
    if unknown:
        probed = _probe_run_infos(
            model, input_shapes, unknown, dynamic_batch, external_data_dir, infos
        )
        infos = merge_infos(infos, probed)
    missing = [name for name in required if not fully_known(infos.get(name))]
    if missing:
        raise ShapeInferenceError(
            f"could not infer the shape of {len(missing)} tensor(s) such as {missing[0]!r}; "
            f"give the exact size the model expects ({setting('--input-shape', 'input_shape=')})"
        )
    sizes = " and ".join("x".join(map(str, shape)) for shape in input_shapes.values())
    # Outputs as computed, not as declared (some exporters write -1 for a free dim).
    outputs = [name for name in declared if infos.get(name) is not declared[name]]
    check_computed_sizes({n: i.shape for n, i in infos.items()}, [*required, *outputs], sizes)
    return infos


def _symbolic_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """ONNX Runtime's symbolic inference, driven here rather than through ``infer_shapes``.

    Its ``infer_shapes`` saves ``sym_shape_infer_temp.onnx`` (weights included) into the current
    directory whenever inference is incomplete; a tool run on someone's model must not litter
    their working directory, and a partial result is still useful to us.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_opset

        opset = get_opset(model)
        if not opset or opset < 7:
            return {}
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        inferred = inference.out_mp_
    except Exception as exc:  # the tool raises bare Exceptions on unsupported graphs
        _log.info("ONNX Runtime symbolic shape inference failed: %s", exc)
        return {}
    return _collect(inferred)


def _check_probe_fits(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before allocating it, a probe input larger than the free memory: a run needs
    its input and more (an --input-shape of 999999x999999 once asked numpy for 3.6 TiB)."""
    from segattr_onnx.runtime.chunks import available_memory_bytes
    from segattr_onnx.runtime.memory import format_bytes

    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    needed = 0
    for name, shape in input_shapes.items():
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types.get(name, 1))).itemsize
        needed += math.prod(int(d) for d in shape) * itemsize
    free = available_memory_bytes()
    if needed > free:
        sizes = " and ".join("x".join(map(str, shape)) for shape in input_shapes.values())
        raise InputShapeError(
            f"an input of {sizes} takes {format_bytes(needed)}, more than the free memory "
            f"({format_bytes(free)}); give a smaller input size "
            f"({setting('--input-shape', 'input_shape=')})"
        )


def _probe_run_infos(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    names: list[str],
    dynamic_batch: bool,
    external_data_dir: str | None,
    known: dict[str, TensorInfo],
) -> dict[str, TensorInfo]:
    """Shapes read from one CPU run on zeros with ``names`` exposed as outputs."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    # ORT needs an element type on every output; unknown ones are guessed from the image input.
    fallback_type = next(
        (i.type.tensor_type.elem_type for i in model.graph.input if i.name in input_shapes),
        onnx.TensorProto.FLOAT,
    )
    for name in names:
        if name not in present:
            elem_type = known[name].elem_type if name in known else fallback_type
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    del probe.graph.value_info[:]
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if external_data_dir is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data_dir)
        )
    _check_probe_fits(model, input_shapes)
    feeds = {}
    stored = {t.name for t in model.graph.initializer}
    for graph_input in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        if graph_input.name in input_shapes:
            feeds[graph_input.name] = np.zeros(input_shapes[graph_input.name], dtype=dtype)
            continue
        # Inputs a rewrite added with a fixed size (a score head's region and class index):
        # zeros serve for shapes as well as any value.
        dims = declared_dims(graph_input)
        if (
            graph_input.name not in stored
            and dims is not None
            and all(isinstance(d, int) for d in dims)
        ):
            feeds[graph_input.name] = np.zeros(dims, dtype=dtype)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        values = session.run(names, feeds)
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
        _log.info("probe run for shapes failed: %s", exc)
        return {}
    infos = {}
    for name, value in zip(names, values, strict=True):
        shape: tuple[Dim, ...] = tuple(int(d) for d in value.shape)
        if dynamic_batch and shape:
            shape = (BATCH_SYMBOL, *shape[1:])
        infos[name] = TensorInfo(shape, onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
    return infos


def merge_infos(
    first: dict[str, TensorInfo], second: dict[str, TensorInfo]
) -> dict[str, TensorInfo]:
    """``first``, with the tensors it leaves unknown taken from ``second``."""
    merged = dict(first)
    for name, info in second.items():
        if not fully_known(merged.get(name)) and info.shape is not None:
            merged[name] = info
    return merged


def activation_bytes_per_item(model: onnx.ModelProto, infos: dict[str, TensorInfo]) -> int | None:
    """Upper bound on the bytes one batch item's activations take in ``model`` (None if unknown).

    Sums every node output (ONNX Runtime reuses buffers, so the real peak is lower); tensors the
    analysis has no shape for are ignored, tensors with a known rank but unknown dims give None.
    """
    total = 0
    for node in model.graph.node:
        for name in node.output:
            info = infos.get(name)
            if info is None or info.shape is None:
                continue
            size = info.nbytes_per_item()
            if size is None:
                return None
            total += size
    return total

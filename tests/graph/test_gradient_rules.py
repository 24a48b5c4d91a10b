"""Every gradient rule against central finite differences.

Each case is a tiny graph around one operator. With a random cotangent R on its output and a
random direction V on one input, the rule's vector-Jacobian product must satisfy
⟨VJPᵣ, V⟩ = d/dε ⟨R, f(x + εV)⟩, estimated by (g(ε) − g(−ε)) / 2ε. The graphs run in float64
where ONNX Runtime has float64 kernels; linear operators (convolutions, pooling, resizing,
layout ops) are checked with ε = 1, where central differences are exact, so float32 is as tight.
A wrong sign, a missing broadcast reduction or a misplaced pad moves ⟨VJP, V⟩ by O(1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.errors import GradientRuleError
from segattr_onnx.graph.backward import add_vjp
from segattr_onnx.graph.shapes import infer_tensor_infos

F64, F32 = TensorProto.DOUBLE, TensorProto.FLOAT


@dataclass
class Case:
    name: str
    nodes: list
    inputs: dict  # name → shape (differentiated)
    constants: dict = field(default_factory=dict)  # name → array (not differentiated)
    elem: int = F64
    linear: bool = False
    opset: int = 17
    positive: bool = False  # inputs drawn away from 0 (logs, divisions)
    rtol: float | None = None
    epsilon: float | None = None


def _np(elem: int):
    return np.float64 if elem == F64 else np.float32


def _model(case: Case) -> onnx.ModelProto:
    output = case.nodes[-1].output[0]
    graph = helper.make_graph(
        case.nodes,
        case.name,
        [helper.make_tensor_value_info(n, case.elem, s) for n, s in case.inputs.items()],
        [helper.make_tensor_value_info(output, case.elem, None)],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in case.constants.items()],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", case.opset)],
        ir_version=8 if case.opset <= 20 else 10,
    )


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def check(case: Case, seed: int = 0, rtol: float | None = None) -> None:
    rng = np.random.default_rng(seed)
    dtype = _np(case.elem)
    model = _model(case)
    output = case.nodes[-1].output[0]
    # As the engine does for the path: every tensor's shape, by a probe run where need be.
    path = [name for n in case.nodes for name in n.output if name]
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False, required=path)
    out_shape = infos[output].shape
    forward = _session(model)
    model.graph.input.append(helper.make_tensor_value_info("seed", case.elem, out_shape))
    wrt = list(case.inputs)
    backward, grads = add_vjp(model, infos, {output: "seed"}, wrt)
    both = _session(backward)

    def draw(shape):
        values = rng.standard_normal(shape)
        if case.positive:
            values = np.abs(values) + 0.5
        return values.astype(dtype)

    x = {n: draw(s) for n, s in case.inputs.items()}
    cotangent = rng.standard_normal(out_shape).astype(dtype)
    names = [grads[n] for n in wrt]
    values = dict(zip(names, both.run(names, {**x, "seed": cotangent}), strict=True))
    epsilon = case.epsilon or (1.0 if case.linear else (1e-6 if case.elem == F64 else 1e-3))
    tolerance = rtol or case.rtol or (1e-6 if case.elem == F64 else (1e-5 if case.linear else 2e-2))
    for name in wrt:
        direction = rng.standard_normal(case.inputs[name]).astype(dtype)

        def g(step: float, name=name, direction=direction) -> float:
            shifted = {**x, name: (x[name] + step * direction).astype(dtype)}
            return float(np.sum(cotangent.astype(np.float64) * forward.run(None, shifted)[0]))

        numeric = (g(epsilon) - g(-epsilon)) / (2 * epsilon)
        analytic = float(np.sum(values[grads[name]].astype(np.float64) * direction))
        scale = max(abs(numeric), np.abs(values[grads[name]]).sum() * 1e-3, 1e-12)
        assert abs(analytic - numeric) <= tolerance * scale, (
            f"{case.name} d/d{name}: analytic {analytic:.8g} vs numeric {numeric:.8g}"
        )


def node(op, inputs, output="y", **attributes):
    return helper.make_node(op, inputs, [output], **attributes)


W3 = np.random.default_rng(5).standard_normal((6, 4, 3, 3)).astype(np.float32)
W3D = np.random.default_rng(6).standard_normal((4, 2, 3, 3, 3)).astype(np.float32)
WT = np.random.default_rng(7).standard_normal((4, 3, 2, 2)).astype(np.float32)
WG = np.random.default_rng(8).standard_normal((6, 2, 3, 3)).astype(np.float32)

ELEMENTWISE = [
    Case("relu", [node("Relu", ["x"])], {"x": [2, 3, 4, 5]}),
    Case("leaky", [node("LeakyRelu", ["x"], alpha=0.1)], {"x": [2, 3, 4]}, elem=F32),
    Case(
        "prelu",
        [node("PRelu", ["x", "s"])],
        {"x": [2, 3, 4, 4]},
        {"s": np.array([[[0.1]], [[0.2]], [[0.3]]], np.float32)},
        elem=F32,
    ),
    Case("elu", [node("Elu", ["x"], alpha=0.7)], {"x": [2, 3, 4]}, elem=F32),
    Case("sigmoid", [node("Sigmoid", ["x"])], {"x": [2, 3, 4]}),
    Case("hardsigmoid", [node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)], {"x": [3, 8]}, elem=F32),
    Case(
        "hardswish",
        [node("Mul", ["x", "k"], "x4"), node("HardSwish", ["x4"])],
        {"x": [3, 8]},
        {"k": np.array(4.0, np.float32)},
        elem=F32,
    ),
    Case("tanh", [node("Tanh", ["x"])], {"x": [2, 3, 4]}),
    Case(
        "clip",
        [node("Clip", ["x", "lo", "hi"])],
        {"x": [4, 6]},
        {"lo": np.array(-0.5), "hi": np.array(0.7)},
    ),
    Case(
        "clip_opset6", [node("Clip", ["x"], min=-0.5, max=0.7)], {"x": [4, 6]}, elem=F32, opset=10
    ),
    Case("erf", [node("Erf", ["x"])], {"x": [3, 5]}, elem=F32),
    Case("softmax13", [node("Softmax", ["x"], axis=1)], {"x": [2, 3, 4, 5]}),
    Case("softmax11_2d_coerced", [node("Softmax", ["x"], axis=1)], {"x": [2, 3, 4]}, opset=11),
    Case("logsoftmax", [node("LogSoftmax", ["x"], axis=-1)], {"x": [2, 3, 4]}),
    Case(
        "cast",
        [
            node("Cast", ["x"], "c", to=F32),
            node("Mul", ["c", "c"], "z"),
            node("Cast", ["z"], to=F64),
        ],
        {"x": [3, 4]},
        rtol=1e-4,
        epsilon=1e-2,  # the float32 middle cannot resolve smaller steps; z = c² has no O(ε²) error
    ),
]

ELEMENTWISE += [
    Case("reciprocal", [node("Reciprocal", ["x"])], {"x": [3, 4]}, positive=True),
    Case(
        "gather_class",
        [node("Gather", ["x", "i"], axis=1)],
        {"x": [2, 3, 4, 4]},
        {"i": np.array([2], np.int64)},
        linear=True,
    ),
]

BINARY = [
    Case("add_broadcast", [node("Add", ["a", "b"])], {"a": [2, 3, 4, 5], "b": [3, 1, 1]}),
    Case("sub_broadcast", [node("Sub", ["a", "b"])], {"a": [2, 1, 4], "b": [3, 1]}),
    Case("mul_broadcast", [node("Mul", ["a", "b"])], {"a": [2, 3, 4, 5], "b": [1, 3, 1, 1]}),
    Case("div_broadcast", [node("Div", ["a", "b"])], {"a": [2, 3, 4], "b": [1, 4]}, positive=True),
    Case("mul_same", [node("Mul", ["a", "a"])], {"a": [2, 3]}),
    Case(
        "mul_constant",
        [node("Mul", ["a", "c"])],
        {"a": [2, 3, 4]},
        {"c": np.arange(3, dtype=np.float64).reshape(3, 1)},
    ),
    Case("matmul_batched", [node("MatMul", ["a", "b"])], {"a": [2, 3, 4], "b": [4, 5]}),
    Case(
        "gemm_trans",
        [node("Gemm", ["a", "b", "c"], transA=1, transB=1, alpha=0.5, beta=2.0)],
        {"a": [4, 3], "b": [5, 4], "c": [1, 5]},
        elem=F32,
        linear=False,
    ),
]

NORMALISATION = [
    Case(
        "batchnorm",
        [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        {"x": [2, 3, 4, 4]},
        {
            "s": np.array([0.5, 2, -1.0]),
            "b": np.array([0.1, 0.2, 0.3]),
            "m": np.array([0.0, 1, -1]),
            "v": np.array([1.0, 0.5, 2]),
        },
        linear=True,
    ),
    Case(
        "instancenorm",
        [node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-5)],
        {"x": [2, 3, 4, 5]},
        {"s": np.array([0.5, 2, -1.0], np.float32), "b": np.array([0.1, 0.2, 0.3], np.float32)},
        elem=F32,
    ),
    Case(
        "instancenorm3d",
        [node("InstanceNormalization", ["x", "s", "b"])],
        {"x": [1, 2, 3, 4, 4]},
        {"s": np.array([1.5, -0.7], np.float32), "b": np.array([0.0, 1.0], np.float32)},
        elem=F32,
    ),
]

W1 = np.random.default_rng(9).standard_normal((6, 4, 1, 1)).astype(np.float32)
WT3D = np.random.default_rng(11).standard_normal((4, 1, 2, 3, 2)).astype(np.float32)

LINEAR = [
    Case(
        "convtranspose3d_grouped_dilated",
        [
            node(
                "ConvTranspose",
                ["x", "w"],
                group=2,
                strides=[2, 1, 2],
                dilations=[1, 2, 1],
                pads=[0, 1, 0, 1, 0, 0],
            )
        ],
        {"x": [1, 4, 3, 4, 3]},
        {"w": WT3D},
        elem=F32,
        linear=True,
    ),
    Case(
        "identity_dropout",
        [node("Identity", ["x"], "i"), node("Dropout", ["i"])],
        {"x": [2, 3]},
        linear=True,
    ),
    Case(
        "conv_stride1_asym_dilated",
        [node("Conv", ["x", "w"], dilations=[2, 1], pads=[1, 0, 3, 2])],
        {"x": [1, 4, 7, 6]},
        {"w": W3},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_stride1_grouped3d",
        [node("Conv", ["x", "w"], group=2, pads=[1] * 6)],
        {"x": [1, 4, 3, 4, 5]},
        {"w": np.random.default_rng(10).standard_normal((6, 2, 3, 3, 3)).astype(np.float32)},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_pads_beyond_kernel",
        [node("Conv", ["x", "w"], pads=[2, 2, 1, 1])],
        {"x": [1, 4, 3, 3]},
        {"w": W1},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_stride_pad",
        [node("Conv", ["x", "w"], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"x": [2, 4, 7, 6]},
        {"w": W3},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_dilated_asym",
        [node("Conv", ["x", "w"], dilations=[2, 1], pads=[2, 0, 1, 1])],
        {"x": [1, 4, 9, 8]},
        {"w": W3},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_grouped",
        [node("Conv", ["x", "w"], group=2, pads=[1, 1, 1, 1])],
        {"x": [1, 4, 5, 5]},
        {"w": WG},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv_same_upper",
        [node("Conv", ["x", "w"], strides=[2, 2], auto_pad="SAME_UPPER")],
        {"x": [1, 4, 8, 7]},
        {"w": W3},
        elem=F32,
        linear=True,
    ),
    Case(
        "conv3d_stride",
        [node("Conv", ["x", "w"], strides=[2, 1, 2], pads=[1] * 6)],
        {"x": [1, 2, 5, 4, 6]},
        {"w": W3D},
        elem=F32,
        linear=True,
    ),
    Case(
        "convtranspose",
        [node("ConvTranspose", ["x", "w"], strides=[2, 2])],
        {"x": [2, 4, 3, 5]},
        {"w": WT},
        elem=F32,
        linear=True,
    ),
    Case(
        "convtranspose_pad_outpad",
        [
            node(
                "ConvTranspose",
                ["x", "w"],
                strides=[2, 2],
                pads=[1, 0, 0, 1],
                output_padding=[1, 1],
            )
        ],
        {"x": [1, 4, 3, 4]},
        {"w": WT},
        elem=F32,
        linear=True,
    ),
    Case(
        "maxpool",
        [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])],
        {"x": [2, 3, 6, 4]},
        elem=F32,
        linear=False,
    ),
    Case(
        "maxpool_overlap",
        [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[1, 1])],
        {"x": [1, 2, 5, 5]},
        elem=F32,
        linear=False,
    ),
    Case(
        "maxpool3d",
        [node("MaxPool", ["x"], kernel_shape=[2, 2, 2], strides=[2, 2, 2])],
        {"x": [1, 2, 4, 4, 4]},
        elem=F32,
        linear=False,
    ),
    Case(
        "avgpool",
        [node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2])],
        {"x": [2, 3, 4, 6]},
        elem=F32,
        linear=True,
    ),
    Case(
        "avgpool_pad_exclude",
        [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        {"x": [1, 2, 5, 6]},
        elem=F32,
        linear=True,
    ),
    Case(
        "globalavgpool",
        [node("GlobalAveragePool", ["x"])],
        {"x": [2, 3, 4, 5]},
        elem=F32,
        linear=True,
    ),
    Case(
        "reducemean",
        [node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)],
        {"x": [2, 3, 4, 5]},
        linear=True,
        opset=13,
    ),
    Case(
        "reducesum18",
        [node("ReduceSum", ["x", "axes"], keepdims=1)],
        {"x": [2, 3, 4]},
        {"axes": np.array([1], np.int64)},
        linear=True,
        opset=18,
    ),
    Case(
        "transpose", [node("Transpose", ["x"], perm=[0, 2, 3, 1])], {"x": [2, 3, 4, 5]}, linear=True
    ),
    Case(
        "reshape",
        [node("Reshape", ["x", "s"])],
        {"x": [2, 3, 4]},
        {"s": np.array([6, -1], np.int64)},
        linear=True,
    ),
    Case("flatten", [node("Flatten", ["x"], axis=2)], {"x": [2, 3, 4]}, linear=True),
    Case(
        "squeeze_unsqueeze",
        [node("Unsqueeze", ["x", "a"], "u"), node("Squeeze", ["u", "a"])],
        {"x": [2, 3]},
        {"a": np.array([1], np.int64)},
        linear=True,
    ),
    Case(
        "concat",
        [node("Concat", ["a", "b"], axis=1)],
        {"a": [2, 3, 4], "b": [2, 5, 4]},
        linear=True,
    ),
    Case(
        "split",
        [helper.make_node("Split", ["x", "s"], ["p", "q"], axis=1), node("Mul", ["q", "c"])],
        {"x": [2, 5, 3]},
        {"s": np.array([2, 3], np.int64), "c": np.full((1, 3, 1), 2.0)},
        linear=True,
    ),
    Case(
        "slice",
        [node("Slice", ["x", "st", "en", "ax"])],
        {"x": [2, 6, 5]},
        {
            "st": np.array([1, -4], np.int64),
            "en": np.array([5, 100], np.int64),
            "ax": np.array([1, 2], np.int64),
        },
        linear=True,
    ),
    Case(
        "pad_negative",
        [node("Pad", ["x", "p"])],
        {"x": [2, 3, 5]},
        {"p": np.array([0, 1, -1, 0, 2, 1], np.int64)},
        linear=True,
    ),
    Case(
        "expand",
        [node("Expand", ["x", "s"])],
        {"x": [3, 1]},
        {"s": np.array([2, 3, 4], np.int64)},
        linear=True,
    ),
    Case(
        "resize_linear_half_pixel",
        [node("Resize", ["x", "", "sc"], mode="linear")],
        {"x": [1, 2, 3, 5]},
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        elem=F32,
        linear=True,
    ),
    Case(
        # Scales an exporter computes in the graph: an integer size ratio pins the mapping.
        "resize_linear_runtime_scales",
        [node("Identity", ["sc0"], "sc"), node("Resize", ["x", "", "sc"], mode="linear")],
        {"x": [1, 2, 3, 5]},
        {"sc0": np.array([1, 1, 2, 2], np.float32)},
        elem=F32,
        linear=True,
    ),
    Case(
        "resize_linear_align_sizes",
        [
            node(
                "Resize",
                ["x", "", "", "sz"],
                mode="linear",
                coordinate_transformation_mode="align_corners",
            )
        ],
        {"x": [1, 2, 3, 4]},
        {"sz": np.array([1, 2, 7, 9], np.int64)},
        elem=F32,
        linear=True,
    ),
    Case(
        "resize_nearest",
        [node("Resize", ["x", "", "sc"], mode="nearest")],
        {"x": [1, 2, 3, 4]},
        {"sc": np.array([1, 1, 2, 3], np.float32)},
        elem=F32,
        linear=True,
    ),
    Case(
        "resize_trilinear",
        [node("Resize", ["x", "", "sc"], mode="linear")],
        {"x": [1, 2, 2, 3, 4]},
        {"sc": np.array([1, 1, 2, 2, 2], np.float32)},
        elem=F32,
        linear=True,
    ),
    Case(
        "dequantize_quantize",
        [node("QuantizeLinear", ["x", "s", "z"], "q"), node("DequantizeLinear", ["q", "s", "z"])],
        {"x": [2, 3]},
        {"s": np.array(0.05, np.float32), "z": np.array(0, np.uint8)},
        elem=F32,
        linear=True,
    ),
]


EXPORT_PATTERNS = [
    Case(
        "maxpool_padded_ceil",
        [
            node(
                "MaxPool",
                ["x"],
                kernel_shape=[2, 2],
                strides=[2, 2],
                pads=[1, 0, 0, 1],
                ceil_mode=1,
            )
        ],
        {"x": [1, 2, 5, 5]},
        elem=F32,
    ),
    Case(
        "maxpool_dilated",
        [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2])],
        {"x": [1, 2, 8, 8]},
        elem=F32,
    ),
    Case(
        "resize_opset11_scales",
        [node("Resize", ["x", "roi", "sc"], mode="linear")],
        {"x": [1, 2, 3, 4]},
        {"roi": np.zeros(0, np.float32), "sc": np.array([1, 1, 2, 2], np.float32)},
        elem=F32,
        linear=True,
        opset=11,
    ),
    Case(
        "resize_opset12_sizes",
        [node("Resize", ["x", "roi", "sc", "sz"], mode="nearest")],
        {"x": [1, 2, 3, 4]},
        {
            "roi": np.zeros(0, np.float32),
            "sc": np.zeros(0, np.float32),
            "sz": np.array([1, 2, 5, 9], np.int64),
        },
        elem=F32,
        linear=True,
        opset=12,
    ),
    Case(
        "resize_opset10",
        [node("Resize", ["x", "sc"], mode="linear")],
        {"x": [1, 2, 3, 4]},
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        elem=F32,
        linear=True,
        opset=10,
    ),
    Case(
        "upsample_opset9",
        [node("Upsample", ["x", "sc"], mode="nearest")],
        {"x": [1, 2, 3, 4]},
        {"sc": np.array([1, 1, 2, 2], np.float32)},
        elem=F32,
        linear=True,
        opset=9,
    ),
    Case(
        "upsample_opset8",
        [node("Upsample", ["x"], mode="nearest", scales=[1.0, 1, 2, 2])],
        {"x": [1, 2, 3, 4]},
        elem=F32,
        linear=True,
        opset=8,
    ),
    Case("concat_repeated", [node("Concat", ["a", "a"], axis=1)], {"a": [2, 3, 4]}, linear=True),
    Case("sum_repeated", [node("Sum", ["a", "a", "a"])], {"a": [2, 3]}, linear=True),
    Case(
        "gather_repeated_indices",
        [node("Gather", ["x", "i"], axis=1)],
        {"x": [2, 3, 4]},
        {"i": np.array([1, 1, 2], np.int64)},
        linear=True,
        opset=16,
    ),
]


def _reduction_cases() -> list[Case]:
    """Each smooth or selecting reduction with axes as attribute (opset 13, keepdims 0) and as
    input (opset 18, keepdims 1)."""
    cases = []
    for op in ("ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp"):
        cases += _reduction_pair(op)
    cases += _reduction_pair("ReduceSumSquare")
    cases += _reduction_pair("ReduceProd")
    cases += _reduction_pair("ReduceLogSum", positive=True)
    return cases


def _reduction_pair(op: str, positive: bool = False) -> list[Case]:
    return [
        Case(
            f"{op.lower()}13_keepdims0",
            [node(op, ["x"], axes=[1, 3], keepdims=0)],
            {"x": [2, 3, 4, 5]},
            opset=13,
            positive=positive,
        ),
        Case(
            f"{op.lower()}18_axes_input",
            [node(op, ["x", "ax"], keepdims=1)],
            {"x": [2, 3, 4]},
            {"ax": np.array([-1], np.int64)},
            opset=18,
            positive=positive,
        ),
    ]


def _pad(mode: str, opset: int, pads: list[int], axes: list[int] | None = None) -> Case:
    if opset < 11:
        nodes = [node("Pad", ["x"], mode=mode, pads=pads)]
        constants = {}
    else:
        nodes = [node("Pad", ["x", "p", "", "ax"] if axes else ["x", "p"], mode=mode)]
        constants = {"p": np.array(pads, np.int64)}
        if axes:
            constants["ax"] = np.array(axes, np.int64)
    return Case(
        f"pad_{mode}{opset}", nodes, {"x": [2, 3, 4, 5]}, constants, linear=True, opset=opset
    )


def _einsum(equation: str, **inputs) -> Case:
    name = "einsum_" + equation.replace(",", "_").replace("->", "_to_")
    return Case(name, [node("Einsum", list(inputs), equation=equation)], inputs, opset=12)


def _split(opset: int, **attributes) -> Case:
    inputs = ["x", "s"] if opset >= 13 and "num_outputs" not in attributes else ["x"]
    return Case(
        f"split{opset}",
        [
            helper.make_node("Split", inputs, ["p", "q", "r"], axis=1, **attributes),
            node("Concat", ["r", "p"], axis=1),
        ],
        {"x": [2, 7, 3]},
        {"s": np.array([2, 4, 1], np.int64)} if len(inputs) == 2 else {},
        linear=True,
        opset=opset,
    )


EXPORTER_OPS = [
    _pad("reflect", 10, [0, 0, 1, 2, 0, 0, 2, 1]),
    _pad("edge", 7, [0, 1, 3, 0, 0, 2, 0, 4]),
    _pad("reflect", 11, [1, 0, 3, 1, 0, 1, 0, 4]),
    _pad("edge", 18, [2, 1, 0, 3], axes=[3, -2]),
    _pad("wrap", 19, [0, 0, 2, 3, 0, 1, 1, 2]),
    Case(
        "tile",
        [node("Tile", ["x", "r"])],
        {"x": [2, 3, 1, 2]},
        {"r": np.array([1, 2, 3, 2], np.int64)},
        linear=True,
    ),
    Case(
        "expand_vector_to_rank3",
        [node("Expand", ["x", "s"])],
        {"x": [4]},
        {"s": np.array([2, 3, 4], np.int64)},
        linear=True,
    ),
    Case(
        "expand_shorter_shape",
        [node("Expand", ["x", "s"])],
        {"x": [2, 1, 4]},
        {"s": np.array([3, 1], np.int64)},
        linear=True,
    ),
    Case(
        "depth_to_space_dcr",
        [node("DepthToSpace", ["x"], blocksize=2)],
        {"x": [2, 8, 3, 2]},
        linear=True,
    ),
    Case(
        "depth_to_space_crd",
        [node("DepthToSpace", ["x"], blocksize=2, mode="CRD")],
        {"x": [2, 8, 3, 2]},
        linear=True,
    ),
    Case(
        "space_to_depth",
        [node("SpaceToDepth", ["x"], blocksize=2)],
        {"x": [2, 3, 4, 6]},
        linear=True,
    ),
    Case(
        "where_broadcast",
        [node("Where", ["c", "a", "b"])],
        {"a": [2, 3, 4], "b": [3, 1]},
        {"c": np.array([[True, False, True, False]])},
    ),
    Case("max3_broadcast", [node("Max", ["a", "b", "c"])], {"a": [2, 3, 4], "b": [3, 1], "c": [4]}),
    Case("min2_broadcast", [node("Min", ["a", "b"])], {"a": [2, 3, 4], "b": [1, 4]}),
    Case(
        "max_relu6_pattern",
        [node("Max", ["x", "lo"], "m"), node("Min", ["m", "hi"])],
        {"x": [3, 5]},
        {"lo": np.array(-0.3), "hi": np.array(0.6)},
    ),
    Case(
        "mean3_broadcast",
        [node("Mean", ["a", "b", "c"])],
        {"a": [2, 3, 4], "b": [3, 1], "c": [4]},
        elem=F32,
        linear=True,
    ),
    Case("abs", [node("Abs", ["x"])], {"x": [3, 4]}),
    Case("log", [node("Log", ["x"])], {"x": [3, 4]}, positive=True),
    Case(
        "pow_tensor_exponent",
        [node("Pow", ["a", "b"])],
        {"a": [2, 3, 4], "b": [4]},
        positive=True,
        opset=15,
    ),
    Case(
        "pow_int_exponent",
        [node("Pow", ["x", "k"])],
        {"x": [3, 4]},
        {"k": np.array(3, np.int64)},
        opset=15,
    ),
    Case("pow_square", [node("Pow", ["x", "k"])], {"x": [3, 4]}, {"k": np.array(2.0)}),
    Case("softplus", [node("Softplus", ["x"])], {"x": [3, 4]}, elem=F32),
    Case("softsign", [node("Softsign", ["x"])], {"x": [3, 4]}, elem=F32),
    Case(
        "mish",
        [node("Mul", ["x", "k"], "x8"), node("Mish", ["x8"])],
        {"x": [3, 4]},
        {"k": np.array(8.0)},  # reaches where softplus would overflow a naive eˣ
        opset=18,
    ),
    Case("gelu_exact", [node("Gelu", ["x"])], {"x": [3, 4]}, elem=F32, opset=20),
    Case("gelu_tanh", [node("Gelu", ["x"], approximate="tanh")], {"x": [3, 4]}, opset=20),
    Case("selu", [node("Selu", ["x"], alpha=1.5, gamma=1.1)], {"x": [3, 4]}, elem=F32),
    Case("celu", [node("Celu", ["x"], alpha=0.7)], {"x": [3, 4]}, elem=F32),
    Case("thresholded_relu", [node("ThresholdedRelu", ["x"], alpha=0.3)], {"x": [3, 4]}, elem=F32),
    Case(
        "sign_floor_ceil_round_are_flat",
        [
            node("Floor", ["x"], "f"),
            node("Ceil", ["x"], "c"),
            node("Round", ["x"], "r"),
            node("Sign", ["x"], "s"),
            node("Sum", ["f", "c", "r", "s"], "t"),
            node("Mul", ["t", "x"]),
        ],
        {"x": [3, 4]},
    ),
    *_reduction_cases(),
    Case(
        "reducemax18_all_axes",
        [node("ReduceMax", ["x"], keepdims=0)],
        {"x": [2, 3, 4]},
        opset=18,
    ),
    Case(
        "reducel2_noop_with_empty_axes",
        [node("ReduceL2", ["x", "ax"], "r", noop_with_empty_axes=1), node("Mul", ["r", "x"])],
        {"x": [2, 3]},
        {"ax": np.zeros(0, np.int64)},
        opset=18,
    ),
    Case(
        "layernorm",
        [node("LayerNormalization", ["x", "s", "b"], axis=-2, epsilon=1e-3)],
        {"x": [2, 3, 4, 5]},
        {"s": np.linspace(-1, 2, 20).reshape(4, 5), "b": np.full((4, 5), 0.3)},
    ),
    Case(
        "groupnorm18_per_group",
        [node("GroupNormalization", ["x", "s", "b"], num_groups=2, epsilon=1e-3)],
        {"x": [2, 4, 3, 3]},
        {"s": np.array([0.5, -2.0]), "b": np.array([0.1, 0.2])},
        opset=18,
    ),
    Case(
        "groupnorm21_per_channel",
        [node("GroupNormalization", ["x", "s", "b"], num_groups=2)],
        {"x": [2, 6, 3, 2]},
        {"s": np.linspace(-1, 2, 6, dtype=np.float32), "b": np.linspace(0, 1, 6, dtype=np.float32)},
        elem=F32,  # its statistics are kept in float32 (stash_type) even for float64 inputs
        opset=21,
    ),
    _einsum("bhid,bhjd->bhij", a=[2, 3, 4, 5], b=[2, 3, 6, 5]),
    _einsum("bhij,bhjd->bhid", a=[2, 3, 4, 6], b=[2, 3, 6, 5]),
    _einsum("bchw,bkc->bkhw", a=[2, 3, 4, 5], b=[2, 6, 3]),
    _einsum("nc,nchw->nchw", a=[2, 3], b=[2, 3, 4, 5]),
    _einsum("bij,jk->bk", a=[2, 3, 4], b=[4, 5]),  # i is summed inside a alone
    _einsum("ij,jk", a=[3, 4], b=[4, 5]),  # implicit output "ik"
    Case(
        "cumsum",
        [node("CumSum", ["x", "ax"])],
        {"x": [2, 5, 3]},
        {"ax": np.array(1, np.int64)},
        linear=True,
    ),
    Case(
        "cumsum_exclusive_reverse",
        [node("CumSum", ["x", "ax"], exclusive=1, reverse=1)],
        {"x": [2, 5, 3]},
        {"ax": np.array(-1, np.int64)},
        linear=True,
    ),
    Case(
        "cumsum_exclusive",
        [node("CumSum", ["x", "ax"], exclusive=1)],
        {"x": [4, 3]},
        {"ax": np.array(0, np.int32)},
        linear=True,
    ),
    _split(11, split=[2, 4, 1]),
    _split(13),
    _split(18, num_outputs=3),  # sizes 3, 3, 1
    Case("matmul_vector_left", [node("MatMul", ["a", "b"])], {"a": [4], "b": [2, 4, 3]}),
    Case("matmul_vector_right", [node("MatMul", ["a", "b"])], {"a": [2, 3, 4], "b": [4]}),
    Case("matmul_dot", [node("MatMul", ["a", "b"])], {"a": [4], "b": [4]}),
    Case(
        "gather_elements_repeated",
        [node("GatherElements", ["x", "i"], axis=1)],
        {"x": [2, 3, 4]},
        {"i": np.array([[[0, 2, 2, 1]], [[1, 1, -1, 0]]], np.int64)},
        linear=True,
        opset=16,
    ),
    Case(
        "gather_nd_repeated",
        [node("GatherND", ["x", "i"])],
        {"x": [3, 4, 2]},
        {"i": np.array([[0, 1], [2, 3], [0, 1]], np.int64)},
        linear=True,
        opset=16,
    ),
    Case(
        "gather_scalar_index",
        [node("Gather", ["x", "i"], axis=2)],
        {"x": [2, 3, 4]},
        {"i": np.array(-2, np.int64)},
        linear=True,
    ),
    Case(
        "topk_values",
        [helper.make_node("TopK", ["x", "k"], ["y", "idx"], axis=1)],
        {"x": [3, 6]},
        {"k": np.array([2], np.int64)},
    ),
]


def _grid(shape: tuple, seed: int, dtype=np.float64, reach: float = 1.3) -> np.ndarray:
    """Sampling points reaching past the border (−reach … reach)."""
    return np.random.default_rng(seed).uniform(-reach, reach, shape).astype(dtype)


EXPORTER_OPS += [
    Case(
        "gridsample16_bilinear_zeros",
        [node("GridSample", ["x", "g"])],
        {"x": [2, 3, 4, 5]},
        {"g": _grid((2, 3, 6, 2), 1, np.float32)},
        elem=F32,
        linear=True,
        opset=16,
    ),
    Case(
        "gridsample20_nearest_border_align",
        [
            node(
                "GridSample",
                ["x", "g"],
                mode="nearest",
                padding_mode="border",
                align_corners=1,
            )
        ],
        {"x": [2, 3, 4, 5]},
        {"g": _grid((2, 5, 3, 2), 2, reach=1.8)},
        linear=True,
        opset=20,
    ),
    Case(
        "gridsample20_linear_3d",
        [node("GridSample", ["x", "g"], mode="linear", padding_mode="border")],
        {"x": [1, 2, 3, 4, 5]},
        {"g": _grid((1, 2, 3, 4, 3), 3)},
        linear=True,
        opset=20,
    ),
]

# Integer and boolean tensors on the path carry no gradient: no rule is asked of Shape, Range,
# ArgMax, Equal, Gather on a shape, ConstantOfShape; what they compute acts as a constant.
SHAPE_AND_INDEX_CHAINS = [
    Case(
        "shape_range_argmax_chain",
        [
            node("Shape", ["x"], "shape"),
            node("Gather", ["shape", "zero"], "batch", axis=0),
            node("Unsqueeze", ["batch", "axis0"], "batch1"),
            node("Concat", ["batch1", "minus_one"], "flat_shape", axis=0),
            node("Reshape", ["x", "flat_shape"], "flat"),
            node("Size", ["x"], "size"),
            node("Div", ["size", "batch"], "width"),
            node("Range", ["zero", "width", "one"], "positions"),
            node("ArgMax", ["flat"], "best", axis=1, keepdims=1),
            node("Equal", ["positions", "best"], "is_best"),
            node("Cast", ["positions"], "weights", to=F64),
            node("Mul", ["flat", "weights"], "weighted"),
            node("Where", ["is_best", "flat", "weighted"], "picked"),
            node("Shape", ["flat"], "flat_dims"),
            node(
                "ConstantOfShape", ["flat_dims"], "ones", value=numpy_helper.from_array(np.ones(1))
            ),
            node("Add", ["picked", "ones"], "shifted"),
            node("Not", ["is_best"], "others"),
            node("Cast", ["others"], "other_mask", to=F64),
            node("Mul", ["shifted", "other_mask"]),
        ],
        {"x": [2, 3, 4]},
        {
            "zero": np.array(0, np.int64),
            "one": np.array(1, np.int64),
            "axis0": np.array([0], np.int64),
            "minus_one": np.array([-1], np.int64),
        },
    ),
]


@pytest.mark.parametrize(
    "case",
    ELEMENTWISE
    + BINARY
    + NORMALISATION
    + LINEAR
    + EXPORT_PATTERNS
    + EXPORTER_OPS
    + SHAPE_AND_INDEX_CHAINS,
    ids=lambda c: c.name,
)
def test_rule_matches_central_differences(case: Case) -> None:
    if case.name == "dequantize_quantize":
        pytest.skip("rounding makes QDQ piecewise constant: checked as straight-through below")
    check(case)


def test_quantize_dequantize_is_straight_through() -> None:
    case = next(c for c in LINEAR if c.name == "dequantize_quantize")
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    model.graph.input.append(helper.make_tensor_value_info("seed", F32, [2, 3]))
    backward, grads = add_vjp(model, infos, {"y": "seed"}, ["x"])
    seed = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    x = np.abs(seed)
    (gradient,) = _session(backward).run([grads["x"]], {"x": x, "seed": seed})
    np.testing.assert_allclose(gradient, seed, rtol=1e-6)


def test_an_operator_without_a_rule_is_named() -> None:
    case = Case("topk", [helper.make_node("Sin", ["x"], ["y"])], {"x": [3]}, elem=F32)
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    with pytest.raises(GradientRuleError, match="no gradient rule for Sin"):
        add_vjp(model, infos, {"y": "x"}, ["x"])


def test_an_integer_operator_on_the_path_is_refused_not_read_as_a_zero_gradient() -> None:
    """QLinearConv works on uint8: no rule, so the build must stop and name it, rather than
    end the path at its integer output and hand back zeros."""
    weight = np.random.default_rng(0).integers(0, 255, (2, 1, 3, 3)).astype(np.uint8)
    scale, zero = np.array(0.02, np.float32), np.array(128, np.uint8)
    constants = {"w": weight, "s": scale, "z": zero, "ws": scale, "wz": zero, "ys": scale,
                 "yz": zero}  # fmt: skip
    case = Case(
        "qlinearconv",
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node(
                "QLinearConv", ["q", "s", "z", "w", "ws", "wz", "ys", "yz"], ["qc"], pads=[1] * 4
            ),
            helper.make_node("DequantizeLinear", ["qc", "ys", "yz"], ["y"]),
        ],
        {"x": [1, 1, 4, 4]},
        constants,
        elem=F32,
    )
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    with pytest.raises(GradientRuleError, match="no gradient rule for QLinearConv"):
        add_vjp(model, infos, {"y": "x"}, ["x"])


def test_gradients_add_up_over_several_paths_and_reach_inner_tensors() -> None:
    """y = relu(a)·a + a: two paths from a, and ∂/∂(relu(a)) is asked for too."""
    case = Case(
        "paths",
        [node("Relu", ["a"], "r"), node("Mul", ["r", "a"], "m"), node("Add", ["m", "a"])],
        {"a": [3, 4]},
    )
    check(case)
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    model.graph.input.append(helper.make_tensor_value_info("seed", F64, [3, 4]))
    backward, grads = add_vjp(model, infos, {"y": "seed"}, ["a", "r"])
    a = np.random.default_rng(1).standard_normal((3, 4))
    seed = np.ones((3, 4))
    grad_a, grad_r = _session(backward).run([grads["a"], grads["r"]], {"a": a, "seed": seed})
    np.testing.assert_allclose(grad_r, a)  # ∂y/∂r = a
    np.testing.assert_allclose(grad_a, np.maximum(a, 0) + a * (a > 0) + 1)


def test_quantize_linear_passes_no_gradient_where_it_saturates() -> None:
    """Fake-quant backward: inside the uint8 range straight-through, 0 where clipped."""
    case = next(c for c in LINEAR if c.name == "dequantize_quantize")
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    model.graph.input.append(helper.make_tensor_value_info("seed", F32, [2, 3]))
    backward, grads = add_vjp(model, infos, {"y": "seed"}, ["x"])
    x = np.array([[-1.0, 0.2, 0.5], [20.0, 3.0, -0.01]], np.float32)  # 0.05·255 = 12.75
    seed = np.ones((2, 3), np.float32)
    (gradient,) = _session(backward).run([grads["x"]], {"x": x, "seed": seed})
    np.testing.assert_allclose(gradient, [[0, 1, 1], [0, 1, 0]])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            Case(
                "avgpool_dilated",
                [node("AveragePool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])],
                {"x": [1, 1, 6, 6]},
                elem=F32,
                opset=19,
            ),
            "dilated",
        ),
        (
            Case(
                "slice_computed_axes",
                [node("Identity", ["ax0"], "ax"), node("Slice", ["x", "st", "en", "ax"])],
                {"x": [4, 6]},
                {
                    "st": np.array([1], np.int64),
                    "en": np.array([3], np.int64),
                    "ax0": np.array([1], np.int64),
                },
                elem=F32,
            ),
            "run time",
        ),
        (
            Case(
                "einsum_ellipsis",
                [node("Einsum", ["x", "w"], equation="...ij,jk->...ik")],
                {"x": [2, 3, 4]},
                {"w": np.ones((4, 5), np.float32)},
                elem=F32,
                opset=12,
            ),
            "ellipsis",
        ),
        (
            Case(
                "einsum_diagonal",
                [node("Einsum", ["x"], equation="ii->i")],
                {"x": [3, 3]},
                elem=F32,
                opset=12,
            ),
            "repeated",
        ),
        (
            Case(
                "pad_reflect_negative",
                [node("Pad", ["x", "p"], mode="reflect")],
                {"x": [4, 6]},
                {"p": np.array([1, -1, 1, 0], np.int64)},
                elem=F32,
            ),
            "negative pads",
        ),
        (
            Case(
                "gather_elements_opset13",
                [node("GatherElements", ["x", "i"], axis=0)],
                {"x": [3, 2]},
                {"i": np.array([[0, 0]], np.int64)},
                elem=F32,
                opset=13,
            ),
            "scatter-add",
        ),
        (
            Case(
                "conv_dynamic_filter",
                [node("Conv", ["x", "w"])],
                {"x": [1, 2, 5, 5], "w": [3, 2, 3, 3]},
                elem=F32,
            ),
            "weights or bias computed",
        ),
        (
            Case(
                "batchnorm_training",
                [node("BatchNormalization", ["x", "g", "b", "m", "v"], training_mode=1)],
                {"x": [2, 3, 4]},
                {n: np.ones(3, np.float32) for n in ("g", "b", "m", "v")},
                elem=F32,
                opset=15,
            ),
            "training_mode",
        ),
        (
            Case(
                "resize_runtime_scales",
                [
                    node("Identity", ["s0"], "s"),
                    node("Resize", ["x", "", "s"], mode="linear"),
                ],
                {"x": [1, 1, 5, 5]},
                {"s0": np.array([1, 1, 1.5, 1.5], np.float32)},
                elem=F32,
            ),
            "non-integer size ratio",
        ),
    ],
    ids=lambda value: value.name if isinstance(value, Case) else "",
)
def test_settings_a_rule_cannot_honour_are_refused(case: Case, message: str) -> None:
    model = _model(case)
    outputs = [name for n in case.nodes for name in n.output]  # sizes as the engine knows them
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False, required=outputs)
    with pytest.raises(GradientRuleError, match=message):
        add_vjp(model, infos, {"y": "x"}, list(case.inputs))


def test_a_body_reading_a_tensor_on_the_path_is_refused_not_skipped() -> None:
    branch = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", F32, None)],
    )
    case = Case(
        "if_body",
        [
            node("Relu", ["x"], "a"),
            helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
        ],
        {"x": [3]},
        {"flag": np.array(True)},
        elem=F32,
    )
    model = _model(case)
    infos = infer_tensor_infos(model, case.inputs, dynamic_batch=False)
    with pytest.raises(GradientRuleError, match="inside its body"):
        add_vjp(model, infos, {"y": "x"}, ["x"])

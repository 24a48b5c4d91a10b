"""Small ONNX graphs built in code for the shapes real exports have and the fixtures lack.

Each builder makes the same tiny network (encoder conv, strided bottleneck conv, upsample,
decoder conv, head conv) from seeded weights, with one twist: several outputs, a Resize after the
head, a squeezed output, a batch of 1 hard-coded inside, or no channel axis on the input. The
tests compare each twisted model with its plain twin, so no torch is needed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 8


def _conv(name: str, source: str, out: str, c_in: int, c_out: int, rng, **attrs):
    kernel = attrs.pop("kernel", 3)
    weight = rng.normal(0, 0.6, (c_out, c_in, kernel, kernel)).astype(np.float32)
    bias = rng.normal(0, 0.1, c_out).astype(np.float32)
    inits = [
        numpy_helper.from_array(weight, f"{name}.w"),
        numpy_helper.from_array(bias, f"{name}.b"),
    ]
    pads = [kernel // 2] * 4
    node = helper.make_node(
        "Conv", [source, f"{name}.w", f"{name}.b"], [out], name=name, pads=pads, **attrs
    )
    return node, inits


def build(
    two_outputs: bool = False,
    resize_head: bool = False,
    squeeze_output: bool = False,
    hard_batch: bool = False,
    no_channel_input: bool = False,
    classes: int = 2,
    seed: int = 0,
    batch: int | str = "n",
    token_softmax: str | None = None,
    softmax_before_resize: bool = False,
    second_head_channels: int = 0,
) -> onnx.ModelProto:
    """The tiny network with the chosen twist; the same ``seed`` gives the same weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    source = "image"
    if no_channel_input:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes.append(helper.make_node("Unsqueeze", ["image", "axis1"], ["image4"]))
        source = "image4"
    for spec in [
        ("enc", source, "e", 1, 4, {}),
        ("bottleneck", "e_relu", "b", 4, 8, {"strides": [2, 2]}),
    ]:
        node, weights = _conv(spec[0], spec[1], spec[2], spec[3], spec[4], rng, **spec[5])
        nodes.append(node)
        inits += weights
        nodes.append(helper.make_node("Relu", [spec[2]], [f"{spec[2]}_relu"]))
    aux_node, aux_weights = _conv("aux", "b_relu", "aux", 8, classes, rng, kernel=1)
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    inits.append(scales)
    if resize_head:
        decoder_in, decoder_channels = "b_relu", 8
    else:
        nodes.append(helper.make_node("Resize", ["b_relu", "", "scales"], ["up"], mode="nearest"))
        decoder_in, decoder_channels = "up", 8
    node, weights = _conv("decoder", decoder_in, "d", decoder_channels, 6, rng)
    nodes.append(node)
    inits += weights
    nodes.append(helper.make_node("Relu", ["d"], ["d_relu"]))
    head_in = "d_relu"
    if token_softmax is not None:
        # Attention-like: softmax over positions. "hard-coded" writes the batch as a literal 1,
        # which still runs at batch K but mixes the cases; "per-case" copies the batch dim.
        lead = 1 if token_softmax == "hard-coded" else 0
        inits.append(numpy_helper.from_array(np.array([lead, 6, -1], np.int64), "tokens"))
        inits.append(numpy_helper.from_array(np.array([-1, 6, SIZE, SIZE], np.int64), "grid"))
        nodes += [
            helper.make_node("Reshape", ["d_relu", "tokens"], ["d_tokens"]),
            helper.make_node("Softmax", ["d_tokens"], ["d_attn"], axis=2),
            helper.make_node("Reshape", ["d_attn", "grid"], ["d_mixed"]),
        ]
        head_in = "d_mixed"
    if hard_batch:
        shape = (1, 6, SIZE // 2, SIZE // 2) if resize_head else (1, 6, SIZE, SIZE)
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), "fixed_shape"))
        nodes.append(helper.make_node("Reshape", ["d_relu", "fixed_shape"], ["d_fixed"]))
        head_in = "d_fixed"
    head_channels = 1 if squeeze_output else classes
    node, weights = _conv("head", head_in, "logits", 6, head_channels, rng, kernel=1)
    nodes.append(node)
    inits += weights
    output, out_shape = "logits", ["n", head_channels, SIZE, SIZE]
    if softmax_before_resize:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        output = "probabilities"
    if resize_head:
        nodes.append(
            helper.make_node("Resize", [output, "", "scales"], ["logits_up"], mode="linear")
        )
        output = "logits_up"
    if squeeze_output:
        nodes.append(helper.make_node("Squeeze", [output, "axis1_out"], ["mask_logits"]))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1_out"))
        output, out_shape = "mask_logits", ["n", SIZE, SIZE]
    if output != "main":
        nodes.append(helper.make_node("Identity", [output], ["main"]))
    outputs = [helper.make_tensor_value_info("main", TensorProto.FLOAT, out_shape)]
    if second_head_channels:
        # A second head on the decoder (e.g. edges), larger than the main one.
        node, weights = _conv("edges", head_in, "edges", 6, second_head_channels, rng, kernel=1)
        nodes.append(node)
        inits += weights
        outputs.append(
            helper.make_tensor_value_info(
                "edges", TensorProto.FLOAT, ["n", second_head_channels, SIZE, SIZE]
            )
        )
    if two_outputs:
        nodes.append(aux_node)
        inits += aux_weights
        outputs.insert(
            0, helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["n", classes, 4, 4])
        )
    in_shape = [batch, SIZE, SIZE] if no_channel_input else [batch, 1, SIZE, SIZE]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, in_shape)],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model

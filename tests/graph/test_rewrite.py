"""Every rewrite computes exactly what the original model does, checked against references
built independently in the test (weight-edited copies, plain ORT runs with optimisations off)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from segattr_onnx.errors import GraphRewriteError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.graph.index import GraphIndex
from segattr_onnx.graph.rewrite import cut_suffix, expose, glorot_uniform, insert_ablation
from segattr_onnx.runtime.ablation import AblationRunner
from tests.conftest import Fixture, assert_close, fixture, run_reference


def _analyse(fx: Fixture):
    return analyse_model(fx.path, fx.test_shape)


def _base_dir(fx: Fixture):
    return fx.path.parent if fx.spec.get("external_data") else None


# ------------------------------------------------------------------ expose
def test_exposed_outputs_equal_the_original(any_fixture: Fixture) -> None:
    """Original outputs unchanged, and each exposed conv output equals that conv recomputed
    on its own (a one-node model fed with the exposed input and the stored weights)."""
    analysis = _analyse(any_fixture)
    index = GraphIndex(analysis.model.proto.graph)
    base = _base_dir(any_fixture)
    x = any_fixture.input(seed=1)
    feeds = {analysis.input.name: x}
    original = run_reference(analysis.model.proto, feeds, base)

    wanted = []
    for layer in analysis.layers:
        node = index.nodes[layer.node_index]
        wanted += [n for n in node.input if n and n not in index.initializers]
        wanted += [layer.output, layer.block_output]
    exposed_model = expose(analysis.model.proto, wanted, analysis.tensors)
    names = [o.name for o in exposed_model.graph.output]
    values = dict(zip(names, run_reference(exposed_model, feeds, base), strict=True))
    rtol = 1e-3 if any_fixture.is_fp16 else 1e-6
    for position, output in enumerate(analysis.outputs):
        assert_close(values[output.name], original[position], rtol, "graph output")

    weights = {t.name: t for t in any_fixture.load_with_weights().graph.initializer}
    for layer in analysis.layers:
        node = index.nodes[layer.node_index]
        single = onnx.NodeProto()
        single.CopyFrom(node)
        inputs, feeds_single, initializers = [], {}, []
        for name in node.input:
            if not name:
                continue
            if name in weights:
                initializers.append(weights[name])
            else:
                feeds_single[name] = values[name]
            inputs.append(
                helper.make_tensor_value_info(name, 0, None)
                if name in weights
                else helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(values[name].dtype), None
                )
            )
        graph = helper.make_graph(
            [single],
            "one_conv",
            [i for i in inputs if i.name not in weights],
            [
                helper.make_tensor_value_info(
                    node.output[0],
                    helper.np_dtype_to_tensor_dtype(values[layer.output].dtype),
                    None,
                )
            ],
            initializers,
        )
        one = helper.make_model(graph, opset_imports=analysis.model.proto.opset_import)
        one.ir_version = analysis.model.proto.ir_version
        (recomputed,) = run_reference(one, feeds_single)
        assert_close(values[layer.output], recomputed, rtol, layer.name)


# ------------------------------------------------------------------ ablation: identity
@pytest.mark.parametrize("form", ["block", "raw"])
def test_all_ones_mask_reproduces_the_original_exactly(any_fixture: Fixture, form: str) -> None:
    analysis = _analyse(any_fixture)
    base = _base_dir(any_fixture)
    x = any_fixture.input(seed=2)
    (original, *_) = run_reference(analysis.model.proto, {analysis.input.name: x}, base)
    for layer in analysis.layers:
        if form == "raw" and layer.op not in ("Conv", "ConvTranspose"):
            continue
        model, site = insert_ablation(analysis, layer.name, form=form)
        ones = site.masks_to_feed(np.ones((1, site.channels)))
        (masked, *_) = run_reference(model, {analysis.input.name: x, site.mask_input: ones}, base)
        assert np.array_equal(masked, original), f"{layer.name} ({form})"


def test_mask_input_has_the_tensor_layout_and_dtype() -> None:
    nhwc = _analyse(fixture("unet2d_nhwc"))
    layer = nhwc.layer(nhwc.post_bottleneck[1])
    model, site = insert_ablation(nhwc, layer.name)
    mask = next(i for i in model.graph.input if i.name == site.mask_input)
    dims = [d.dim_param or d.dim_value for d in mask.type.tensor_type.shape.dim]
    assert dims == ["segattr_mask_batch", 1, 1, layer.kernels]
    fp16 = _analyse(fixture("unet2d_fp16"))
    model, site = insert_ablation(fp16, fp16.post_bottleneck[0])
    mask = next(i for i in model.graph.input if i.name == site.mask_input)
    assert mask.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    fixed = _analyse(fixture("unet2d_fixed_batch"))
    model, site = insert_ablation(fixed, fixed.post_bottleneck[0])
    mask = next(i for i in model.graph.input if i.name == site.mask_input)
    assert mask.type.tensor_type.shape.dim[0].dim_value == 1
    # No stale shape records survive downstream of the rewrite.
    index = GraphIndex(model.graph)
    downstream = {o for i in index.descendant_nodes([site.blended]) for o in index.nodes[i].output}
    assert not downstream & {vi.name for vi in model.graph.value_info}


def test_the_original_proto_is_never_modified() -> None:
    analysis = _analyse(fixture("unet2d_torchscript"))
    before = analysis.model.proto.SerializeToString()
    layer = analysis.post_bottleneck[0]
    for form in ("block", "raw"):
        model, site = insert_ablation(analysis, layer, form=form)
        cut_suffix(
            model, [site.mask_input], {**analysis.tensors, **site.new_infos}, site.mask_input
        )
    expose(analysis.model.proto, [analysis.layers[0].output], analysis.tensors)
    assert analysis.model.proto.SerializeToString() == before


# ------------------------------------------------------------------ ablation: reference
def _zero_kernel_reference(fx: Fixture, analysis, layer, k: int) -> onnx.ModelProto:
    """A copy of the model whose stored weights are edited so kernel k's block outputs 0."""
    model = fx.load_with_weights()
    index = GraphIndex(model.graph)
    initializers = {t.name: t for t in model.graph.initializer}

    def zero_channel(name: str, axis: int) -> None:
        source = index.constant_source(name)
        assert source is not None, name
        tensor = initializers[source.name]
        values = numpy_helper.to_array(tensor).copy()
        zero_point = 0
        if source.name != name and index.producer.get(name) is not None:
            dq = index.nodes[index.producer[name]]
            if dq.op_type == "DequantizeLinear" and len(dq.input) > 2:
                zero_point = numpy_helper.to_array(initializers[dq.input[2]]).reshape(-1)[0]
        np.moveaxis(values, axis, 0)[k] = zero_point
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    node = index.nodes[layer.node_index]
    zero_channel(node.input[1], 1 if node.op_type == "ConvTranspose" else 0)
    if len(node.input) > 2 and node.input[2]:
        zero_channel(node.input[2], 0)
    # Norms in the block add their shift back: zero their per-channel affine parameters too.
    tensor = layer.output
    for op in layer.block_ops:
        consumer = index.nodes[index.consumers[tensor][0]]
        if op in ("BatchNormalization", "InstanceNormalization"):
            for name in consumer.input[1:3]:
                zero_channel(name, 0)
        tensor = consumer.output[0]
    return model


def _kernels_to_check(layer) -> list[int]:
    return sorted({0, layer.kernels // 2, layer.kernels - 1})


def test_zero_ablation_equals_editing_the_weights(any_fixture: Fixture) -> None:
    analysis = _analyse(any_fixture)
    runner = AblationRunner(analysis, provider="cpu")
    base = _base_dir(any_fixture)
    x = any_fixture.input(seed=3)
    output = analysis.outputs[0].name
    rtol = 2e-2 if any_fixture.is_fp16 else 1e-5
    for layer in analysis.layers:
        if layer.group == "head":
            continue
        kernels = _kernels_to_check(layer)
        masks = np.ones((len(kernels), layer.kernels))
        masks[np.arange(len(kernels)), kernels] = 0
        ablated = np.concatenate(
            [c.outputs[output] for c in runner.ablate(x, layer.name, masks, form="block")]
        )
        for row, k in enumerate(kernels):
            reference_model = _zero_kernel_reference(any_fixture, analysis, layer, k)
            (reference, *_) = run_reference(
                reference_model, {analysis.input.name: x}, base, optimised=any_fixture.is_quantized
            )
            assert_close(ablated[row], reference[0], rtol, f"{layer.name} kernel {k}")


def test_raw_ablation_replaces_the_kernel_with_glorot_weights() -> None:
    """P1 form: m=0 for kernel k gives the model whose kernel k has the Glorot weights."""
    fx = fixture("unet2d_torchscript")
    analysis = _analyse(fx)
    runner = AblationRunner(analysis, provider="cpu", seed=7)
    x = fx.input(seed=4)
    layer = analysis.layer(analysis.post_bottleneck[1])
    k = 3
    masks = np.ones((1, layer.kernels))
    masks[0, k] = 0
    (chunk,) = list(runner.ablate(x, layer.name, masks, form="raw"))

    model = fx.load_with_weights()
    index = GraphIndex(model.graph)
    node = index.nodes[layer.node_index]
    weights = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(weights[node.input[1]]).copy()
    w[k] = glorot_uniform(w.shape, 7, layer.name).astype(np.float32)[k]
    weights[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    (reference, *_) = run_reference(model, {analysis.input.name: x})
    assert_close(chunk.outputs[analysis.outputs[0].name][0], reference[0], 1e-5)


def test_glorot_weights_follow_the_spec() -> None:
    shape = (8, 4, 3, 3)
    weights = glorot_uniform(shape, seed=0, name="layer")
    bound = np.sqrt(6 / (4 * 9 + 8 * 9))
    assert weights.shape == shape
    assert np.abs(weights).max() <= bound
    assert np.abs(weights).max() > 0.9 * bound
    assert abs(weights.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert np.array_equal(weights, glorot_uniform(shape, seed=0, name="layer"))
    assert not np.array_equal(weights, glorot_uniform(shape, seed=1, name="layer"))


# ------------------------------------------------------------------ suffix
@pytest.mark.parametrize("form", ["block", "raw"])
def test_suffix_run_equals_full_run(any_fixture: Fixture, form: str) -> None:
    analysis = _analyse(any_fixture)
    runner = AblationRunner(analysis, provider="cpu")
    x = any_fixture.input(seed=5)
    output = analysis.outputs[0].name
    rtol = 3e-3 if any_fixture.is_fp16 else 1e-5
    layers = [*analysis.bottleneck, *analysis.post_bottleneck]
    for name in layers:
        layer = analysis.layer(name)
        c = layer.kernels
        masks = np.concatenate([1 - np.eye(c), np.eye(c)])  # P^-k and P^k rows, as KWC uses
        suffix = np.concatenate([ch.outputs[output] for ch in runner.ablate(x, name, masks, form)])
        full = np.concatenate(
            [ch.outputs[output] for ch in runner.ablate(x, name, masks, form, use_suffix=False)]
        )
        assert_close(suffix, full, rtol, f"{name} ({form})")
        graph_nodes = len(analysis.model.proto.graph.node)
        assert runner.ablated(name, form).suffix.node_count < graph_nodes


def test_suffix_reads_skip_connections_from_the_prefix() -> None:
    analysis = _analyse(fixture("unet2d_torchscript"))
    runner = AblationRunner(analysis, provider="cpu")
    first_up = analysis.layer(analysis.post_bottleneck[0])  # up1 ConvTranspose
    suffix = runner.ablated(first_up.name).suffix
    encoder_blocks = {layer.block_output for layer in analysis.layers if layer.group == "encoder"}
    # The two skip connections (end of enc1 and enc2) are fed in, not recomputed...
    assert len(encoder_blocks & set(suffix.boundary_inputs)) == 2
    # ...and no encoder or bottleneck conv runs again.
    rerun = set(suffix.node_names)
    for layer in analysis.layers:
        if layer.group in ("encoder", "bottleneck"):
            assert layer.node_name not in rerun
    assert first_up.node_name not in rerun  # the ablated layer itself comes from the prefix
    # Planned passes: one prefix + ceil(2C / batch) suffix runs.
    c = first_up.kernels
    batch = runner.batch_size(runner.ablated(first_up.name), 2 * c)
    assert runner.planned_passes(first_up.name, 2 * c) == 1 + -(-2 * c // batch)


def _maxunpool_model() -> onnx.ModelProto:
    """conv → MaxPool(indices) → conv → MaxUnpool(indices) → conv: SegNet's decoder pattern."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in [("w1", (4, 1, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (2, 4, 3, 3))]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="enc"),
        helper.make_node("MaxPool", ["a"], ["p", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["b"], pads=[1, 1, 1, 1], name="mid"),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("MaxUnpool", ["br", "idx"], ["u"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["u", "w3"], ["y"], pads=[1, 1, 1, 1], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "segnet",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_batch_dependent_int_tensors_are_recomputed_in_the_suffix() -> None:
    """MaxPool indices encode the batch index, so reusing the prefix's would be wrong."""
    analysis = analyse_model(_maxunpool_model())
    runner = AblationRunner(analysis, provider="cpu")
    suffix = runner.ablated("mid").suffix
    assert "idx" not in suffix.boundary_inputs
    assert any(n.op_type == "MaxPool" for n in suffix.model.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    masks = np.concatenate([1 - np.eye(4), np.eye(4)])
    fast = np.concatenate([c.outputs["y"] for c in runner.ablate(x, "mid", masks)])
    slow = np.concatenate(
        [c.outputs["y"] for c in runner.ablate(x, "mid", masks, use_suffix=False)]
    )
    assert_close(fast, slow, 1e-6)


def test_suffix_refuses_a_non_float_graph_input() -> None:
    """An int graph input (here a target shape) may encode the batch: refuse, don't guess."""
    model = _maxunpool_model()
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("out_shape", onnx.TensorProto.INT64, [4]))
    graph.node[-1].output[0] = "y_raw"
    graph.node.append(helper.make_node("Reshape", ["y_raw", "out_shape"], ["y"]))
    analysis = analyse_model(model)
    model_masked, site = insert_ablation(analysis, "mid")
    with pytest.raises(GraphRewriteError, match="non-float graph input 'out_shape'"):
        cut_suffix(model_masked, [site.mask_input], {**analysis.tensors, **site.new_infos})


def test_keep_only_computes_the_same_tensors_and_carries_only_their_weights(
    any_fixture: Fixture,
) -> None:
    from segattr_onnx.graph.rewrite import keep_only

    analysis = _analyse(any_fixture)
    base = _base_dir(any_fixture)
    feeds = {analysis.input.name: any_fixture.input(seed=2)}
    early = [analysis.layers[1].block_output]  # an encoder tensor: most of the model is after it
    exposed = expose(analysis.model.proto, early, analysis.tensors)
    full = dict(
        zip(
            [o.name for o in exposed.graph.output], run_reference(exposed, feeds, base), strict=True
        )
    )
    pruned = keep_only(exposed, early)
    assert [o.name for o in pruned.graph.output] == early
    (value,) = run_reference(pruned, feeds, base)
    np.testing.assert_array_equal(value, full[early[0]])
    kept = {t.name for t in pruned.graph.initializer}
    read = {name for node in pruned.graph.node for name in node.input}
    assert kept <= read and len(kept) < len(exposed.graph.initializer)
    assert len(pruned.graph.node) < len(exposed.graph.node)
    # Weights stay as the model stores them: external ones still point at their file.
    stored = {t.name: t.data_location for t in exposed.graph.initializer}
    assert all(t.data_location == stored[t.name] for t in pruned.graph.initializer)

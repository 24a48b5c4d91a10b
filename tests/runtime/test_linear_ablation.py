"""Ablation rows through the tail after a layer's linear readers (the default;
``AblationRunner.use_linearity = False`` keeps the whole suffix) give the same explanation:
KWC's and Ablation-CAM's maps, D, I and weights against the whole-suffix path (which the
weight-editing references of tests/methods check in turn), and the row forms themselves."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from segattr_onnx import Explainer
from segattr_onnx.runtime.linear_ablation import (
    DROP,
    FULL,
    KEEP,
    NONE,
    group_balanced,
    row_forms,
    table_rows,
)
from segattr_onnx.runtime.table_memory import TableMemory
from tests.conftest import assert_close, fixture

FIXTURES = {  # fixture → relative tolerance (float16 rounds every contribution)
    "unet2d_torchscript": 1e-5,
    "unet3d": 1e-5,
    "unet2d_dynamo": 1e-5,
    "unet2d_fixed_batch": 1e-5,
    "unet2d_fp16": 2e-3,
}


def _explain(name: str, method: str, linear: bool):
    fx = fixture(name)
    x = fx.input(2)
    explainer = Explainer(fx.path, provider="cpu")
    explainer._for_shape(x.shape).engine.ablation.use_linearity = linear
    return explainer.explain(x, method)


@pytest.mark.parametrize("method", ["kwc", "ablationcam"])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_linear_rows_give_the_whole_suffix_explanation(name: str, method: str) -> None:
    linear = _explain(name, method, True)
    whole = _explain(name, method, False)
    tolerance = FIXTURES[name]
    assert "linear" in {run.graph for run in linear.runs}  # the path was taken
    assert "linear" not in {run.graph for run in whole.runs}
    assert_close(linear.map, whole.map, tolerance, f"{name} map")
    for a, b in zip(linear.layers, whole.layers, strict=True):
        assert_close(a.weights, b.weights, tolerance, f"{name} {a.layer} weights")
        for term in a.terms:
            assert_close(a.terms[term], b.terms[term], tolerance, f"{name} {a.layer} {term}")
    assert linear.forward_passes == whole.forward_passes


def test_sites_that_are_not_linear_fall_back_and_say_so() -> None:
    """NHWC blocks and QDQ models keep the whole suffix: their records say 'suffix'."""
    for name in ("unet2d_nhwc", "unet2d_qdq"):
        result = _explain(name, "kwc", True)
        graphs = {run.graph for run in result.runs if run.purpose == "ablation"}
        assert graphs == {"suffix"}, name


def test_row_forms_against_masks_written_out() -> None:
    masks = np.array(
        [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1], [1, 0, 0, 0]], dtype=np.float32
    )
    forms, kernels = row_forms(masks)
    assert forms.tolist() == [FULL, NONE, KEEP, DROP, KEEP]
    assert kernels[2:].tolist() == [2, 1, 0]
    assert row_forms(np.array([[1, 1, 0, 0]])) is None  # two kept of four: not a row form


def _conv_model(channels: int, outputs: int):
    """A Conv with bias reading z (1, channels, 5, 6), padded to keep the size."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((outputs, channels, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(outputs).astype(np.float32)
    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Conv", ["z", "w", "b"], ["y"], pads=[1, 1, 1, 1], name="conv")],
            "reader",
            [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, channels, 5, 6])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, outputs, 5, 6])],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )


@pytest.mark.parametrize(("group", "first"), [(4, 0), (3, 0), (3, 3)])
def test_table_rows_equal_the_reader_run_on_each_masked_input(group: int, first: int) -> None:
    """The rows a group's table gives for masks of every form equal the reader itself run on
    m ⊙ Z, bias included; a short last group (padded with zero channels) as well."""
    from types import SimpleNamespace

    import onnx
    import onnxruntime as ort

    from segattr_onnx.graph.linearity import LinearRead, contributions_model, grouped_weights
    from segattr_onnx.runtime.ablation import _row_table
    from segattr_onnx.runtime.chunks import ChunkedRunner
    from segattr_onnx.runtime.linear_ablation import take_rows

    channels, outputs = 4, 2
    model = _conv_model(channels, outputs)
    site = SimpleNamespace(elem_type=onnx.TensorProto.FLOAT, channels=channels)
    read = LinearRead("conv", "y", "w", 0)
    z = np.random.default_rng(1).standard_normal((1, channels, 5, 6)).astype(np.float32)
    reader = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def reader_on(mask: np.ndarray) -> np.ndarray:
        return reader.run(["y"], {"z": z * mask.reshape(1, -1, 1, 1).astype(np.float32)})[0]

    full, rest = reader_on(np.ones(channels)), reader_on(np.zeros(channels))
    runners = {  # the one-half model and the both-halves one
        both: ChunkedRunner(
            ort.InferenceSession(
                contributions_model(
                    model, site, read, group, outputs * 5 * 6, both
                ).SerializeToString(),
                providers=["CPUExecutionProvider"],
            )
        )
        for both in (False, True)
    }
    runner = runners.__getitem__
    weights = grouped_weights(model, site, read)
    members = range(first, min(first + group, channels))
    table = np.full((2 * group + 2, outputs * 5 * 6), np.nan, np.float32)  # every row written
    _row_table(runner, weights, z, slice(first, members[-1] + 1), group, full, rest, table)
    eye = np.eye(channels)
    masks = np.concatenate(
        [
            1 - eye[list(members)],
            eye[list(members)],
            np.ones((1, channels)),
            np.zeros((1, channels)),
        ]
    )
    forms, kernels = row_forms(masks)
    positions = table_rows(forms, kernels, first, group)
    rows = take_rows(table, positions).reshape(len(masks), outputs, 5, 6)
    for mask, row in zip(masks, rows, strict=True):
        np.testing.assert_allclose(row, reader_on(mask)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rows[-2], full[0])  # every kernel kept: Y(1) itself
    np.testing.assert_array_equal(rows[-1], rest[0])
    # One half asked for: the other is never written, and the one written holds the very
    # numbers the both-halves run wrote (Y(1) + (−K_c) is Y(1) − K_c exactly).
    for halves, formed, untouched in (((True, False), 0, 1), ((False, True), 1, 0)):
        half = np.full_like(table, np.nan)
        _row_table(runner, weights, z, slice(first, members[-1] + 1), group, full, rest, half,
                   halves)  # fmt: skip
        np.testing.assert_array_equal(half[formed * group : (formed + 1) * group],
                                      table[formed * group : (formed + 1) * group])  # fmt: skip
        assert np.isnan(half[untouched * group : (untouched + 1) * group]).all()


def test_rows_in_table_order_are_fed_without_a_copy() -> None:
    from segattr_onnx.runtime.linear_ablation import TableRows, take_rows

    table = np.arange(40, dtype=np.float32).reshape(8, 5)
    consecutive = take_rows(table, np.array([2, 3, 4]))
    assert np.shares_memory(consecutive, table) and consecutive.flags.c_contiguous
    np.testing.assert_array_equal(consecutive, table[2:5])
    scattered = take_rows(table, np.array([4, 2, 3]))
    assert not np.shares_memory(scattered, table)
    np.testing.assert_array_equal(scattered, table[[4, 2, 3]])
    # A segment's rows, as the chunk loop slices them: a chunk at a time, shaped per item.
    rows = TableRows(table, np.array([5, 6, 7, 1, 0]), (1, 5))
    assert len(rows) == 5
    in_order = rows[0:3]
    assert in_order.shape == (3, 1, 5) and np.shares_memory(in_order, table)
    np.testing.assert_array_equal(rows[3:5], table[[1, 0]].reshape(2, 1, 5))


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d", "unet2d_fp16"])
def test_contributions_made_a_few_channels_at_a_time_give_the_same_explanation(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When all C contributions do not fit, rows run in groups of channels (3 here, so the last
    group is short and padded); the explanation is that of the whole suffix."""
    from segattr_onnx.runtime import ablation

    whole = _explain(name, "kwc", False)
    monkeypatch.setattr(ablation, "channel_group", lambda *_: 3)
    formed: list[tuple] = []
    row_table = ablation._row_table

    def counted(*args):
        weights, channels, group, halves = args[1], args[3], args[4], args[8]
        formed.append((id(weights), channels.start, group, halves))
        return row_table(*args)

    monkeypatch.setattr(ablation, "_row_table", counted)
    fx = fixture(name)
    x = fx.input(2)
    explainer = Explainer(fx.path, provider="cpu")
    grouped = explainer.explain(x, "kwc")
    tolerance = FIXTURES[name]
    linear = [run for run in grouped.runs if run.graph == "linear"]
    assert linear and max(group for _, _, group, _ in formed) <= 3
    # KWC's rows run "drop k" for every k, then "keep only k": each group's table is formed
    # once per half, and only the half its rows read
    halves = [(weights, first, half) for weights, first, _, (drop, keep) in formed
              for half, wanted in (("drop", drop), ("keep", keep)) if wanted]  # fmt: skip
    assert len(halves) == len(set(halves)) == len(formed)
    assert len({first for _, first, _, _ in formed}) > 1  # several groups in some layer
    assert_close(grouped.map, whole.map, tolerance, f"{name} map")
    for a, b in zip(grouped.layers, whole.layers, strict=True):
        assert_close(a.weights, b.weights, tolerance, f"{name} {a.layer} weights")


def test_row_segments_follow_the_rows_and_their_channel_groups() -> None:
    from segattr_onnx.runtime.linear_ablation import row_segments

    channels = 5
    drop = np.ones((channels, channels)) - np.eye(channels)  # rows 0-4 drop k = 0..4
    keep = np.eye(channels)  # rows 5-9 keep only k
    masks = np.concatenate([np.ones((1, channels)), drop, keep])  # row 0 keeps every kernel
    segments = row_segments(*row_forms(masks), group=2)
    # groups {0,1}, {2,3}, {4}; the unablated row joins the first segment
    assert segments == ((0, 3, 0), (3, 5, 2), (5, 6, 4), (6, 8, 0), (8, 10, 2), (10, 11, 4))


@pytest.mark.parametrize(
    ("channels", "most", "group"), [(32, 12, 11), (32, 8, 8), (5, 9, 5), (7, 1, 1)]
)
def test_groups_are_as_few_and_as_even_as_the_cap_allows(channels, most, group) -> None:
    assert group_balanced(channels, most) == group


def test_row_tables_stay_within_their_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``table_bytes`` small, each table holds a few channels, the memory never grows
    past the cap, and the explanation is that of all channels at once."""
    from segattr_onnx.runtime.linear_ablation import LinearPlan, table_value_bytes

    fx = fixture("unet2d_torchscript")
    x = fx.input(2)
    whole = Explainer(fx.path, provider="cpu").explain(x, "kwc")
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    layer = explainer.analysis(x.shape).post_bottleneck[0]
    plan = LinearPlan.of(runner.ablated(layer).linear, runner.ablated(layer).infos)
    value_bytes = table_value_bytes(runner.ablated(layer).site.elem_type)
    per_channel = sum(values * value_bytes for values in plan.values)
    fixed = sum(values * 16 for values in plan.values)
    runner.table_bytes = fixed + 2 * per_channel  # two channels of this layer at a time
    capped = explainer.explain(x, "kwc")
    schedule = runner.linear_schedule(
        runner.ablated(layer), np.eye(runner.ablated(layer).site.channels)
    )
    assert schedule is not None and schedule.group <= 2
    assert all(b.nbytes <= runner.table_bytes for b in runner.tables.buffers())
    assert_close(capped.map, whole.map, 1e-5, "capped map")
    for a, b in zip(capped.layers, whole.layers, strict=True):
        assert_close(a.weights, b.weights, 1e-5, f"{a.layer} weights")
    runner.table_bytes = 1  # not even one channel fits the cap: one at a time, still linear
    schedule = runner.linear_schedule(
        runner.ablated(layer), np.eye(runner.ablated(layer).site.channels)
    )
    assert schedule is not None and schedule.group == 1


def test_rows_of_every_form_across_channel_groups_equal_the_whole_suffix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows keeping every kernel or none, between rows of different groups, through the runner
    itself: each row's prediction equals the whole suffix's."""
    from segattr_onnx.runtime import ablation

    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    layer = explainer.analysis(x.shape).post_bottleneck[0]
    channels = runner.ablated(layer).site.channels
    assert channels > 3
    ones, eye = np.ones((1, channels)), np.eye(channels)
    masks = np.concatenate([ones, eye[::-1], np.zeros((1, channels)), 1 - eye, ones])
    monkeypatch.setattr(ablation, "channel_group", lambda *_: 3)

    def predictions(linear: bool) -> np.ndarray:
        runner.use_linearity = linear
        chunks = list(runner.ablate(x, layer, masks))
        assert [c.start for c in chunks] == [0, *(c.stop for c in chunks[:-1])]  # in order
        name = next(iter(chunks[0].outputs))
        return np.concatenate([c.outputs[name] for c in chunks])

    schedule = runner.linear_schedule(runner.ablated(layer), masks)
    assert schedule is not None and len(schedule.segments) > 2
    assert_close(predictions(True), predictions(False), 1e-5, "rows")


def test_a_model_whose_nodes_have_no_names_explains_as_before(tmp_path) -> None:
    """Exporters may leave node names empty: the readers are found by their outputs."""
    import onnx

    fx = fixture("unet2d_torchscript")
    model = onnx.load(str(fx.path))
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    x = fx.input(2)
    results = {}
    for linear in (True, False):
        explainer = Explainer(path, provider="cpu")
        explainer._for_shape(x.shape).engine.ablation.use_linearity = linear
        results[linear] = explainer.explain(x, "kwc")
    assert "linear" in {run.graph for run in results[True].runs}
    assert_close(results[True].map, results[False].map, 1e-5, "unnamed map")


FAMILIES = ("deeplabv3_resnet_torchscript", "basicunet2d", "multihead_pose", "segformer_dynamo",
            "dynunet3d", "pspnet_resnet")  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_architectures_explain_the_same_with_linear_rows(name: str) -> None:
    """torchvision, MONAI, SegFormer and multi-head exports (tests/fixtures/families): where
    some decoder layer reads linearly, KWC equals the whole suffix's to float32 rounding."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "fixtures" / "families"
    spec = json.loads((root / "manifest.json").read_text())["fixtures"][name]
    x = np.random.default_rng(0).standard_normal(spec["test_shape"]).astype(np.float32)
    results = {}
    for linear in (True, False):
        explainer = Explainer(root / spec["file"], provider="cpu")
        explainer._for_shape(x.shape).engine.ablation.use_linearity = linear
        results[linear] = explainer.explain(x, "kwc")
    assert "linear" in {run.graph for run in results[True].runs}
    assert_close(results[True].map, results[False].map, 1e-5, f"{name} map")
    for a, b in zip(results[True].layers, results[False].layers, strict=True):
        assert_close(a.weights, b.weights, 1e-5, f"{name} {a.layer} weights")


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet3d"])
def test_the_part_no_row_reaches_runs_once_per_layer(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The skip half of a split convolution after the readers reads only shared tensors: it
    runs once per layer (one more layer run), not once per chunk, with the same result."""
    from segattr_onnx.runtime import linear_ablation

    fx = fixture(name)
    x = fx.input(2)

    def explain():
        explainer = Explainer(fx.path, provider="cpu")
        ablation = explainer._for_shape(x.shape).engine.ablation
        ablation.cache_bytes = 1  # a row per run: the hoisted part would otherwise run per row
        return explainer.explain(x, "kwc"), ablation

    hoisted, ablation = explain()
    linear_runs = [run for run in hoisted.runs if run.graph == "linear"]
    tails = {run.layer: ablation.ablated(run.layer).linear for run in linear_runs}
    split = [run for run in linear_runs if tails[run.layer].hoisted is not None]
    assert split, "the fixture has a layer whose tail reads a skip tensor"
    for run in linear_runs:
        reads = len(tails[run.layer].reads)
        extra = 1 if tails[run.layer].hoisted is not None else 0
        # one group of channels: one segment, its "drop" and "keep only" halves formed in one
        # run of the grouped convolution
        assert run.layer_runs == 2 + extra + reads
        assert run.passes > 1 and run.batch_size == 1
    monkeypatch.setattr(linear_ablation, "hoist_invariants", lambda *args: None)
    whole, _ = explain()
    assert whole.session_runs == hoisted.session_runs - len(split)
    assert_close(hoisted.map, whole.map, 1e-6, f"{name} map")
    for a, b in zip(hoisted.layers, whole.layers, strict=True):
        assert_close(a.weights, b.weights, 1e-6, f"{name} {a.layer} weights")


def test_an_announced_table_sizes_the_buffers_so_a_larger_one_writes_on_in_them() -> None:
    tables = TableMemory()
    f32 = np.dtype(np.float32)
    tables.expect(4000)
    tables.expect(1000)  # the largest announced counts
    with tables.take([(10, 10)], f32) as (_small,):  # 400 bytes, in a buffer of 4000
        assert [b.nbytes for b in tables.buffers()] == [4000]
        assert tables.kept_bytes == 400  # only what a table wrote holds memory
        assert tables.bytes_after(4000) == 400 + 4000  # the other buffer, made new
    buffer = tables.buffers()[0]
    assert tables.bytes_after(4000) == 4000  # the written 400 are reused
    with tables.take([(100, 10)], f32) as (large,):  # the announced one: same memory
        assert np.shares_memory(large, buffer) and len(tables.buffers()) == 1
        assert tables.kept_bytes == 4000
    tables.release(keep=4000)
    assert tables.buffers() == [buffer]
    # What was announced is forgotten at a release: the next buffer is the table's size.
    with tables.take([(100, 10)], f32), tables.take([(1, 10)], f32):
        assert sorted(b.nbytes for b in tables.buffers()) == [40, 4000]
    tables.release(keep=0)
    assert tables.buffers() == [] and tables.kept_bytes == 0
    # Of two buffers that fit, the one whose written pages already hold the table is taken.
    tables.expect(4000)
    with tables.take([(10, 10)], f32), tables.take([(100, 10)], f32) as (full,):
        written = full.base
    with tables.take([(50, 10)], f32) as (half,):
        assert np.shares_memory(half, written)
        assert tables.kept_bytes == 400 + 4000


def test_an_explanation_makes_each_table_buffer_once(monkeypatch) -> None:
    """Every layer's table is planned before the first is formed, so the buffers are made at
    the largest size at once, never made again for a larger table (which zeroes its pages
    again). Only a plan announces: a caller asking whether a layer is linear does not."""
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    layer = explainer.analysis(x.shape).post_bottleneck[0]
    ablated = runner.ablated(layer)
    assert runner.linear_schedule(ablated, np.eye(ablated.site.channels)) is not None
    assert runner.tables.announced_bytes == 0
    sizes, buffers = [], []
    original_take = TableMemory.take

    def take(self, shapes, dtype):
        sizes.append(sum(rows * values for rows, values in shapes) * np.dtype(dtype).itemsize)
        tables = original_take(self, shapes, dtype)
        buffers.extend(b for b in self.buffers() if not any(b is seen for seen in buffers))
        return tables

    monkeypatch.setattr(TableMemory, "take", take)
    explained = explainer.explain(x, "kwc")
    monkeypatch.undo()
    assert len(set(sizes)) > 1 and sizes.index(max(sizes)) > 1  # a larger table comes later
    assert len(buffers) <= 2 and all(b.nbytes == max(sizes) for b in buffers)
    assert runner.tables.announced_bytes == 0  # forgotten once the explanation is done
    plain = Explainer(fx.path, provider="cpu").explain(x, "kwc")
    assert_close(explained.map, plain.map, 0, "map")


def test_row_tables_share_two_buffers_from_layer_to_layer_and_call_to_call() -> None:
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    tables = runner.tables
    f32 = np.dtype(np.float32)
    with tables.take([(4, 10), (2, 5)], f32) as (first, second):
        assert first.shape == (4, 10) and second.shape == (2, 5)
        assert not np.shares_memory(first, second)
        assert tables.in_use_bytes == 200
        with tables.take([(4, 10)], f32) as (other,):  # the second buffer
            assert not np.shares_memory(other, first)
            with tables.take([(4, 10)], f32) as (inner,):  # both held: memory of its own
                assert not any(np.shares_memory(inner, b) for b in tables.buffers())
            assert len(tables.buffers()) == 2
    assert tables.in_use_bytes == 0
    kept = tables.buffers()
    with tables.take([(3, 10)], np.dtype(np.float16)) as (again,):  # fits: kept memory
        assert any(np.shares_memory(again, buffer) for buffer in kept)
    with tables.take([(100, 10)], f32):  # fits in neither: the first free one grows
        assert sorted(b.nbytes for b in tables.buffers()) == [160, 4000]
    # A table released by another thread than the one that took it frees its buffer.
    taken = tables.take([(4, 10)], f32)
    releasing = threading.Thread(target=taken.release)
    releasing.start()
    releasing.join()
    assert tables.in_use_bytes == 0
    with tables.take([(4, 10)], f32), tables.take([(4, 10)], f32) as (other,):
        assert any(np.shares_memory(other, b) for b in tables.buffers())
    runner.release_tables(keep=4159)  # the largest goes first
    assert [b.nbytes for b in tables.buffers()] == [160]
    explainer.explain(x, "kwc")
    assert tables.in_use_bytes == 0
    assert tables.kept_bytes > 0  # small: kept for the next call
    runner.release_tables(keep=0)
    assert tables.buffers() == []
    budgeted = Explainer(fx.path, provider="cpu", memory_budget=1 << 30)
    budgeted.explain(x, "kwc")
    assert budgeted._for_shape(x.shape).engine.ablation.tables.buffers() == []


def test_two_loops_interleaved_on_one_runner_keep_their_own_rows() -> None:
    """A caller that starts a second layer's loop while the first is paused mid-segment: the
    first's rows are not overwritten by the second's."""
    fx = fixture("unet2d_torchscript")
    x = fx.input(0)
    explainer = Explainer(fx.path, provider="cpu")
    runner = explainer._for_shape(x.shape).engine.ablation
    layers = explainer.analysis(x.shape).post_bottleneck[:2]
    channels = [runner.ablated(layer).site.channels for layer in layers]
    masks = [np.concatenate([1 - np.eye(c), np.eye(c)]) for c in channels]
    runner.batch_cap.limit = 1  # one row a chunk: the first loop pauses inside its segment
    pairs = list(zip(layers, masks, strict=True))
    assert all(runner.linear_schedule(runner.ablated(layer), m) for layer, m in pairs)

    def rows(chunks) -> np.ndarray:
        return np.concatenate([next(iter(c.outputs.values())) for c in chunks])

    alone = [rows(runner.ablate(x, layer, m)) for layer, m in pairs]
    first = runner.ablate(x, layers[0], masks[0])
    head = [next(first)]
    other = rows(runner.ablate(x, layers[1], masks[1]))
    np.testing.assert_array_equal(rows([*head, *first]), alone[0])
    np.testing.assert_array_equal(other, alone[1])


def _encoder_then(readers: list[onnx.NodeProto], inits: list, out: str) -> onnx.ModelProto:
    """image (1, 1, 6, 6) → 3×3 convolution "encoder" (4 channels) → ReLU → z, then
    ``readers`` of z, ending at ``out`` (1, 2, *, *) followed by a 1×1 head."""
    rng = np.random.default_rng(5)
    arrays = {
        "e": rng.normal(0, 1, (4, 1, 3, 3)),
        "h": rng.normal(0, 1, (2, 3, 1, 1)),
        **{name: rng.normal(0, 0.5, shape) for name, shape in inits},
    }
    nodes = [
        helper.make_node("Conv", ["image", "e"], ["pre"], pads=[1, 1, 1, 1], name="encoder"),
        helper.make_node("Relu", ["pre"], ["z"]),
        *readers,
        helper.make_node("Relu", [out], ["act"]),
        helper.make_node("Conv", ["act", "h"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "readers",
        [helper.make_tensor_value_info("image", 1, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("logits", 1, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("shape", ["two convolutions", "skip made from z"])
def test_layers_with_several_readers_explain_as_the_whole_suffix(tmp_path, shape) -> None:
    """Two convolutions reading z give two reads, not four; a ConvTranspose whose skip Concat
    holds another reading of z is not composed, and the layer stays linear."""
    from segattr_onnx.graph.linearity import linear_reads
    from segattr_onnx.graph.rewrite import insert_ablation

    if shape == "two convolutions":
        readers = [
            helper.make_node("Conv", ["z", "a"], ["ya"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["z", "b"], ["yb"]),
            helper.make_node("Add", ["ya", "yb"], ["y"]),
        ]
        inits = [("a", (3, 4, 3, 3)), ("b", (3, 4, 1, 1))]
        expected = {"ya", "yb"}
    else:
        readers = [
            helper.make_node("ConvTranspose", ["z", "u"], ["up"], strides=[2, 2]),
            helper.make_node("ConvTranspose", ["z", "v"], ["up2"], strides=[2, 2]),
            helper.make_node("Relu", ["up2"], ["skip"]),
            helper.make_node("Concat", ["up", "skip"], ["joined"], axis=1),
            helper.make_node("Conv", ["joined", "c"], ["y"], pads=[1, 1, 1, 1]),
        ]
        inits = [("u", (4, 2, 2, 2)), ("v", (4, 2, 2, 2)), ("c", (3, 4, 3, 3))]
        expected = {"up", "up2"}
    path = tmp_path / "readers.onnx"
    onnx.save(_encoder_then(readers, inits, "y"), path)
    x = np.random.default_rng(6).normal(size=(1, 1, 6, 6)).astype(np.float32)
    explainer = Explainer(path, provider="cpu")
    ablation = explainer._for_shape(x.shape).engine.ablation
    tail = ablation.ablated("encoder").linear
    assert tail is not None and {read.output for read in tail.reads} == expected
    assert all(read.after is None for read in tail.reads)
    model, site = insert_ablation(explainer.analysis(x.shape), "encoder")
    assert len(linear_reads(model, site)) == 2
    linear = explainer.explain(x, "kwc", ["encoder"])
    whole = Explainer(path, provider="cpu")
    whole._for_shape(x.shape).engine.ablation.use_linearity = False
    suffix = whole.explain(x, "kwc", ["encoder"])
    assert {run.graph for run in linear.runs if run.layer} == {"linear"}
    assert_close(linear.layers[0].weights, suffix.layers[0].weights, 1e-5, shape)
    assert_close(linear.map, suffix.map, 1e-5, shape)


def test_a_convtranspose_after_its_skip_in_the_concat_composes(tmp_path) -> None:
    """cat([skip, up]) (MONAI's UpCat order): the skip's channels, known from the analysis's
    shapes, put the ConvTranspose's at offset 3; composed, KWC equals the whole suffix's."""
    readers = [
        helper.make_node("Resize", ["image", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Conv", ["big", "s"], ["skip"]),
        helper.make_node("ConvTranspose", ["z", "u"], ["up"], strides=[2, 2]),
        helper.make_node("Concat", ["skip", "up"], ["joined"], axis=1),
        helper.make_node("Conv", ["joined", "c"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [("s", (3, 1, 1, 1)), ("u", (4, 2, 2, 2)), ("c", (3, 5, 3, 3))]
    model = _encoder_then(readers, inits, "y")
    model.graph.initializer.append(
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    )
    path = tmp_path / "skip_first.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(7).normal(size=(1, 1, 6, 6)).astype(np.float32)
    explainer = Explainer(path, provider="cpu")
    (read,) = explainer._for_shape(x.shape).engine.ablation.ablated("encoder").linear.reads
    assert read.output == "y" and read.after is not None and read.after.offset == 3
    linear = explainer.explain(x, "kwc", ["encoder"])
    whole = Explainer(path, provider="cpu")
    whole._for_shape(x.shape).engine.ablation.use_linearity = False
    suffix = whole.explain(x, "kwc", ["encoder"])
    assert {run.graph for run in linear.runs if run.layer} == {"linear"}
    assert_close(linear.layers[0].weights, suffix.layers[0].weights, 1e-5, "skip first")
    assert_close(linear.map, suffix.map, 1e-5, "skip first")

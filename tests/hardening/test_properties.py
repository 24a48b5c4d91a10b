"""Property tests: whatever a model file, an audit config or a model card holds, segattr-onnx
either takes it or refuses it with one ``SegattrError`` of one line: never another exception,
never a crash, always in bounded time.

Graphs are tiny chains of Conv, ConvTranspose, Relu, Add, Concat and Resize whose attributes
(strides, pads, dilations, groups, kernel shapes, scales, axes) are drawn from sane, zero,
negative and huge values. Configs and cards are TOML documents built from a valid one by
replacing, dropping and adding keys with values of every TOML type. Examples are derandomised
(the same ones on every run) and few, so the file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from segattr_onnx.audit import CASE_KEYS, CONFIG_KEYS, TARGET_KEYS, AuditConfig
from segattr_onnx.card import CARD_SECTIONS, ModelCard
from segattr_onnx.cli import main
from segattr_onnx.errors import SegattrError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.graph.loading import from_proto
from tests.builders import build

# Every property runs the same examples each time (CI must not flake) and none is stored.
DETERMINISTIC = dict(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _one_line_error(exc: SegattrError) -> None:
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"


# ------------------------------------------------------------------ random graphs
# Attribute values of a sane graph (what exporters write), and of a hostile one (zero,
# negative and huge values besides): half the graphs are each, so that both the refusals and
# the analysis of what passes them are exercised.
_SANE = {
    "strides": [1, 1, 2],
    "pads": [0, 1, 2],
    "dilations": [1, 1, 2],
    "group": [1],
    "kernel": [1, 2, 3],
    "scale": [1.0, 2.0, 0.5],
}
_HOSTILE = {
    "strides": [1, 1, 2, 3, 0, -1, 2**31 - 1, 2**62],
    "pads": [0, 0, 1, 2, -1, -3, 2**30, 2**62],
    "dilations": [1, 1, 2, 0, -2, 2**31],
    "group": [1, 1, 1, 2, 3, 0, -1, 2**40],
    "kernel": [1, 2, 3, 3, 0],
    "scale": [1.0, 2.0, 0.5, 3.0, 0.0, -1.0, 1e-9],
}
_OPS = ["Conv", "Conv", "ConvTranspose", "Relu", "Add", "Concat", "Resize"]


def _ints(draw, values, lengths) -> list[int]:
    return [draw(values) for _ in range(draw(st.sampled_from(lengths)))]


@st.composite
def graphs(draw) -> tuple[onnx.ModelProto, tuple[int, ...] | None]:
    """A chain of 1-4 ops on a (1, C, *S) input of 1 to 3 spatial axes, and the input shape
    to analyse it at (None: the declared one)."""
    channels = draw(st.integers(1, 3))
    spatial = draw(st.sampled_from([2, 2, 2, 1, 3]))
    size = draw(st.integers(1, 6 if spatial < 3 else 4))
    free = draw(st.booleans())
    hostile = draw(st.booleans())
    pick = {
        key: st.sampled_from(values) for key, values in (_HOSTILE if hostile else _SANE).items()
    }
    lengths = [spatial] * 4 + [1, 2, 3] if hostile else [spatial]  # list attributes' lengths
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    produced = ["x"]
    width = {"x": channels}  # channels each tensor has if every op so far was valid
    for position in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(_OPS))
        source, out = produced[-1], f"t{position}"
        attributes: dict = {}
        inputs = [source]
        if op in ("Conv", "ConvTranspose"):
            group = draw(pick["group"])
            per_group = max(width[source] // group, 1) if 0 < group <= 8 else 1
            kernel = _ints(draw, pick["kernel"], lengths)
            out_channels = draw(st.integers(1, 4))
            if op == "Conv":
                shape = (out_channels * (group if 0 < group <= 8 else 1), per_group, *kernel)
                width[out] = shape[0]
            else:
                shape = (width[source], out_channels, *kernel)
                width[out] = out_channels * (group if 0 < group <= 8 else 1)
            if hostile and draw(st.booleans()):  # a weight that fits no input
                shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)), *kernel)
            name = f"w{position}"
            weights.append(numpy_helper.from_array(np.ones(shape, np.float32) * 0.1, name))
            inputs.append(name)
            for key in ("strides", "pads", "dilations"):
                if draw(st.booleans()):
                    counts = [2 * n for n in lengths] if key == "pads" else lengths
                    attributes[key] = _ints(draw, pick[key], counts)
            if draw(st.booleans()):
                attributes["group"] = group
            if draw(st.booleans()):
                attributes["kernel_shape"] = _ints(draw, pick["kernel"], lengths)
            if hostile and draw(st.integers(0, 4)) == 0:
                attributes["auto_pad"] = draw(st.sampled_from(["SAME_UPPER", "VALID", "NOTSET"]))
            if op == "ConvTranspose" and hostile and draw(st.booleans()):
                attributes["output_padding"] = _ints(draw, st.sampled_from([0, 1, 5, -1]), lengths)
            if op == "ConvTranspose" and hostile and draw(st.integers(0, 4)) == 0:
                attributes["output_shape"] = _ints(
                    draw, st.sampled_from([1, 4, 16, 0, -1]), lengths
                )
        elif op in ("Add", "Concat"):
            inputs.append(draw(st.sampled_from(produced)))
            width[out] = width[source] + (width[inputs[1]] if op == "Concat" else 0)
            if op == "Concat":
                attributes["axis"] = draw(st.integers(-5, 4)) if hostile else 1
        elif op == "Resize":
            scale = draw(pick["scale"])
            name = f"scales{position}"
            weights.append(
                numpy_helper.from_array(np.array([1, 1] + [scale] * spatial, np.float32), name)
            )
            inputs += ["", name]
            attributes["mode"] = draw(st.sampled_from(["nearest", "linear", "cubic"]))
            width[out] = width[source]
        else:
            width[out] = width[source]
        nodes.append(
            helper.make_node(op, inputs, [out], name=f"{op.lower()}{position}", **attributes)
        )
        produced.append(out)
    free_dims: list = ["d", "h", "w"][-spatial:]
    declared_in = [1, channels, *(free_dims if free else [size] * spatial)]
    declared_out = draw(st.sampled_from([None, [1] + [None] * (spatial + 1), [1, 1, size, size]]))
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, declared_in)],
        [helper.make_tensor_value_info(produced[-1], TensorProto.FLOAT, declared_out)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, ((1, channels, *[size] * spatial) if free else None)


def _check_analysis(analysis, model: onnx.ModelProto) -> None:
    """What a successful analysis promises: kernel layers with positive sizes and counts."""
    graph = onnx.printer.to_text(model.graph)
    assert analysis.layers, graph
    for layer in analysis.layers:
        assert layer.kernels >= 1, graph
        # (A rank the weights contradict is left to ONNX Runtime, which refuses the run.)
        assert len(layer.spatial_shape) == layer.spatial_rank, (layer, graph)
        assert all(isinstance(d, int) and d >= 1 for d in layer.spatial_shape), (layer, graph)
        assert layer.group in ("encoder", "bottleneck", "decoder", "head", "off-path"), graph


@settings(max_examples=300, **DETERMINISTIC)
@given(case=graphs())
def test_any_small_graph_is_analysed_or_refused_with_one_error(case) -> None:
    model, input_shape = case
    try:
        analysis = analyse_model(from_proto(model), input_shape)
    except SegattrError as exc:
        event(f"refused: {type(exc).__name__}")
        _one_line_error(exc)
    else:
        event("analysed")
        _check_analysis(analysis, model)


@settings(max_examples=60, **DETERMINISTIC)
@given(case=graphs())
def test_segattr_inspect_on_any_small_graph_exits_0_or_one_error_line(tmp_path, case) -> None:
    model, input_shape = case
    path = tmp_path / "random.onnx"
    path.write_bytes(model.SerializeToString())
    arguments = ["inspect", str(path), "--provider", "cpu", "--json"]
    if input_shape is not None:
        arguments += ["--input-shape", "x".join(map(str, input_shape))]
    result = CliRunner().invoke(main, arguments)
    event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.exit_code == 2:
        assert len(errors) == 1, result.stderr
        assert "Traceback" not in result.stderr
    else:
        assert not errors
        report = json.loads(result.stdout)
        assert report["layers"] and {layer["name"] for layer in report["layers"]} <= {
            node.name for node in model.graph.node
        }


# ------------------------------------------------------------------ random TOML documents
def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml(value) -> str:
    """A TOML value (inline tables and arrays; every string a basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_key(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"


def _document(data: dict) -> str:
    return "\n".join(f"{_toml_key(key)} = {_toml(value)}" for key, value in data.items()) + "\n"


_WORDS = [
    "model.onnx", "missing.onnx", "case*.npy", "case1.npy", "labels_{stem}.npy", "{stem.__class__}",
    "roi.npy", "card.toml", "bad.card.toml", "out", "../escape", "/", "", " ", "same", "kwc",
    "gradcam", "scorecam", "nope", "decoder", "re:(a+)+$", "re:[", "p1", "p2", "cpu", "auto",
    "4G", "30%", "0.5", "-1G", "prediction_preserved >= 0.8", "deletion_auc < 0.5",
    "roi_mass_fraction > 0.1", "attribution_quality >= 2", "nope >= 1", "zscore", "ct-window",
    "percentile", "unit", "imagenet", "sigmoid", "softmax", "largest-component", "all",
    "line\nbreak", "tab\tand \"quotes\"", "ü/漢字",
]  # fmt: skip
_KEYS = sorted({*CONFIG_KEYS, *CASE_KEYS, *TARGET_KEYS, *CARD_SECTIONS})
_KEYS += sorted({key for keys in CARD_SECTIONS.values() for key in keys})
_KEYS += ["modle", "Model", "case", "check", "a.b", "", "ü"]
_leaves = st.one_of(
    st.sampled_from(_WORDS),
    st.text(max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, 2, -1, 3, 255, 256]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from([datetime(2024, 1, 2, 3, 4, 5), date(2024, 1, 2), time(3, 4, 5)]),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), inner, max_size=4),
    ),
    max_leaves=10,
)


@st.composite
def _mutated(draw, base: dict, keys: list[str]) -> dict:
    """``base`` with some entries replaced, dropped or added, at any nesting level."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 4))):
        target = data
        while isinstance(target, dict) and target and draw(st.booleans()):
            inner = target[draw(st.sampled_from(sorted(target)))]
            if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                inner = inner[0]
            if not isinstance(inner, dict):
                break
            target = inner
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "add" or not target:
            target[draw(st.sampled_from(keys) | st.text(max_size=4))] = draw(_values)
        elif action == "drop":
            del target[draw(st.sampled_from(sorted(target)))]
        else:
            target[draw(st.sampled_from(sorted(target)))] = draw(_values)
    return data


_CONFIG = {
    "model": "model.onnx",
    "cases": [{"input": "case*.npy", "labels": "labels_{stem}.npy", "roi": "roi.npy"}],
    "methods": ["kwc", "gradcam"],
    "checks": {"all": ["prediction_preserved >= 0.5"], "kwc": ["deletion_auc < 0.9"]},
    "output": "out",
    "layers": "decoder",
    "variant": "p2",
    "provider": "cpu",
    "steps": 5,
    "target": {"class_index": 1, "activation": "softmax", "region": "all"},
    "card": "card.toml",
    "memory_budget": "1G",
}
_CARD = {
    "input": {
        "intensity": "percentile",
        "window": [-1000, 400],
        "percentiles": [1, 99],
        "resize": [8, 8],
        "channels_last": False,
    },
    "target": {"class_index": 1, "activation": "softmax"},
}


def _texts(base: dict, keys: list[str]):
    """TOML text: a mutated ``base``, sometimes with a stray line (often not TOML at all)."""
    documents = _mutated(base, keys).map(_document)
    stray = ["[", "x = ", "= 1", "[[cases]]", "a = 1\na = 2", "\x00", "model"]
    garbage = st.sampled_from([""] * 3 * len(stray) + stray)  # one document in four
    return st.tuples(documents, garbage).map(lambda pair: pair[0] + pair[1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with everything a valid audit config names."""
    folder = tmp_path_factory.mktemp("audit")
    onnx.save(build(), str(folder / "model.onnx"))
    for stem in ("case1", "case2"):
        np.save(folder / f"{stem}.npy", np.ones((8, 8), np.float32))
        np.save(folder / f"labels_{stem}.npy", np.zeros((8, 8), np.int64))
    np.save(folder / "roi.npy", np.ones((8, 8), bool))
    (folder / "card.toml").write_text(_document(_CARD))
    (folder / "bad.card.toml").write_text("[input]\nintensity = 'loud'\n")
    return folder


@settings(max_examples=300, **DETERMINISTIC)
@given(text=_texts(_CONFIG, sorted({*CONFIG_KEYS, *CASE_KEYS, *TARGET_KEYS})))
def test_any_audit_config_is_taken_or_refused_with_one_error_line(workspace, text: str) -> None:
    path = workspace / "audit.toml"
    path.write_text(text, encoding="utf-8")
    try:
        config = AuditConfig.load(path)
    except SegattrError as exc:
        _one_line_error(exc)
        return
    # What a taken config promises the audit run: every setting of the type it needs.
    assert config.model.is_file() and config.cases and config.checks
    assert config.methods and all(isinstance(m, str) for m in config.methods)
    for value in (config.layers, config.variant, config.provider):
        assert isinstance(value, str), config
    assert config.steps is None or (isinstance(config.steps, int) and config.steps >= 0)
    assert isinstance(config.target.get("class_index", 0), int)
    for key in ("output", "activation", "region"):
        assert isinstance(config.target.get(key, ""), str), config.target
    assert config.output.resolve().is_relative_to(workspace.resolve()) or not config.output.exists()


@settings(max_examples=300, **DETERMINISTIC)
@given(
    text=_texts(_CARD, sorted({*CARD_SECTIONS, *CARD_SECTIONS["input"], *CARD_SECTIONS["target"]}))
)
def test_any_model_card_is_taken_or_refused_with_one_error_line(workspace, text: str) -> None:
    path = workspace / "random.card.toml"
    path.write_text(text, encoding="utf-8")
    try:
        card = ModelCard.load(path)
    except SegattrError as exc:
        _one_line_error(exc)
        return
    # What a taken card promises preparing an image: settings of the types it computes with.
    assert card.intensity is None or isinstance(card.intensity, str)
    assert isinstance(card.channels_last, bool)
    low, high = card.window
    assert math.isfinite(low) and math.isfinite(high) and low < high
    assert 0 <= card.percentiles[0] < card.percentiles[1] <= 100
    assert card.resize is None or all(isinstance(d, int) and d >= 1 for d in card.resize)
    assert card.spacing is None or all(math.isfinite(s) and s > 0 for s in card.spacing)


def test_the_generated_documents_reach_acceptance(workspace) -> None:
    """The generators are not all noise: the unmutated documents are taken."""
    (workspace / "ok.toml").write_text(_document(_CONFIG))
    assert AuditConfig.load(workspace / "ok.toml").methods == ("kwc", "gradcam")
    shutil.copy(workspace / "card.toml", workspace / "ok.card.toml")
    assert ModelCard.load(workspace / "ok.card.toml").resize == (8, 8)

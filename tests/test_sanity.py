"""The sanity cascade (segattr_onnx/sanity.py) and the agreement figures it reports.

The randomisation is checked against the graph itself (which initialisers feed which kernel),
the cascade's figures against maps and predictions recomputed here, and the agreement metrics
against scipy's Spearman and an SSIM written out window by window.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage, stats

from segattr_onnx import sanity, sanity_audit
from segattr_onnx.audit import AuditConfigError, audit
from segattr_onnx.errors import GraphRewriteError
from segattr_onnx.explainer import Explainer
from segattr_onnx.graph import randomise
from segattr_onnx.graph.catalogue import KernelLayer, analyse_model
from segattr_onnx.graph.loading import LoadedModel, from_proto, load_model
from segattr_onnx.graph.randomise import layer_parameters, randomise_layers
from segattr_onnx.methods import registry
from segattr_onnx.methods.base import AttributionMethod, Case, KernelWeights
from segattr_onnx.metrics.agreement import spearman, ssim
from segattr_onnx.sanity import SanityError, cascade_layers, sanity_check
from segattr_onnx.target import Target
from tests.conftest import fixture, run_reference
from tests.methods.library import decoder_layers

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not usable")


# --- a method that ignores the model -----------------------------------------------------------


class EdgesOnly(AttributionMethod):
    """Not an explanation: the input's gradient magnitude, whatever the model says. A sanity
    check must catch it."""

    name = "edges-only-test"
    description = "test method: the input's edges, ignoring the model"

    def kernel_weights(
        self, case: Case, layer: KernelLayer, results: Sequence[np.ndarray]
    ) -> KernelWeights:
        return KernelWeights(np.zeros(layer.kernels))

    def layer_map(self, case: Case, layer: KernelLayer, weights: KernelWeights) -> np.ndarray:
        return np.zeros(layer.spatial_shape)

    def combine(self, case: Case, layer_maps: Sequence[np.ndarray]) -> np.ndarray:
        axis = case.analysis.input.channel_axis
        image = case.x[0].astype(np.float64)
        image = np.take(image, 0, axis=axis - 1) if axis is not None else image
        magnitude = np.sqrt(sum(ndimage.sobel(image, a) ** 2 for a in range(image.ndim)))
        return magnitude / magnitude.max()


@contextmanager
def registered(cls: type) -> Iterator[str]:
    """``cls`` registered by its name for the length of the block, then removed again."""
    registry.register_method(cls)
    try:
        yield cls.name
    finally:
        registry._REGISTRY.pop(cls.name, None)


# --- helpers -----------------------------------------------------------------------------------


def _stored_values(loaded: LoadedModel) -> dict[str, np.ndarray]:
    folder = str(loaded.external_data_dir or "")
    return {
        t.name: numpy_helper.to_array(t, base_dir=folder) for t in loaded.proto.graph.initializer
    }


def _feeding_initialisers(proto: onnx.ModelProto, node_name: str) -> set[str]:
    """The initialisers behind a kernel node's weight and bias inputs, found by walking the
    graph back through DequantizeLinear/Cast (written here, apart from sanity.py)."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    stored = {t.name for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == node_name)
    found = set()
    for name in node.input[1:3]:
        while name and name not in stored:
            name = producers[name].input[0]
        if name:
            found.add(name)
    return found


def _scipy_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scipy's Spearman, with agreement.py's stated value for a constant map against a
    varying one (0; scipy gives NaN)."""
    if np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a.ravel(), b.ravel())[0])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the randomisation -------------------------------------------------------------------------

RANDOMISED_FIXTURES = [
    "unet2d_torchscript",
    "unet2d_dynamo",
    "unet2d_qdq",
    "unet2d_fp16",
    "unet2d_nhwc",
    "unet3d",
]


@pytest.mark.parametrize("name", RANDOMISED_FIXTURES)
def test_only_the_chosen_layers_parameters_change_and_keep_their_type(name: str) -> None:
    model = fixture(name)
    loaded = load_model(model.path)
    layers = analyse_model(loaded, model.test_shape).layers
    chosen = [layers[-1], layers[len(layers) // 2]]
    before = _stored_values(loaded)
    copy = randomise_layers(loaded, chosen, seed=7)
    after = _stored_values(copy)
    parameters = set().union(
        *(_feeding_initialisers(loaded.proto, layer.node_name) for layer in chosen)
    )
    assert len(parameters) == 4  # a weight and a bias each
    assert set(layer_parameters(loaded, chosen[0])) | set(layer_parameters(loaded, chosen[1])) == (
        parameters
    )
    # A tensor without spread (one value, as the bias of a one-class head) is drawn from a
    # normal of deviation 0: it keeps its value.
    expected = {key for key in parameters if np.ptp(before[key].astype(np.float64)) > 0}
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed == expected
    assert len(expected) >= 3
    for key in expected:
        assert after[key].dtype == before[key].dtype and after[key].shape == before[key].shape
    assert copy.path is None and copy.external_data_dir == loaded.external_data_dir


@pytest.mark.parametrize("name", ["unet2d_torchscript", "unet2d_qdq", "unet2d_fp16", "unet3d"])
def test_new_values_have_the_originals_mean_and_spread(name: str) -> None:
    """Each new tensor is a normal draw with the old one's mean and standard deviation: both
    agree within five standard errors (1/√n for the mean, 1/√(2n) for the deviation); integer
    (quantised) tensors are rounded, which adds at most 1/12 to the variance."""
    model = fixture(name)
    loaded = load_model(model.path)
    layers = analyse_model(loaded, model.test_shape).layers
    before = _stored_values(loaded)
    after = _stored_values(randomise_layers(loaded, layers, seed=11))
    checked = 0
    for key, old in before.items():
        new = after[key]
        if np.array_equal(old, new) or old.size < 8:
            continue
        old64, new64, n = old.astype(np.float64), new.astype(np.float64), old.size
        sigma = float(old64.std())
        rounding = 0.5 if old.dtype.kind in "iu" else 0.0
        assert abs(new64.mean() - old64.mean()) <= 5 * sigma / np.sqrt(n) + rounding, key
        assert abs(new64.std() - sigma) <= 5 * sigma / np.sqrt(2 * n) + rounding, key
        if n >= 100:  # new values, not the old ones moved or scaled
            assert stats.pearsonr(old64.ravel(), new64.ravel())[0] < 0.5, key
        checked += 1
    assert checked >= len(layers)  # every weight (biases of fewer than 8 values are skipped)


def test_the_same_seed_gives_the_same_model_and_another_seed_another() -> None:
    model = fixture("unet2d_torchscript")
    loaded = load_model(model.path)
    layers = analyse_model(loaded, model.test_shape).layers[-3:]
    first = randomise_layers(loaded, layers, seed=5).proto.SerializeToString()
    again = randomise_layers(loaded, layers, seed=5).proto.SerializeToString()
    other = randomise_layers(loaded, layers, seed=6).proto.SerializeToString()
    assert first == again
    assert first != other


def test_each_step_keeps_the_draws_of_the_step_before() -> None:
    """Cumulative: the copy with k layers randomised holds the k − 1 layers of the step before
    exactly as that step drew them."""
    model = fixture("unet2d_torchscript")
    loaded = load_model(model.path)
    analysis = analyse_model(loaded, model.test_shape)
    order = cascade_layers(analysis, "logits")
    three = _stored_values(randomise_layers(loaded, order[:3], seed=2))
    four = _stored_values(randomise_layers(loaded, order[:4], seed=2))
    for layer in order[:3]:
        for key in _feeding_initialisers(loaded.proto, layer.node_name):
            assert np.array_equal(three[key], four[key])


def test_cascade_order_is_graph_order_reversed() -> None:
    model = fixture("unet2d_torchscript")
    analysis = analyse_model(load_model(model.path), model.test_shape)
    order = [layer.name for layer in cascade_layers(analysis, "logits")]
    names = [
        n.name for n in load_model(model.path).proto.graph.node if n.op_type.startswith("Conv")
    ]
    assert order == names[::-1]


def test_the_users_model_file_and_object_are_untouched(tmp_path: Path) -> None:
    """External data included: the randomised tensors live in the copy, inline; the data file
    and the model file are byte for byte what they were, and the copy still runs."""
    model = fixture("unet2d_dynamo")
    data = model.path.with_name(model.path.name + ".data")
    digests = (_digest(model.path), _digest(data))
    explainer = Explainer(model.path, provider="cpu")
    proto_before = explainer.model.proto.SerializeToString()
    result = sanity_check(explainer, model.input(0), "gradcam", steps=2)
    assert explainer.model.proto.SerializeToString() == proto_before
    assert (_digest(model.path), _digest(data)) == digests
    assert all(step.error is None for step in result.steps)
    copy = randomise_layers(explainer.model, explainer.analysis(model.test_shape).layers[-2:], 0)
    inline = {
        t.name for t in copy.proto.graph.initializer if t.data_location != TensorProto.EXTERNAL
    }
    assert len(inline) == 4 and len(copy.proto.graph.initializer) > 4


# --- what cannot be randomised ------------------------------------------------------------------


def _small_model(
    shared: bool = False, weight_type: int = TensorProto.FLOAT, zero_biases: bool = False
) -> onnx.ModelProto:
    """image → conv A → conv B → conv C → head; with ``shared`` B and C read one weight; with
    ``weight_type`` C's weight is stored in that type and cast to float; with ``zero_biases``
    B and C read one all-zero bias (as simplifiers merge them)."""
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    inits = [tensor("wa", 4, 1, 3, 3), tensor("wb", 4, 4, 3, 3), tensor("wh", 2, 4, 1, 1)]
    inits += [tensor(f"b{k}", 4) for k in "abc"] + [tensor("bh", 2)]
    nodes = [helper.make_node("Conv", ["image", "wa", "ba"], ["a"], name="A", pads=[1] * 4)]
    nodes.append(helper.make_node("Relu", ["a"], ["ar"]))
    if zero_biases:
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "zeros"))
    b_bias, c_bias = ("zeros", "zeros") if zero_biases else ("bb", "bc")
    nodes.append(helper.make_node("Conv", ["ar", "wb", b_bias], ["b"], name="B", pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["b"], ["br"]))
    c_weight = "wb" if shared else "wc"
    if not shared:
        values = rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)
        stored = helper.make_tensor("wc_stored", weight_type, values.shape, values.ravel().tolist())
        inits.append(stored)
        nodes.append(helper.make_node("Cast", ["wc_stored"], ["wc"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Conv", ["br", c_weight, c_bias], ["c"], name="C", pads=[1] * 4))
    nodes.append(helper.make_node("Relu", ["c"], ["cr"]))
    nodes.append(helper.make_node("Conv", ["cr", "wh", "bh"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_weight_shared_with_another_layer_is_refused_before_any_work() -> None:
    loaded = from_proto(_small_model(shared=True))
    order = cascade_layers(analyse_model(loaded, (1, 1, 8, 8)), "logits")
    assert [layer.name for layer in order] == ["head", "C", "B", "A"]
    randomise_layers(loaded, order[:1])  # the head's own weights: fine
    with pytest.raises(GraphRewriteError, match=r"'C'.*shared"):
        randomise_layers(loaded, order[:2])
    explainer = Explainer(loaded, provider="cpu")
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    with pytest.raises(GraphRewriteError, match="shared"):
        sanity_check(explainer, x, "gradcam", layers="all")
    assert sanity_check(explainer, x, "gradcam", layers="all", steps=1).final.error is None


def test_a_shared_tensor_without_spread_is_left_as_it_is() -> None:
    """A zero bias two layers share draws as zeros again: nothing to replace, nothing to
    refuse; the layers' own weights are randomised."""
    loaded = from_proto(_small_model(zero_biases=True))
    order = cascade_layers(analyse_model(loaded, (1, 1, 8, 8)), "logits")
    before = _stored_values(loaded)
    after = _stored_values(randomise_layers(loaded, order[:3], seed=0))
    changed = {key for key in before if not np.array_equal(before[key], after[key])}
    assert changed == {"wh", "bh", "wc_stored", "wb"}


def test_a_weight_stored_as_bfloat16_is_refused() -> None:
    loaded = from_proto(_small_model(weight_type=TensorProto.BFLOAT16))
    order = cascade_layers(analyse_model(loaded, (1, 1, 8, 8)), "logits")
    with pytest.raises(GraphRewriteError, match="'wc_stored' holds bfloat16"):
        randomise_layers(loaded, order[:2])


def test_a_weight_behind_a_cast_is_drawn_in_its_stored_type() -> None:
    loaded = from_proto(_small_model(weight_type=TensorProto.FLOAT16))
    order = cascade_layers(analyse_model(loaded, (1, 1, 8, 8)), "logits")
    copy = randomise_layers(loaded, order[:2], seed=1)
    stored = {t.name: t for t in copy.proto.graph.initializer}
    assert stored["wc_stored"].data_type == TensorProto.FLOAT16
    old = numpy_helper.to_array(next(t for t in loaded.proto.graph.initializer
                                     if t.name == "wc_stored"))  # fmt: skip
    assert not np.array_equal(numpy_helper.to_array(stored["wc_stored"]), old)


# --- the cascade ------------------------------------------------------------------------------

# Final Spearman measured on these fixtures with input seeds 0-3 and weight seeds 0-2 (12
# cascades each): Grad-CAM at most 0.09 (2D), Grad-CAM++ at most 0.16 (3D; Grad-CAM's map of
# the 3D fixture is constant, its instance norms zero every gradient mean), KWC at most 0.47
# (2D) and 0.49 (3D), its first step at least 0.29 above its last. The bounds leave a margin.
DECORRELATION_CASES = [
    ("unet2d_torchscript", "gradcam"),
    ("unet2d_torchscript", "kwc"),
    ("unet3d", "gradcampp"),
    ("unet3d", "kwc"),
]


@pytest.mark.parametrize(("name", "method"), DECORRELATION_CASES)
def test_maps_of_methods_that_read_the_model_decorrelate(name: str, method: str) -> None:
    model = fixture(name)
    explainer = Explainer(model.path, provider="cpu")
    x = model.input(0)
    result = sanity_check(explainer, x, method)
    analysis = explainer.analysis(model.test_shape)
    assert len(result.steps) == len(analysis.layers) == len(result.cascade)
    assert [s.randomised for s in result.steps] == list(range(1, len(analysis.layers) + 1))
    assert result.layers == decoder_layers(name)
    # The figures are those of the maps, recomputed here from the maps themselves.
    np.testing.assert_allclose(result.original_map, explainer.explain(x, method).map, atol=1e-5)
    for step, step_map in zip(result.steps, result.maps, strict=True):
        expected = _scipy_spearman(result.original_map, step_map)
        assert step.spearman == pytest.approx(expected, abs=1e-9)
    final = result.final_spearman
    assert final is not None
    if method == "kwc":
        assert final < 0.6
        assert final < result.steps[0].spearman - 0.2
    else:
        assert final < 0.4


def test_the_last_step_is_the_randomised_model_explained_the_same_way() -> None:
    """A step's map is the map of the randomised copy, explained with the original's method,
    layers, target and variant: compared here with an explanation of that copy made directly."""
    model = fixture("unet2d_torchscript")
    explainer = Explainer(model.path, provider="cpu")
    x = model.input(1)
    result = sanity_check(explainer, x, "gradcampp", "last", variant="p1", steps=3, seed=4)
    order = cascade_layers(explainer.analysis(model.test_shape), "logits")
    copy = Explainer(randomise_layers(explainer.model, order[:3], 4), provider="cpu")
    direct = copy.explain(x, "gradcampp", "last", variant="p1")
    np.testing.assert_allclose(result.maps[-1], direct.map, atol=1e-6)
    assert result.steps[-1].base_score == pytest.approx(direct.base_score, rel=1e-6)


def test_a_largest_component_region_is_frozen_from_the_original_prediction() -> None:
    """Every step scores the voxels of the original prediction's largest component (found
    here with scipy on a plain ONNX Runtime run), not its own."""
    model = fixture("unet2d_torchscript")
    explainer = Explainer(model.path, provider="cpu")
    x = model.input(0)
    target = Target(class_index=0, region="largest-component")
    result = sanity_check(explainer, x, "gradcam", target=target, steps=3, seed=1)

    def probabilities(proto: onnx.ModelProto) -> np.ndarray:
        (logits,) = run_reference(proto, {"image": x})
        exp = np.exp(logits[0].astype(np.float64))
        return exp[0] / exp.sum(axis=0)

    labels, count = ndimage.label(probabilities(explainer.model.proto) >= 0.5)
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, count + 1))
    region = labels == 1 + int(np.argmax(sizes))
    assert count > 1  # the region is a real choice here, not the whole mask
    order = cascade_layers(explainer.analysis(model.test_shape), "logits")
    for step in result.steps:
        copy = randomise_layers(explainer.model, order[: step.randomised], 1)
        expected = float(probabilities(copy.proto)[region].sum())
        assert step.base_score == pytest.approx(expected, rel=1e-4)
    assert "original model" in result.target["region"]


def test_a_method_that_ignores_the_model_keeps_its_map() -> None:
    model = fixture("unet2d_torchscript")
    explainer = Explainer(model.path, provider="cpu")
    with registered(EdgesOnly) as name:
        result = sanity_check(explainer, model.input(0), name, steps=4)
    assert all(step.spearman == pytest.approx(1.0) for step in result.steps)
    assert all(step.ssim == pytest.approx(1.0) for step in result.steps)
    assert sanity_audit.parse_check("sanity_spearman <= 0.5").passes(result.final_spearman) is False


class ZeroMap(EdgesOnly):
    name = "zero-map-test"
    description = "test method: attributes nothing"

    def combine(self, case: Case, layer_maps: Sequence[np.ndarray]) -> np.ndarray:
        return np.zeros(case.spatial_shape)


def test_a_constant_original_map_is_refused_before_the_cascade() -> None:
    model = fixture("unet2d_torchscript")
    with registered(ZeroMap) as name, pytest.raises(SanityError, match="map of the original"):
        sanity_check(Explainer(model.path, provider="cpu"), model.input(0), name)


def test_a_step_the_randomisation_breaks_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights that make the model's output NaN: every step says why it has no map, and the
    final figure cannot be judged."""
    monkeypatch.setattr(randomise, "_draw", lambda values, rng: np.full_like(values, np.nan))
    model = fixture("unet2d_torchscript")
    result = sanity_check(Explainer(model.path, provider="cpu"), model.input(0), "kwc", steps=2)
    assert [s.error is not None for s in result.steps] == [True, True]
    assert result.final_spearman is None
    assert "not finite" in result.steps[0].error
    assert sanity_audit.unjudged_reason(result).startswith("the sanity check cannot be judged")
    assert json.loads(json.dumps(result.to_dict()))["final_spearman"] is None


def test_bad_requests_are_refused_with_one_clear_error() -> None:
    model = fixture("unet2d_torchscript")
    explainer = Explainer(model.path, provider="cpu")
    with pytest.raises(SanityError, match="at most 13"):
        sanity_check(explainer, model.input(0), "gradcam", steps=14)
    with pytest.raises(SanityError, match="judges image_preserved"):
        sanity_audit.parse_check("image_preserved <= 0.5")
    with pytest.raises(SanityError, match="is not 'sanity_spearman OP number'"):
        sanity_audit.parse_check("sanity_spearman == 0.5")


# --- the audit check ----------------------------------------------------------------------------


def _audit_config(folder: Path, methods: list[str], extra: str = "") -> Path:
    model = fixture("unet2d_torchscript")
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    np.save(folder / "cases" / "case0.npy", model.input(0)[0])
    config = folder / "audit.toml"
    config.write_text(
        f"model = {json.dumps(str(model.path))}\n"
        f"methods = {json.dumps(methods)}\n"
        'provider = "cpu"\n'
        'checks = ["sanity_spearman <= 0.5"]\n'
        'cases = ["cases/*.npy"]\n' + extra
    )
    return config


def test_the_audit_gates_on_the_final_spearman_of_each_method(tmp_path: Path) -> None:
    config = _audit_config(tmp_path, ["gradcam", "kwc"], "[sanity]\nseed = 3\n")
    report = audit(config)
    assert report.passed and len(report.results) == 2
    model = fixture("unet2d_torchscript")
    for method in ("gradcam", "kwc"):
        record = json.loads(
            (tmp_path / "segattr-audit" / "cases" / f"case0.{method}.json").read_text()
        )
        expected = sanity_check(Explainer(model.path, provider="cpu"), model.input(0), method,
                                seed=3).final_spearman  # fmt: skip
        assert record["scores"]["sanity_spearman"] == pytest.approx(expected, abs=1e-9)
        assert record["scores"]["sanity"]["seed"] == 3
        (result,) = [r for r in report.results if r.method == method]
        assert result.value == pytest.approx(expected, abs=1e-9)


def test_the_audit_fails_a_method_that_ignores_the_model(tmp_path: Path) -> None:
    with registered(EdgesOnly) as name:
        config = _audit_config(tmp_path, [name], "[sanity]\nsteps = 3\n")
        report = audit(config)
    assert not report.passed
    (failure,) = report.failures
    assert failure.value == pytest.approx(1.0)
    assert "sanity_spearman must be at most 0.5" in failure.message
    junit = (tmp_path / "segattr-audit" / "junit.xml").read_text()
    assert "<failure" in junit and name in junit


def test_an_audit_check_on_a_broken_last_step_fails_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(randomise, "_draw", lambda values, rng: np.full_like(values, np.nan))
    report = audit(_audit_config(tmp_path, ["gradcam"], "[sanity]\nsteps = 2\n"))
    (failure,) = report.failures
    assert failure.value is None
    assert failure.message.startswith("the sanity check cannot be judged: with its last 2")


def test_resume_reuses_a_cascade_only_with_the_same_sanity_settings(tmp_path: Path) -> None:
    config = _audit_config(tmp_path, ["gradcam"], "[sanity]\nsteps = 2\n")
    assert audit(config).computed == 1
    assert audit(config, resume=True).reused == 1
    config.write_text(config.read_text().replace("steps = 2", "steps = 2\nseed = 9"))
    assert audit(config, resume=True).computed == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[sanity]\nsteps = 0\n", "steps = 0 in the audit config's \\[sanity\\]"),
        ("[sanity]\nseed = -1\n", "seed = -1"),
        ('[sanity]\nsteps = "3"\n', "steps = '3'"),
        ("[sanity]\nsede = 1\n", "did you mean 'seed'"),
        ("sanity = 3\n", "'sanity' in the audit config must be a table"),
    ],
)
def test_bad_sanity_settings_are_refused(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(AuditConfigError, match=message):
        audit(_audit_config(tmp_path, ["gradcam"], table))


# --- the agreement figures (metrics/agreement.py) against references ----------------------------


def _pairs(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    a2, a3 = rng.random((20, 17)), rng.random((9, 10, 8))
    return [
        (a2, rng.random((20, 17))),
        (a2, 0.7 * a2 + 0.3 * rng.random((20, 17))),  # correlated
        (np.round(a2 * 4) / 4, np.round(rng.random((20, 17)) * 3) / 3),  # many ties
        (a3, 1 - a3 + 0.2 * rng.random((9, 10, 8))),  # anti-correlated, 3D
    ]


def test_spearman_is_scipys_with_ties_given_their_mean_rank() -> None:
    for a, b in _pairs(np.random.default_rng(0)):
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)


def _ssim_brute_force(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM with explicit 7-wide windows (7×7 or 7×7×7), sample statistics
    (n − 1), K1 = 0.01, K2 = 0.03, averaged over every window that lies inside the map."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for corner in np.ndindex(*(n - 6 for n in a.shape)):
        window = tuple(slice(c, c + 7) for c in corner)
        x, y = a[window].ravel(), b[window].ravel()
        mx, my = x.mean(), y.mean()
        vx, vy = x.var(ddof=1), y.var(ddof=1)
        cov = ((x - mx) * (y - my)).sum() / (x.size - 1)
        values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_is_the_window_by_window_formula() -> None:
    for a, b in _pairs(np.random.default_rng(1)):
        assert ssim(a, b) == pytest.approx(_ssim_brute_force(a, b), abs=1e-9)
    a, b = _pairs(np.random.default_rng(2))[1]
    assert ssim(a * 5, b * 5, data_range=5.0) == pytest.approx(
        _ssim_brute_force(a * 5, b * 5, 5.0), abs=1e-9
    )
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_maps_smaller_than_the_ssim_window_get_no_ssim() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.random((6, 20)), rng.random((6, 20))
    with pytest.raises(ValueError):
        ssim(a, b)
    rank, structure = sanity.agreement(a, b)
    assert structure is None
    assert rank == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)


def test_an_audit_case_whose_cascade_cannot_run_fails_its_check_and_the_audit_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer the rewrite refuses (shared weights, a model fixed at its window's size): that
    case's check fails with the reason, instead of the whole audit stopping with exit 2."""
    from segattr_onnx.errors import GraphRewriteError

    def refuse(*args, **kwargs):
        raise GraphRewriteError("the weight of layer 'x' is shared with other nodes")

    monkeypatch.setattr(randomise, "randomise_layers", refuse)
    monkeypatch.setattr(sanity, "randomise_layers", refuse)
    report = audit(_audit_config(tmp_path, ["gradcam"], "[sanity]\nsteps = 2\n"))
    (failure,) = report.failures
    assert failure.value is None
    assert failure.message.startswith("the sanity check cannot run on this case: the weight")

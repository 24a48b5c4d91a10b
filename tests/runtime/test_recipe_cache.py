"""Sessions found on disk by their recipe (model, input size, seed, session key, code) before
any graph is rewritten: a second explanation builds no graph and draws the same map, and
anything the graph was computed from that changes, or a pointer that leads nowhere valid,
makes the graph be built again rather than a stale or foreign one be run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from segattr_onnx import Explainer, Target
from segattr_onnx.graph.heads import ScoreHeadSpec
from segattr_onnx.runtime import recipe_cache, sessions
from segattr_onnx.runtime.disk_cache import DiskCache, cache_key
from segattr_onnx.runtime.optimised_cache import (
    recipe_entry_key,
    session_from_recipe,
    use_disk_cache,
)
from segattr_onnx.runtime.recipe_cache import RecipeContext, encode_session_key
from tests.conftest import fixture

MODEL = fixture("unet2d_torchscript")
SPEC = ScoreHeadSpec("logits", onnx.TensorProto.FLOAT, 4, 1, "softmax")


# --- the key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("full", 1), ("full", 1.0)),
        (("full", 1), ("full", True)),
        (("full", 1), ("full", "1")),
        (("full", None), ("full", "None")),
        (("full", ("a", "b")), ("full", "a", "b")),
        (("suffix", "conv", "block", None), ("suffix", "conv", "glorot", None)),
        (("gradients", SPEC, ("a",)), ("gradients", dataclasses.replace(SPEC, rank=5), ("a",))),
        (("gradients", SPEC, ("a",)), ("gradients", dataclasses.replace(SPEC, classes=3), ("a",))),
    ],
)
def test_different_session_keys_never_share_a_recipe(a: tuple, b: tuple) -> None:
    assert encode_session_key(a) is not None and encode_session_key(b) is not None
    assert encode_session_key(a) != encode_session_key(b)
    assert cache_key(encode_session_key(a)) != cache_key(encode_session_key(b))


def test_equal_session_keys_share_one() -> None:
    copy = ScoreHeadSpec("logits", onnx.TensorProto.FLOAT, 4, 1, "softmax")
    key = ("linear-contributions", "conv", "out", 8, True)
    assert encode_session_key(("full", ("score-head", SPEC))) == encode_session_key(
        ("full", ("score-head", copy))
    )
    assert encode_session_key(key) == encode_session_key(tuple(list(key)))


@dataclasses.dataclass
class _Mutable:
    value: int


@pytest.mark.parametrize(
    "key",
    [
        ("a-plugin-kind", "conv"),  # not a kind this package builds
        "full",  # not a tuple
        (),
        ("full", ["a", "b"]),  # a list has no stable value as a key part
        ("full", _Mutable(1)),
        ("full", object()),
    ],
)
def test_a_key_that_is_not_a_recipe_is_not_looked_up(key) -> None:
    assert encode_session_key(key) is None
    assert RecipeContext(onnx.ModelProto(), (1, 1, 8, 8), 0).parts(key) is None


def test_the_recipe_holds_the_model_bytes_the_size_the_seed_and_the_code(monkeypatch) -> None:
    model = onnx.load(str(MODEL.path))
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = changed.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    key = ("suffix", "conv", "block", None)
    base = RecipeContext(model, (1, 1, 64, 64), 0).parts(key)
    assert base == RecipeContext(onnx.load(str(MODEL.path)), (1, 1, 64, 64), 0).parts(key)
    others = [
        RecipeContext(changed, (1, 1, 64, 64), 0).parts(key),
        RecipeContext(model, (1, 1, 64, 96), 0).parts(key),
        RecipeContext(model, (1, 1, 64, 64), 1).parts(key),
    ]
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: b"edited")
    others.append(RecipeContext(model, (1, 1, 64, 64), 0).parts(key))
    assert base is not None and None not in others
    assert len({base, *others}) == 1 + len(others)


def test_source_that_cannot_be_read_turns_recipes_off(monkeypatch) -> None:
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: None)
    assert RecipeContext(onnx.ModelProto(), (1, 1, 8, 8), 0).parts(("full", None)) is None


# --- explanations through the cache ---------------------------------------------------------


class _Builds:
    """Counts the graphs built for sessions (a model handed over as a function is one to
    build; one handed over as a proto was built already)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = sessions.create_session

        def counting(model, *args, **kwargs):
            if callable(model):
                build = model

                def model():
                    self.count += 1
                    return build()

            return original(model, *args, **kwargs)

        monkeypatch.setattr(sessions, "create_session", counting)


def _kwc(model, cache: DiskCache | None, x: np.ndarray) -> np.ndarray:
    previous = use_disk_cache(cache)
    try:
        explainer = Explainer(model, provider="cpu")
        return explainer.explain(x, "kwc", "decoder", target=Target(class_index=1)).map
    finally:
        use_disk_cache(previous)


def test_a_second_explanation_builds_no_graph_and_draws_the_same_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = MODEL.input(seed=3)
    uncached = _kwc(MODEL.path, None, x)
    builds = _Builds(monkeypatch)
    cold = _kwc(MODEL.path, DiskCache(tmp_path / "cache"), x)
    built_cold = builds.count
    warm_cache = DiskCache(tmp_path / "cache")
    warm = _kwc(MODEL.path, warm_cache, x)
    assert built_cold > 0
    assert builds.count == built_cold  # every graph of the second one came from its recipe
    assert warm_cache.stats.stored == 0 and warm_cache.stats.misses == 0
    np.testing.assert_array_equal(cold, uncached)
    np.testing.assert_array_equal(warm, uncached)


def test_a_changed_model_is_rebuilt_not_served_its_old_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file name and size, other weights: a recipe keyed on the path would run the
    first model's suffixes on the second's boundary tensors."""
    x = MODEL.input(seed=3)
    path = tmp_path / "model.onnx"
    model = onnx.load(str(MODEL.path))
    onnx.save(model, str(path))
    cache = tmp_path / "cache"
    _kwc(path, DiskCache(cache), x)
    for weight in model.graph.initializer:  # every layer's weights, so every graph differs
        values = numpy_helper.to_array(weight)
        if values.dtype.kind == "f" and values.size > 1:
            weight.CopyFrom(numpy_helper.from_array(values * np.float32(0.5), weight.name))
    onnx.save(model, str(path))
    builds = _Builds(monkeypatch)
    again = _kwc(path, DiskCache(cache), x)
    assert builds.count > 0
    np.testing.assert_array_equal(again, _kwc(path, None, x))


def test_edited_code_is_rebuilt_not_served_the_old_code_s_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = MODEL.input(seed=3)
    cache = tmp_path / "cache"
    reference = _kwc(MODEL.path, DiskCache(cache), x)
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: b"another checkout")
    builds = _Builds(monkeypatch)
    again = _kwc(MODEL.path, DiskCache(cache), x)
    assert builds.count > 0
    np.testing.assert_array_equal(again, reference)


def _pointer_keys(cache: Path) -> set[str]:
    """The entries holding a key (the recipes' pointers) rather than a graph."""
    verifier = DiskCache(cache)
    found = set()
    for path in (cache / "entries").glob("*/*.bin"):
        payload = verifier.load(path.stem)
        if payload is not None and len(payload) == 64:
            found.add(path.stem)
    return found


def test_a_pointer_to_a_graph_that_is_gone_builds_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = MODEL.input(seed=3)
    cache = tmp_path / "cache"
    reference = _kwc(MODEL.path, DiskCache(cache), x)
    pointers = _pointer_keys(cache)
    assert pointers
    for path in (cache / "entries").glob("*/*.bin"):
        if path.stem not in pointers:
            path.unlink()  # evicted, or removed by `segattr cache clear` of another version
    builds = _Builds(monkeypatch)
    again = _kwc(MODEL.path, DiskCache(cache), x)
    assert builds.count > 0
    np.testing.assert_array_equal(again, reference)
    assert _pointer_keys(cache) == pointers  # and the pointers lead somewhere again
    rebuilt = DiskCache(cache)
    _kwc(MODEL.path, rebuilt, x)
    assert rebuilt.stats.misses == 0 and rebuilt.stats.stored == 0


def _session_args():
    options = sessions.ort.SessionOptions()
    return options, [sessions.CPU]


def test_a_pointer_that_names_no_entry_or_a_graph_onnx_runtime_refuses_is_a_miss(
    tmp_path: Path,
) -> None:
    cache = DiskCache(tmp_path / "cache")
    options, providers = _session_args()
    level = options.graph_optimization_level
    key = recipe_entry_key(("a recipe",), providers, level, ())
    assert session_from_recipe(cache, key, options, providers) is None  # no pointer
    cache.store(key, b"../../etc/passwd".ljust(64, b"0"))  # verified, but not a key
    assert session_from_recipe(cache, key, options, providers) is None
    target = cache_key("not a graph")
    cache.store(target, b"\x00not an onnx model")
    cache.store(key, target.encode())
    assert session_from_recipe(cache, key, options, providers) is None
    assert options.graph_optimization_level == level  # the caller's options as they were


def test_a_model_with_external_data_has_no_recipe(tmp_path: Path) -> None:
    external = fixture("unet2d_dynamo")  # weights in a .data file beside it
    cache = DiskCache(tmp_path / "cache")
    previous = use_disk_cache(cache)
    try:
        explainer = Explainer(external.path, provider="cpu")
        sized = explainer._for_shape(external.input().shape)
        assert sized.engine.ablation.sessions._recipe(("full", None)) is None
    finally:
        use_disk_cache(previous)

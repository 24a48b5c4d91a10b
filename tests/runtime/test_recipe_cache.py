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
from segattr_onnx.runtime.recipe_cache import RecipeContext, encode_session_key, model_digest
from tests.conftest import FIXTURE_NAMES, fixture

MODEL = fixture("unet2d_torchscript")
SPEC = ScoreHeadSpec("logits", onnx.TensorProto.FLOAT, 4, 1, "softmax")


# --- the key --------------------------------------------------------------------------------


HEAD = ("score-head", SPEC)
ROWS = ("conv", "block", "reader", 8)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("full", None), ("full", HEAD)),
        (("full", None), ("full", "None", "None", None)),
        (("boundary", "conv", "block"), ("prefix", "conv", "block")),
        (("observe", ("a", "b")), ("observe", ("ab",))),
        (("observe", ("a", "b")), ("observe", ("b", "a"))),
        (("suffix", "conv", "block", None), ("suffix", "conv", "raw", None)),
        (("suffix", "conv", "block", None), ("suffix", "conv", "block", HEAD)),
        (("input-gradients", SPEC, 1), ("input-gradients", SPEC, 2)),
        (("linear-contributions", *ROWS, True), ("linear-contributions", *ROWS, False)),
        (("gradients", SPEC, ("a",)), ("gradients", dataclasses.replace(SPEC, rank=5), ("a",))),
        (("gradients", SPEC, ("a",)), ("gradients", dataclasses.replace(SPEC, classes=3), ("a",))),
    ],
)  # fmt: skip
def test_different_session_keys_never_share_a_recipe(a: tuple, b: tuple) -> None:
    assert encode_session_key(a) is not None and encode_session_key(b) is not None
    assert encode_session_key(a) != encode_session_key(b)
    assert cache_key(encode_session_key(a)) != cache_key(encode_session_key(b))


def test_equal_session_keys_share_one() -> None:
    copy = ScoreHeadSpec("logits", onnx.TensorProto.FLOAT, 4, 1, "softmax")
    key = ("linear-contributions", "conv", "block", "out", 8, True)
    assert encode_session_key(("full", HEAD)) == encode_session_key(("full", ("score-head", copy)))
    assert encode_session_key(key) == encode_session_key(tuple(list(key)))


@dataclasses.dataclass
class _Mutable:
    value: int


@dataclasses.dataclass(frozen=True)
class _Spec(ScoreHeadSpec):
    """A subclass could attach another head under the same fields."""


@pytest.mark.parametrize(
    "key",
    [
        ("a-plugin-kind", "conv"),  # not a kind this package builds
        "full",  # not a tuple
        (),
        ("full", 1),  # not the shape of any key of its kind
        ("full", "conv", "block", None, "more"),
        ("input-gradients", SPEC, True),  # a bool is no count
        ("linear-contributions", "c", "block", "y", 8, 1),  # and an int no flag
        ("observe", ["a", "b"]),  # a list has no stable value as a key part
        ("full", _Mutable(1)),
        ("full", object()),
        ("gradients", _Spec("logits", 1, 4, 1, "softmax"), ("a",)),  # not this package's spec
        # A caller's own head: its ``attach`` is code outside the fingerprint.
        ("suffix", "conv", "block", ("my-head", 1)),
        ("suffix", "conv", "block", ("my-head", "x")),
        ("full", ("score-head", _Spec("logits", 1, 4, 1, "softmax"))),
        ("linear-tail", "conv", "block", ("score-head", "spec")),
        # numpy's integers are not ints to the encoding: refused, never crashing it
        ("input-gradients", SPEC, np.int64(2)),
        ("full", ("score-head", dataclasses.replace(SPEC, channel_axis=np.int64(1)))),
        ("gradients", dataclasses.replace(SPEC, classes=np.int32(2)), ("a",)),
    ],
)
def test_a_key_that_is_not_a_recipe_is_not_looked_up(key) -> None:
    assert encode_session_key(key) is None
    assert RecipeContext(b"model", (1, 1, 8, 8), 0).parts(key) is None


def test_the_recipe_holds_the_model_bytes_the_size_the_seed_and_the_code(monkeypatch) -> None:
    model = onnx.load(str(MODEL.path))
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = changed.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    key = ("suffix", "conv", "block", None)
    digest = model_digest(model)
    base = RecipeContext(digest, (1, 1, 64, 64), 0).parts(key)
    assert base == RecipeContext(model_digest(onnx.load(str(MODEL.path))), (1, 1, 64, 64), 0).parts(
        key
    )
    others = [
        RecipeContext(model_digest(changed), (1, 1, 64, 64), 0).parts(key),
        RecipeContext(digest, (1, 1, 64, 96), 0).parts(key),
        RecipeContext(digest, (1, 1, 64, 64), 1).parts(key),
    ]
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: b"edited")
    others.append(RecipeContext(digest, (1, 1, 64, 64), 0).parts(key))
    assert base is not None and None not in others
    assert len({base, *others}) == 1 + len(others)


def test_source_that_cannot_be_read_turns_recipes_off(monkeypatch) -> None:
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: None)
    assert RecipeContext(b"model", (1, 1, 8, 8), 0).parts(("full", None)) is None


def test_a_numpy_class_axis_explains_through_the_cache(tmp_path: Path) -> None:
    """A class axis given as a numpy integer reaches the score head's spec as a plain int."""
    x = MODEL.input(seed=3)
    previous = use_disk_cache(DiskCache(tmp_path / "cache"))
    try:
        explainer = Explainer(MODEL.path, provider="cpu")
        target = Target(class_index=1, class_axis=np.int64(1))
        got = explainer.explain(x, "kwc", "decoder", target=target).map
    finally:
        use_disk_cache(previous)
    np.testing.assert_array_equal(got, _kwc(MODEL.path, None, x))


def test_a_symlinked_source_folder_turns_recipes_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk does not enter a linked folder: its modules would be missing from the hash."""
    root = tmp_path / "package"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "rules.py").write_text("RULE = 1\n")
    root.mkdir()
    (root / "rewrite.py").write_text("OLD = 1\n")
    monkeypatch.setattr(recipe_cache, "_source_roots", lambda: [root])
    assert recipe_cache._source_stamps() is not None
    (root / "rules").symlink_to(tmp_path / "elsewhere")
    assert recipe_cache._source_stamps() is None


def test_sources_changed_since_the_process_started_turn_recipes_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules imported before an edit, checkout or upgrade are not the files on disk: the
    graphs this process rewrites must not be stored under the new files' fingerprint."""
    module = tmp_path / "package" / "rewrite.py"
    module.parent.mkdir()
    module.write_text("OLD = 1\n")
    monkeypatch.setattr(recipe_cache, "_source_roots", lambda: [module.parent])
    monkeypatch.setattr(recipe_cache, "_STAMPS_AT_IMPORT", recipe_cache._source_stamps())
    recipe_cache.code_fingerprint.cache_clear()
    try:
        assert recipe_cache.code_fingerprint() is not None
        assert recipe_cache.sources_unchanged()
        recipe_cache.code_fingerprint.cache_clear()
        module.write_text("NEW = 22\n")
        assert recipe_cache.code_fingerprint() is None
        assert not recipe_cache.sources_unchanged()
    finally:
        recipe_cache.code_fingerprint.cache_clear()


def test_sources_changed_after_the_fingerprint_store_no_pointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the fingerprint is taken, an edit (a checkout, an upgrade under a long-lived
    process) makes the modules imported from then on new code: the graphs they build are
    stored by content, as always, but no pointer claims they are the old code's."""
    x = MODEL.input(seed=3)
    assert recipe_cache.code_fingerprint() is not None
    stamps = dict(recipe_cache._STAMPS_AT_IMPORT)
    edited = sorted(stamps)[0]
    label, modified, size = stamps[edited]
    stamps[edited] = (label, modified - 1, size)  # the file on disk is now "newer"
    monkeypatch.setattr(recipe_cache, "_STAMPS_AT_IMPORT", stamps)
    cache = tmp_path / "cache"
    got = _kwc(MODEL.path, DiskCache(cache), x)
    assert list((cache / "entries").glob("*/*.bin"))  # the graphs are in
    assert not _pointer_keys(cache)
    np.testing.assert_array_equal(got, _kwc(MODEL.path, None, x))


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


def _explain(
    model, cache: DiskCache | None, x: np.ndarray, method: str = "kwc", **options
) -> np.ndarray:
    previous = use_disk_cache(cache)
    variant = options.pop("variant", "p2")
    target = Target(class_index=options.pop("class_index", 1))  # None: the model's own choice
    try:
        explainer = Explainer(model, provider="cpu", **options)
        return explainer.explain(x, method, "decoder", target=target, variant=variant).map
    finally:
        use_disk_cache(previous)


def _kwc(model, cache: DiskCache | None, x: np.ndarray, **options) -> np.ndarray:
    return _explain(model, cache, x, "kwc", **options)


@pytest.mark.parametrize("method", ["kwc", "gradcam", "scorecam"])
def test_a_second_explanation_builds_no_graph_and_draws_the_same_map(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = MODEL.input(seed=3)
    uncached = _explain(MODEL.path, None, x, method)
    builds = _Builds(monkeypatch)
    cold = _explain(MODEL.path, DiskCache(tmp_path / "cache"), x, method)
    built_cold = builds.count
    warm_cache = DiskCache(tmp_path / "cache")
    warm = _explain(MODEL.path, warm_cache, x, method)
    assert built_cold > 0
    if method != "gradcam":  # its backward graph is built before the session is asked for
        assert builds.count == built_cold  # every graph of the second one came from its recipe
    assert warm_cache.stats.stored == 0 and warm_cache.stats.misses == 0
    assert warm_cache.stats.hits == 2 * built_cold  # a pointer and its graph per session
    np.testing.assert_array_equal(cold, uncached)
    np.testing.assert_array_equal(warm, uncached)


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if n != "unet2d_dynamo"])
def test_every_exported_fixture_comes_back_from_its_recipes_unchanged(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3D, channels-last, fp16, QDQ, a fixed batch: every graph of the second explanation is
    found by its recipe and the map is the uncached one, bit for bit. (The dynamo export keeps
    its weights in a .data file: nothing of it is cached, tested below.)"""
    model = fixture(name)
    x = model.input(seed=5)
    uncached = _kwc(model.path, None, x, class_index=None)
    _kwc(model.path, DiskCache(tmp_path / "cache"), x, class_index=None)
    builds = _Builds(monkeypatch)
    warm_cache = DiskCache(tmp_path / "cache")
    warm = _kwc(model.path, warm_cache, x, class_index=None)
    assert builds.count == 0
    assert warm_cache.stats.hits > 0 and warm_cache.stats.misses == 0
    np.testing.assert_array_equal(warm, uncached)


def _cold_builds(x: np.ndarray, monkeypatch: pytest.MonkeyPatch, model=MODEL.path, **options):
    """How many graphs an explanation builds with nothing cached."""
    with monkeypatch.context() as patch:
        builds = _Builds(patch)
        _kwc(model, None, x, **options)
    return builds.count


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({}, {"shape": (1, 1, 96, 96)}),
        ({"variant": "p1", "seed": 0}, {"variant": "p1", "seed": 1}),  # Glorot weights differ
        ({}, {"optimization": "basic"}),
    ],
)
def test_another_size_seed_or_optimisation_is_built_not_served_the_first_one_s_graphs(
    first: dict, second: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = {}
    for options in (first, second):
        shape = options.pop("shape", MODEL.test_shape)
        x[id(options)] = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    cache = tmp_path / "cache"
    _kwc(MODEL.path, DiskCache(cache), x[id(first)], **first)
    expected = _kwc(MODEL.path, None, x[id(second)], **second)
    cold = _cold_builds(x[id(second)], monkeypatch, **second)
    builds = _Builds(monkeypatch)
    again = _kwc(MODEL.path, DiskCache(cache), x[id(second)], **second)
    assert builds.count == cold  # nothing of the first explanation's was served
    np.testing.assert_array_equal(again, expected)
    assert not np.array_equal(expected, _kwc(MODEL.path, None, x[id(first)], **first))


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
    cold = _cold_builds(x, monkeypatch, model=path)
    builds = _Builds(monkeypatch)
    again = _kwc(path, DiskCache(cache), x)
    assert builds.count == cold
    np.testing.assert_array_equal(again, _kwc(path, None, x))


def test_edited_code_is_rebuilt_not_served_the_old_code_s_graphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = MODEL.input(seed=3)
    cache = tmp_path / "cache"
    reference = _kwc(MODEL.path, DiskCache(cache), x)
    cold = _cold_builds(x, monkeypatch)
    monkeypatch.setattr(recipe_cache, "code_fingerprint", lambda: b"another checkout")
    builds = _Builds(monkeypatch)
    again = _kwc(MODEL.path, DiskCache(cache), x)
    assert builds.count == cold
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
    cache.store(key, cache_key("an entry never stored").encode())  # a key naming nothing
    assert session_from_recipe(cache, key, options, providers) is None
    cache.store(key, b"../../etc/passwd".ljust(64, b"0"))  # verified, but not a key
    assert session_from_recipe(cache, key, options, providers) is None
    target = cache_key("not a graph")
    cache.store(target, b"\x00not an onnx model")
    cache.store(key, target.encode())
    assert session_from_recipe(cache, key, options, providers) is None
    assert options.graph_optimization_level == level  # the caller's options as they were


def test_a_model_with_external_data_builds_its_graphs_and_stores_none(tmp_path: Path) -> None:
    """Its optimised graphs would point at the weight files by path (docs/cache.md)."""
    external = fixture("unet2d_dynamo")  # weights in a .data file beside it
    x = external.input(seed=3)
    cache = DiskCache(tmp_path / "cache")
    _kwc(external.path, cache, x, class_index=0)
    _kwc(external.path, cache, x, class_index=0)
    assert cache.stats.hits == cache.stats.misses == cache.stats.stored == 0

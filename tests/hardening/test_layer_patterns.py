"""User layer patterns (``--layers re:REGEX``) are matched in bounded time, never by backtracking.

Python's ``re`` backtracks exponentially on patterns such as ``(a+)+$`` and has no timeout, so a
pattern typed on the command line could hang ``segattr explain`` for ever. ``SafePattern``
matches by simulating the pattern's automaton: what it accepts, it matches exactly as
``re.search`` would (checked by a property test), in time linear in the name.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segattr_onnx.errors import LayerSelectionError
from segattr_onnx.graph.catalogue import analyse_model
from segattr_onnx.methods.layer_patterns import (
    PATTERN_CHAR_LIMIT,
    PATTERN_STATE_LIMIT,
    SafePattern,
)
from segattr_onnx.methods.layers import select_layers
from tests.builders import build
from tests.conftest import fixture

# Each is exponential (or of high polynomial degree) for a backtracking engine on the names
# below: ``re`` takes seconds per name at 26 characters and doubles with each one more.
CATASTROPHIC = [
    r"(a+)+$",
    r"(a|aa)+$",
    r"(a*)*b",
    r"(.*a){30}",
    r"(\w+\s?)+!",
    r"(a|a)+$",
    r".*.*.*.*.*.*.*.*.*.*!",
    r"^(([a-z])+.)+[A-Z]([a-z])+$",
]
# A backtracking engine needs seconds for one of these names (4 of them, each searched twice).
SLOW_NAME = "a" * 26


@pytest.fixture(scope="module")
def analysis():
    spec = fixture("unet2d_torchscript")
    return analyse_model(str(spec.path), spec.test_shape)


@pytest.fixture(scope="module")
def long_named():
    """The tiny builder network with layer names a backtracking engine chokes on."""
    model = build()
    for position, node in enumerate(n for n in model.graph.node if n.op_type == "Conv"):
        node.name = f"{SLOW_NAME}{position}"
    return analyse_model(model, (1, 1, 8, 8))


def _names(layers) -> list[str]:
    return [layer.name for layer in layers]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_patterns_finish_within_a_second(long_named, pattern: str) -> None:
    started = time.perf_counter()
    try:
        chosen = _names(select_layers(long_named, f"re:{pattern}"))
    except LayerSelectionError as exc:
        chosen = None
        assert "matches no kernel layer" in str(exc)
    assert time.perf_counter() - started < 1.0
    # The answer is still re's (asked about a short name, where it is quick): none of these
    # occurs in 'aa…a0', so each selects nothing.
    assert re.search(pattern, "aaaa0") is None
    assert chosen is None


def test_a_catastrophic_pattern_still_selects_what_it_matches(long_named) -> None:
    started = time.perf_counter()
    chosen = select_layers(long_named, r"re:^(a+)+[02]$")
    assert time.perf_counter() - started < 1.0
    assert _names(chosen) == [f"{SLOW_NAME}0", f"{SLOW_NAME}2"]


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(.*a){30}", r"(x+x+)+y", r".*.*.*.*.*.*x"])
def test_matching_time_is_linear_in_very_long_names(pattern: str) -> None:
    matcher = SafePattern(pattern)
    name = "a" * 20_000 + "!"
    started = time.perf_counter()
    found = matcher.search(name)
    assert time.perf_counter() - started < 1.0
    assert found == (pattern == r"(.*a){30}")


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        (r"(a)\1", "backreference"),
        (r"(?P<x>a)(?P=x)", "backreference"),
        (r"(?=Conv)", "look-ahead"),
        (r"(?<=up)Conv", "look-behind"),
        (r"(?!up)Conv", "negative look-ahead"),
        (r"(a)?(?(1)b|c)", "conditional group"),
        (r"(?>a+)b", "atomic group"),
        (r"a++b", "possessive repeat"),
    ],
)
def test_constructs_that_need_backtracking_are_refused_by_name(
    analysis, pattern: str, construct: str
) -> None:
    with pytest.raises(LayerSelectionError, match=construct) as caught:
        select_layers(analysis, f"re:{pattern}")
    assert repr(pattern) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_oversized_patterns_are_refused_before_matching(analysis) -> None:
    with pytest.raises(LayerSelectionError, match=f"longer than {PATTERN_CHAR_LIMIT}"):
        select_layers(analysis, "re:" + "a" * (PATTERN_CHAR_LIMIT + 1))
    started = time.perf_counter()
    for pattern in [r"(a{100}){100}", r"((a{1000}){1000}){1000}", r"[ab]{1,9999}"]:
        with pytest.raises(LayerSelectionError, match=f"more than {PATTERN_STATE_LIMIT}"):
            select_layers(analysis, f"re:{pattern}")
    assert time.perf_counter() - started < 1.0


def test_invalid_patterns_say_so(analysis) -> None:
    with pytest.raises(LayerSelectionError, match="not a valid regex"):
        select_layers(analysis, "re:(up")


UP1 = ["up1.up", "up1.blocks.0.conv", "up1.blocks.1.conv"]
UP2 = ["up2.up", "up2.blocks.0.conv", "up2.blocks.1.conv"]
BLOCKS = ["up1.blocks.0.conv", "up1.blocks.1.conv", "up2.blocks.0.conv", "up2.blocks.1.conv"]
ORDINARY = {
    "up": UP1 + UP2,
    r"^/up[12]/blocks/blocks\.[01]/.*Conv$": BLOCKS,
    "enc2|bottleneck": ["enc2.0.conv", "enc2.1.conv", "bottleneck.0.conv", "bottleneck.1.conv"],
    "(?i)CONVTRANSPOSE": ["up1.up", "up2.up"],
    r"\w\.0/conv": ["enc1.0.conv", "enc2.0.conv", "bottleneck.0.conv", *BLOCKS[::2]],
    r"^/head/Conv$": ["head"],
    r"\bup\b.*Transpose": ["up1.up", "up2.up"],
    r"[^/]+/[^/]+/ConvTranspose": ["up1.up", "up2.up"],
    r"enc\d{1,2}\.\d": ["enc1.0.conv", "enc1.1.conv", "enc2.0.conv", "enc2.1.conv"],
    r".*Conv$": None,  # every Conv, none of the transposes
}


@pytest.mark.parametrize(("pattern", "modules"), ORDINARY.items())
def test_ordinary_patterns_select_what_re_selects(analysis, pattern: str, modules) -> None:
    chosen = select_layers(analysis, f"re:{pattern}")
    expected = [
        layer.name
        for layer in analysis.layers
        if re.search(pattern, layer.name) or re.search(pattern, layer.node_name)
    ]
    assert _names(chosen) == expected
    if modules is None:
        assert [layer.op for layer in chosen] == ["Conv"] * 11
    else:
        layers = fixture("unet2d_torchscript").spec["kernel_layers"]
        by_node = {entry["onnx_node"]: entry["module"] for entry in layers}
        assert [by_node[layer.node_name] for layer in chosen] == modules


# ------------------------------------------------------------------ SafePattern is re.search
_ALPHABET = "aAb/._0 \n"
_atoms = st.sampled_from(
    ["a", "b", "A", "/", r"\.", "0", ".", "[ab]", "[^a]", r"[a-z]", r"\d", r"\w", r"\W", r"\s",
     r"\S", "[/.]", "^", "$", r"\b", r"\B", r"\A", r"\Z", "", r"[^\W\d]", "(?i:a)", "(?s:.)"]
)  # fmt: skip
_suffixes = st.sampled_from(["", "*", "+", "?", "*?", "+?", "{2}", "{0,2}", "{1,3}?", "{2,}"])


def _patterns():
    def extend(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map(lambda pair: f"(?:{pair[0]}|{pair[1]})"),
            st.tuples(inner, _suffixes).map(lambda pair: f"({pair[0]}){pair[1]}"),
        )

    pattern = st.recursive(st.tuples(_atoms, _suffixes).map(_repeat_atom), extend, max_leaves=8)
    flags = st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?a)", "(?im)"])
    return st.tuples(flags, pattern).map("".join)


def _repeat_atom(pair: tuple[str, str]) -> str:
    atom, suffix = pair
    if atom in ("", "^", "$", r"\b", r"\B", r"\A", r"\Z"):
        return atom  # re refuses a repeated anchor as "nothing to repeat"
    return atom + suffix


@settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(pattern=_patterns(), texts=st.lists(st.text(_ALPHABET, max_size=10), max_size=6))
def test_safe_pattern_finds_what_re_search_finds(pattern: str, texts: list[str]) -> None:
    matcher = SafePattern(pattern)
    compiled = re.compile(pattern)
    # Edges anchors care about: empty, a final newline, a newline first, word edges.
    edges = ["", "\n", "a", "a\n", "\na", "a\nb", "/a_0.", "A b"]
    for text in [*edges, *texts, *(t + "\n" for t in texts), *("\n" + t for t in texts)]:
        assert matcher.search(text) == (compiled.search(text) is not None), (pattern, text)

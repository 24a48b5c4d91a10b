"""Memory budgets as users write them: sizes with units, plain bytes, fractions of free memory."""

from __future__ import annotations

import pytest

from segattr_onnx.errors import SegattrError
from segattr_onnx.runtime import budget
from segattr_onnx.runtime.budget import MemoryBudget, MemoryBudgetError, parse_memory_budget
from segattr_onnx.text import command_line_messages


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4G", 4 << 30),
        ("512M", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("2gib", 2 << 30),
        ("64 k", 64 << 10),
        ("4GB", 4 * 10**9),  # SI spelling: powers of 1000
        ("500MB", 500 * 10**6),
        ("1T", 1 << 40),
        ("2000000000", 2_000_000_000),
        ("1", 1),  # a plain integer is bytes, not all of free memory
        ("100B", 100),
        (4_000_000, 4_000_000),  # a TOML integer
    ],
)
def test_sizes_are_bytes(text, size: int) -> None:
    assert parse_memory_budget(text) == MemoryBudget(size=size)
    assert parse_memory_budget(text).resolve() == size


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("0.3", 0.3), ("30%", 0.3), (" 12.5 % ", 0.125), ("1.0", 1.0), ("100%", 1.0), (0.5, 0.5)],
)
def test_fractions_are_read_against_free_memory_when_resolved(
    text, fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = parse_memory_budget(text)
    assert parsed.fraction == pytest.approx(fraction) and parsed.size is None
    monkeypatch.setattr(budget, "available_memory_bytes", lambda: 8_000)
    assert parsed.resolve() == round(8_000 * fraction)
    monkeypatch.setattr(budget, "available_memory_bytes", lambda: 2_000)
    assert parsed.resolve() == round(2_000 * fraction)  # read at resolve time, not at parse time


def test_a_tiny_fraction_of_little_memory_is_still_one_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(budget, "available_memory_bytes", lambda: 10)
    assert parse_memory_budget("1%").resolve() == 1


@pytest.mark.parametrize(
    "text",
    ["", "lots", "4X", "G", "4 G B", "-1G", "0", "0G", "0.0", "0%", "150%", "1.5", "2.0", True],
)
def test_bad_budgets_are_user_errors_that_name_the_value(text) -> None:
    with pytest.raises(MemoryBudgetError) as caught:
        parse_memory_budget(text)
    assert isinstance(caught.value, SegattrError)  # the CLI turns it into exit code 2
    message = str(caught.value)
    assert repr(text) in message and "\n" not in message
    assert message.startswith("memory_budget ")  # a Python caller's argument
    with command_line_messages(), pytest.raises(MemoryBudgetError) as on_command_line:
        parse_memory_budget(text)
    assert str(on_command_line.value).startswith("--memory-budget ")


def test_the_error_names_the_setting_it_came_from() -> None:
    with pytest.raises(MemoryBudgetError, match=r"^'memory_budget' in the audit config"):
        parse_memory_budget("lots", what="'memory_budget' in the audit config")


def test_budgets_describe_themselves() -> None:
    assert str(parse_memory_budget("1K")) == "1024 bytes"
    assert str(parse_memory_budget("30%")) == "30% of free memory"

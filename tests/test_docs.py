"""The pages in docs/ stay true to the code: their examples load, their key tables match the
keys the loaders take, their quoted messages are the ones printed, and their links resolve."""

from __future__ import annotations

import re
import shutil
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segattr_onnx import cli
from segattr_onnx.audit import (
    CASE_KEYS,
    COMPARE_KEYS,
    CONFIG_KEYS,
    KNOWN_SCORES,
    TARGET_KEYS,
    AuditConfig,
    AuditConfigError,
    Check,
)
from segattr_onnx.bundled import example_model_path
from segattr_onnx.card import CARD_SECTIONS, INTENSITY_PRESETS, ModelCard, ModelCardError
from segattr_onnx.compare import COMPARE_FIGURES
from segattr_onnx.synthetic import make_case

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MODEL_CARDS = DOCS / "model-cards.md"
AUDIT_CONFIGS = DOCS / "audit-configs.md"
EXIT_CODES = DOCS / "exit-codes.md"
ALGORITHMS = DOCS / "algorithms.md"

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*([\w.:-]+)\s*(.*?)\s*-->$")


# --- reading markdown -------------------------------------------------------------------------


def _blocks(path: Path) -> list[dict]:
    """Every fenced block: its language, text, the marker comment right above it (if any) and
    the text of the next block after it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[dict] = []
    previous = ""
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            if lines[index].strip():
                previous = lines[index].strip()
            index += 1
            continue
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        marker = MARKER.match(previous)
        blocks.append(
            {
                "language": opening.group(1),
                "text": "\n".join(lines[index + 1 : end]) + "\n",
                "marker": marker.group(1) if marker else None,
                "line": index + 1,
            }
        )
        previous = ""
        index = end + 1
    for block, following in zip(blocks, [*blocks[1:], None], strict=True):
        block["next"] = following["text"] if following else None
    return blocks


def _toml_blocks(path: Path) -> list[dict]:
    return [b for b in _blocks(path) if b["language"] == "toml"]


def _key_table(path: Path, name: str) -> list[str]:
    """The first column of the table right after ``<!-- keys: NAME -->``, without backticks
    and quotes."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.strip() == f"<!-- keys: {name} -->"), None
    )
    assert start is not None, f"{path.name} has no <!-- keys: {name} --> table"
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append(line)
    assert len(rows) > 2, f"the {name} table of {path.name} has no rows"
    return [row.split("|")[1].strip().strip("`").strip('"') for row in rows[2:]]


def _without_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code removed (links there are examples)."""
    text = re.sub(r"^```.*?^```\s*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    return LINK.findall(_without_code(path.read_text(encoding="utf-8")))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```\s*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


DOC_PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN_FILES = [README, *DOC_PAGES]


# --- links and references ---------------------------------------------------------------------


@pytest.mark.parametrize("page", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        resolved = (page.parent / target).resolve() if target else page
        if not resolved.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{link} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_every_doc_page_is_indexed_in_docs_readme_and_the_readme() -> None:
    pages = {p.name for p in DOC_PAGES} - {"README.md"}
    index = {Path(link.partition("#")[0]).name for link in _links(DOCS / "README.md")}
    assert pages <= index, f"docs/README.md does not link {sorted(pages - index)}"
    readme = README.read_text(encoding="utf-8")
    assert "\n## Documentation\n" in readme, "README.md has no Documentation section"
    section = readme.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    linked = {Path(link).name for link in LINK.findall(section) if link.startswith("docs/")}
    assert pages <= linked, f"README's Documentation section does not link {pages - linked}"


STALE = ("ALGORITHMS.md", "../shared")


def _shipped_text_files() -> list[Path]:
    files = [README, *sorted(DOCS.rglob("*"))]
    files += sorted(p for p in (ROOT / "segattr_onnx").rglob("*") if "__pycache__" not in p.parts)
    return [p for p in files if p.is_file()]


def test_no_doc_or_source_file_mentions_a_file_users_do_not_have() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {stale}"
        for path in _shipped_text_files()
        for stale in STALE
        if stale.encode() in path.read_bytes()
    ]
    assert not found, found


# --- key tables against the code's sets of known keys -----------------------------------------


@pytest.mark.parametrize(
    ("page", "table", "known"),
    [
        (MODEL_CARDS, "card.sections", set(CARD_SECTIONS)),
        (MODEL_CARDS, "card.input", set(CARD_SECTIONS["input"])),
        (MODEL_CARDS, "card.target", set(CARD_SECTIONS["target"])),
        (MODEL_CARDS, "card.inference", set(CARD_SECTIONS["inference"])),
        (MODEL_CARDS, "card.intensity", set(INTENSITY_PRESETS)),
        (AUDIT_CONFIGS, "audit.top", set(CONFIG_KEYS)),
        (AUDIT_CONFIGS, "audit.case", set(CASE_KEYS)),
        (AUDIT_CONFIGS, "audit.target", set(TARGET_KEYS)),
        (ALGORITHMS, "scores", set(KNOWN_SCORES)),
        (AUDIT_CONFIGS, "audit.compare", set(COMPARE_KEYS)),
        (DOCS / "compare.md", "compare.figures", set(COMPARE_FIGURES)),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_key_tables_list_exactly_the_keys_the_code_takes(
    page: Path, table: str, known: set[str]
) -> None:
    documented = _key_table(page, table)
    assert len(documented) == len(set(documented)), f"{table} lists a key twice"
    assert set(documented) - known == set(), f"{table} documents keys the code does not take"
    assert known - set(documented) == set(), f"{table} misses keys the code takes"


def test_the_exit_code_table_lists_the_codes_the_cli_uses() -> None:
    codes = {int(code) for code in _key_table(EXIT_CODES, "exit-codes")}
    assert codes == {0, 1, cli.EXIT_BAD_INPUT, cli.EXIT_INTERRUPTED}
    assert (cli.EXIT_BAD_INPUT, cli.EXIT_INTERRUPTED) == (2, 130)


# --- model cards --------------------------------------------------------------------------------


def _refused_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = [(b["text"], b["next"]) for b in _toml_blocks(path) if b["marker"] == "docs:refused"]
    assert pairs, f"{path.name} shows no refused example"
    return pairs


def test_every_model_card_example_is_accepted(tmp_path: Path) -> None:
    examples = [b for b in _toml_blocks(MODEL_CARDS) if b["marker"] != "docs:refused"]
    assert len(examples) >= 2
    for block in examples:
        card = tmp_path / "model.card.toml"
        card.write_text(block["text"], encoding="utf-8")
        loaded = ModelCard.load(card)  # raises ModelCardError on a wrong example
        data = tomllib.loads(block["text"])
        assert set(loaded.target) == set(data.get("target", {}))


def test_the_complete_model_card_example_uses_every_section() -> None:
    complete = _toml_blocks(MODEL_CARDS)[0]
    assert set(tomllib.loads(complete["text"])) == set(CARD_SECTIONS)


def test_refused_model_card_examples_print_the_documented_error(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(example_model_path(), model)
    image = tmp_path / "scan.npy"
    np.save(image, make_case(90_000, dim=2, size=64).image)
    for text, expected in _refused_pairs(MODEL_CARDS):
        (tmp_path / "model.card.toml").write_text(text, encoding="utf-8")
        with pytest.raises(ModelCardError):
            ModelCard.load(tmp_path / "model.card.toml")
        result = CliRunner().invoke(
            cli.main,
            ["explain", str(model), str(image), "--out", str(tmp_path / "map.npy"), "--quiet"],
        )
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [expected.strip()]
        assert not (tmp_path / "map.npy").exists()


@pytest.mark.filterwarnings("ignore:CUDA is not usable")
def test_the_python_example_of_model_cards_runs_as_described(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (code,) = [b["text"] for b in _blocks(MODEL_CARDS) if b["language"] == "python"]
    shutil.copy(example_model_path(), tmp_path / "model.onnx")
    (tmp_path / "model.card.toml").write_text("[input]\nresize = [128, 128]\n")
    np.save(tmp_path / "scan.npy", make_case(90_000, dim=2, size=96).image)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(MODEL_CARDS), "exec"), namespace)
    assert namespace["result"].map.shape == (128, 128)  # the prepared input's size
    assert namespace["card"].spatial_shape(namespace["image"]) == (96, 96)  # as read


# --- audit configs ------------------------------------------------------------------------------


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _materialise(data: dict, base: Path) -> None:
    """Create every file a config names (a glob's one match is ``case1``), so that loading it
    tests the config, not the folder."""
    _touch(base / data["model"], "not read when the config is loaded")
    if "card" in data:
        _touch(base / data["card"], '[input]\nintensity = "zscore"\n')
    if "compare" in data:
        _touch(base / data["compare"]["baseline"], "not read when the config is loaded")
    for entry in data["cases"]:
        entry = {"input": entry} if isinstance(entry, str) else entry
        case = base / entry["input"].replace("*", "case1")
        _touch(case)
        for key in ("labels", "roi"):
            if entry.get(key) and entry[key] != "same":
                _touch(base / entry[key].replace("{stem}", case.stem))


BASE_CONFIG = {
    "model": "model.onnx",
    "cases": ["cases/base.npz"],
    "checks": ["image_preserved <= 1"],
}


def test_every_audit_config_example_is_accepted(tmp_path: Path) -> None:
    blocks = [b for b in _toml_blocks(AUDIT_CONFIGS) if b["marker"] != "docs:refused"]
    assert len(blocks) >= 4
    for number, block in enumerate(blocks):
        folder = tmp_path / f"example{number}"
        data = tomllib.loads(block["text"])
        if block["marker"] == "docs:fragment":
            data = {**BASE_CONFIG, **data}
        _materialise(data, folder)
        try:
            config = AuditConfig.from_dict(data, folder)
        except AuditConfigError as exc:
            pytest.fail(f"the example at line {block['line']} of {AUDIT_CONFIGS.name}: {exc}")
        assert config.checks and config.cases


def test_the_complete_audit_example_uses_every_key(tmp_path: Path) -> None:
    complete = _toml_blocks(AUDIT_CONFIGS)[-1]
    data = tomllib.loads(complete["text"])
    assert set(data) == set(CONFIG_KEYS)
    assert set(data["target"]) == set(TARGET_KEYS)
    assert set().union(*(set(case) for case in data["cases"])) == set(CASE_KEYS)
    _materialise(data, tmp_path)
    config = AuditConfig.from_dict(data, tmp_path)
    assert config.card is not None and config.memory_budget is not None


def test_the_audit_page_shows_the_readme_example_verbatim() -> None:
    (docs,) = [b for b in _toml_blocks(AUDIT_CONFIGS) if b["marker"] == "docs:readme-audit-config"]
    (readme,) = [b for b in _toml_blocks(README) if b["marker"] == "readme:audit-config"]
    assert docs["text"] == readme["text"]


def test_refused_audit_examples_print_the_documented_error(tmp_path: Path) -> None:
    for number, (text, expected) in enumerate(_refused_pairs(AUDIT_CONFIGS)):
        config = tmp_path / f"refused{number}.toml"
        config.write_text(text, encoding="utf-8")
        result = CliRunner().invoke(cli.main, ["audit", str(config), "--quiet"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [expected.strip()]


def test_the_documented_failure_message_is_the_one_checks_give() -> None:
    text = AUDIT_CONFIGS.read_text(encoding="utf-8")
    quoted = re.search(r"`(image_preserved must be [^`]*)`", text)
    assert quoted is not None
    failed = Check.parse("image_preserved <= 0.3").failure_message(0.3054)
    assert failed == quoted.group(1)


# --- exit codes -------------------------------------------------------------------------------


def _quoted_errors(path: Path) -> list[str]:
    return [
        b["text"].strip()
        for b in _blocks(path)
        if b["language"] == "text" and b["text"].startswith("error:")
    ]


def test_the_quoted_usage_error_is_one_line_and_exit_2() -> None:
    expected = next(e for e in _quoted_errors(EXIT_CODES) if "Missing argument" in e)
    result = CliRunner().invoke(cli.main, ["explain"], prog_name="segattr")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [expected]


def test_an_interrupted_command_exits_130_with_the_quoted_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segattr_onnx.synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segattr_onnx.synthetic, "make_case", interrupted)
    expected = next(e for e in _quoted_errors(EXIT_CODES) if "interrupted" in e)
    out = tmp_path / "case.npz"
    result = CliRunner().invoke(cli.main, ["synth", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == [expected]
    assert not out.exists() and not list(tmp_path.iterdir())

"""``segattr compare`` and the audit's ``[compare]``: exit codes 0/1/2, the figures in JSON,
and each failed check named in the JUnit XML."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from segattr_onnx import Explainer
from segattr_onnx.audit import audit
from segattr_onnx.cli import main
from tests.conftest import fixture
from tests.model_variants import randomised_decoder

SPEC = fixture("unet2d_torchscript")
EXACT = [
    "spearman >= 1",
    "top10_iou >= 1",
    "max_abs_diff <= 0",
    "dice >= 1",
    "prediction_preserved_delta >= 0, prediction_preserved_delta <= 0",
    "image_preserved_delta >= 0, image_preserved_delta <= 0",
]


def _compare(*args: str):
    return CliRunner().invoke(main, ["compare", *args, "--provider", "cpu", "--quiet"])


@pytest.fixture(scope="module")
def random_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("models") / "random_decoder.onnx"
    randomised_decoder(SPEC.path, target, SPEC.test_shape, seed=7)
    return target


@pytest.fixture
def cases(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "cases"
    folder.mkdir()
    paths = []
    for seed in (0, 1):
        paths.append(folder / f"case{seed}.npy")
        np.save(paths[-1], SPEC.input(seed)[0])
    return paths


def _suite(path: Path) -> ET.Element:
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    return suite


def _failed(suite: ET.Element) -> list[ET.Element]:
    return [case for case in suite.findall("testcase") if case.find("failure") is not None]


def test_a_model_against_itself_agrees_exactly_and_exits_0(
    cases: list[Path], tmp_path: Path
) -> None:
    junit = tmp_path / "compare.xml"
    checks = [option for check in EXACT for option in ("--checks", check)]
    result = _compare(
        str(SPEC.path), str(SPEC.path), *map(str, cases), "--method", "gradcam", *checks,
        "--junit", str(junit), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["method"] == "gradcam"
    assert [case["case"] for case in data["cases"]] == ["case0", "case1"]
    for case in data["cases"]:
        assert (case["spearman"], case["top10_iou"]) == (1.0, 1.0)
        assert (case["max_abs_diff"], case["dice"]) == (0.0, 1.0)
        assert case["scores_a"]["prediction_preserved"] == case["scores_b"]["prediction_preserved"]
        assert case["prediction_preserved_delta"] == case["image_preserved_delta"] == 0.0
    suite = _suite(junit)
    assert suite.get("name") == "segattr-compare"
    assert suite.get("tests") == str(2 * 8) and suite.get("failures") == "0"  # 2 cases × 8


def test_a_randomised_decoder_fails_the_gate_with_exit_1_named_in_the_junit_xml(
    cases: list[Path], tmp_path: Path, random_decoder: Path
) -> None:
    junit = tmp_path / "compare.xml"
    args = [str(SPEC.path), str(random_decoder), *map(str, cases), "--method", "kwc"]
    checks = ["--checks", "spearman >= 0.9", "--checks", "top10_iou >= 0"]
    result = _compare(*args, *checks, "--junit", str(junit), "--json", "--no-scores")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is False
    suite = _suite(junit)
    failed = _failed(suite)
    assert suite.get("failures") == "2" and len(failed) == 2  # spearman, in each case
    assert {case.get("name") for case in failed} == {"spearman >= 0.9"}
    assert {case.get("classname") for case in failed} == {"case0.kwc", "case1.kwc"}
    # The value each failure reports is the rank correlation of the two models' own maps.
    for element, path in zip(failed, cases, strict=True):
        x = np.load(path)
        map_a = Explainer(SPEC.path, provider="cpu").explain(x, "kwc").map
        map_b = Explainer(random_decoder, provider="cpu").explain(x, "kwc").map
        rho = stats.spearmanr(map_a.ravel(), map_b.ravel()).statistic
        message = element.find("failure").get("message")
        assert message.startswith("spearman must be at least 0.9 (spearman >= 0.9); got ")
        assert float(message.rsplit(" ", 1)[1]) == pytest.approx(rho, abs=1e-4) and rho < 0.9
    # The table names the failed check, case by case.
    table = _compare(*args, *checks, "--no-scores")
    assert table.exit_code == 1
    assert re.search(r"^FAIL case0: spearman must be at least 0\.9", table.stdout, re.MULTILINE)
    assert "2 of 4 checks passed" in table.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checks", "spearmn >= 0.9"], "names an unknown score"),
        (["--checks", "spearman about 0.9"], "is not 'score >= number'"),
        (["--checks", "image_preserved_delta <= 0.1", "--no-scores"], "--no-scores turns"),
        (["--checks", "deletion_auc_delta >= 0", "--steps", "0"], "--steps 0 turns"),
        (["--method", "kwcc"], "method 'kwcc' is unknown"),
    ],
)
def test_bad_options_exit_2_with_one_line_before_any_work(
    cases: list[Path], extra: list[str], message: str
) -> None:
    result = _compare(str(SPEC.path), str(SPEC.path), str(cases[0]), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_the_junit_file_is_never_an_input_never_overwritten_and_never_followed(
    cases: list[Path], tmp_path: Path
) -> None:
    run = [str(SPEC.path), str(SPEC.path), str(cases[0]), "--no-scores", "--checks", "dice >= 1"]
    existing = tmp_path / "old.xml"
    existing.write_text("precious")
    refused = _compare(*run, "--junit", str(existing))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert existing.read_text() == "precious"
    as_input = tmp_path / "case.xml"  # an input named like a report: refused even with --force
    as_input.write_bytes(cases[0].read_bytes())
    mixed = _compare(*run[:2], str(as_input), *run[3:], "--junit", str(as_input), "--force")
    assert mixed.exit_code == 2 and "one of the inputs" in mixed.stderr
    assert as_input.read_bytes() == cases[0].read_bytes()
    link = tmp_path / "link.xml"
    link.symlink_to(existing)
    forced = _compare(*run, "--junit", str(link), "--force")
    assert forced.exit_code == 0, forced.output
    assert existing.read_text() == "precious"  # the link was replaced, not written through
    assert not link.is_symlink() and _suite(link).get("tests") == "1"


# --- the audit's [compare] ---------------------------------------------------------------------


def _audit_config(tmp_path: Path, baseline: Path, compare_checks: str) -> Path:
    folder = tmp_path / "audit"
    (folder / "cases").mkdir(parents=True)
    for seed in (0, 1):
        np.save(folder / "cases" / f"case{seed}.npy", SPEC.input(seed)[0])
    (folder / "baseline.onnx").write_bytes(baseline.read_bytes())
    config = folder / "audit.toml"
    config.write_text(
        "\n".join(
            [
                f"model = {json.dumps(str(SPEC.path))}",
                'methods = ["gradcam", "kwc"]',
                'provider = "cpu"',
                'output = "results"',
                'checks = ["image_preserved <= 1"]',
                'cases = ["cases/*.npy"]',
                "",
                "[compare]",
                'baseline = "baseline.onnx"',
                compare_checks,
            ]
        )
    )
    return config


def _audit(*args: str):
    return CliRunner().invoke(main, ["audit", *args, "--quiet"])


def test_an_audit_against_a_randomised_baseline_fails_its_compare_checks(
    tmp_path: Path, random_decoder: Path
) -> None:
    checks = 'checks = ["spearman >= 0.9", "dice >= 0", "prediction_preserved_delta >= -1"]'
    config = _audit_config(tmp_path, random_decoder, checks)
    result = _audit(str(config))
    assert result.exit_code == 1, result.output
    results = tmp_path / "audit" / "results"
    suite = _suite(results / "junit.xml")
    assert suite.get("tests") == str(2 * 2 * 4)  # 2 cases × 2 methods × (1 + 3 checks)
    failed = _failed(suite)
    assert {case.get("name") for case in failed} == {"spearman >= 0.9"} and len(failed) == 4
    assert {case.get("classname") for case in failed} == {
        f"case{seed}.{method}" for seed in (0, 1) for method in ("gradcam", "kwc")
    }
    # Each result file holds the figures (checked like scores) and the baseline's own scores.
    record = json.loads((results / "cases" / "case0.kwc.json").read_text())
    assert record["compare"]["baseline"].endswith("baseline.onnx")
    assert record["scores"]["spearman"] == record["compare"]["spearman"] < 0.9
    delta = (
        record["scores"]["prediction_preserved"]
        - record["compare"]["scores_a"]["prediction_preserved"]
    )
    assert record["scores"]["prediction_preserved_delta"] == pytest.approx(delta)


def test_a_resumed_audit_reuses_results_only_while_the_baseline_is_unchanged(
    tmp_path: Path, random_decoder: Path
) -> None:
    config = _audit_config(tmp_path, SPEC.path, 'checks = ["spearman >= 0.999", "dice >= 1"]')
    first = audit(config)
    assert first.passed and first.computed == 4  # the model against itself
    assert audit(config, resume=True).reused == 4
    baseline = tmp_path / "audit" / "baseline.onnx"
    baseline.write_bytes(random_decoder.read_bytes())  # same path, other content
    again = audit(config, resume=True)
    assert again.reused == 0 and not again.passed
    assert [r.check for r in again.failures].count("spearman >= 0.999") == 4


def test_compare_checks_may_be_given_by_method(tmp_path: Path, random_decoder: Path) -> None:
    checks = '[compare.checks]\nkwc = ["spearman >= 0.9"]\nall = ["dice >= 0"]'
    report = audit(_audit_config(tmp_path, random_decoder, checks))
    compared = [(r.method, r.check) for r in report.results if r.check != "image_preserved <= 1"]
    assert sorted(set(compared)) == [
        ("gradcam", "dice >= 0"),
        ("kwc", "dice >= 0"),
        ("kwc", "spearman >= 0.9"),
    ]
    assert {(r.method, r.check) for r in report.failures} == {("kwc", "spearman >= 0.9")}


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (('baseline = "baseline.onnx"', 'baseline = "baselne.onnx"'), "does not exist"),
        (('baseline = "baseline.onnx"', 'baselin = "baseline.onnx"'), "did you mean 'baseline'"),
        (('"dice >= 0"', '"image_preserved >= 0"'), "names an unknown score"),
        (('checks = ["dice >= 0"]', "checks = []"), "[compare] has no checks"),
        (('baseline = "baseline.onnx"', 'baseline = "results/junit.xml"'), "its own input"),
    ],
)
def test_a_bad_compare_section_exits_2_with_one_line(
    tmp_path: Path, replace: tuple[str, str], message: str
) -> None:
    config = _audit_config(tmp_path, SPEC.path, 'checks = ["dice >= 0"]')
    (tmp_path / "audit" / "results").mkdir()
    (tmp_path / "audit" / "results" / "junit.xml").write_bytes(SPEC.path.read_bytes())
    config.write_text(config.read_text().replace(*replace))
    result = _audit(str(config))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_models_whose_outputs_differ_in_size_are_refused_in_one_line(
    cases: list[Path], tmp_path: Path
) -> None:
    """A re-export that pools its output (16² instead of 32²): the maps are both at the
    input's size, the masks are not; Dice cannot compare them."""
    import onnx
    from onnx import helper

    model = onnx.load(str(SPEC.path))
    output = model.graph.output[0]
    model.graph.node.append(
        helper.make_node("MaxPool", [output.name], ["pooled"], kernel_shape=[2, 2], strides=[2, 2])
    )
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None))
    pooled = tmp_path / "pooled.onnx"
    onnx.save(model, str(pooled))
    result = _compare(str(SPEC.path), str(pooled), str(cases[0]), "--method", "gradcam")
    assert result.exit_code == 2, result.output
    assert "mask" in result.output and "same size" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output


def test_an_input_gradient_method_is_described_without_layers(cases: list[Path]) -> None:
    result = _compare(str(SPEC.path), str(SPEC.path), str(cases[0]), "--method",
                      "gradient_input", "--no-scores")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith("gradient_input on the input: model A")
    layered = _compare(str(SPEC.path), str(SPEC.path), str(cases[0]), "--no-scores")
    assert layered.output.startswith("kwc (p2) through 'decoder': model A")

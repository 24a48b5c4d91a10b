"""``segattr audit``: a CI gate — exit codes 0/1/2, JSON and JUnit results, resumable runs."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from segattr_onnx.audit import audit
from segattr_onnx.bundled import example_model_path
from segattr_onnx.cli import main
from segattr_onnx.runtime.providers import cuda_works
from segattr_onnx.synthetic import make_case, save_case


def _config(tmp_path: Path, checks: list[str], methods=("gradcam", "kwc")) -> Path:
    cases = tmp_path / "cases"
    cases.mkdir(exist_ok=True)
    for seed in (90_000, 90_001):
        target = cases / f"case{seed}.npz"
        if not target.exists():
            save_case(make_case(seed, dim=2, size=64), target)
    config = tmp_path / "audit.toml"
    config.write_text(
        "\n".join(
            [
                f'model = "{example_model_path()}"',
                f"methods = {json.dumps(list(methods))}",
                'layers = "last"',
                'provider = "cpu"',
                'output = "results"',
                "checks = " + json.dumps(checks),
                "",
                "[[cases]]",
                'input = "cases/*.npz"',
                'labels = "same"',
            ]
        )
    )
    return config


def _invoke(*args: str):
    return CliRunner().invoke(main, ["audit", *args, "--quiet"])


def test_passing_checks_exit_0_with_json_and_junit(tmp_path: Path) -> None:
    checks = ["prediction_preserved >= 0", "image_preserved <= 1", "target_mass_fraction > 0"]
    result = _invoke(str(_config(tmp_path, checks)))
    assert result.exit_code == 0, result.output
    assert "12 of 12 checks passed" in result.stdout
    suite = ET.parse(tmp_path / "results" / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "12" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 12  # 2 cases × 2 methods × 3 checks
    data = json.loads((tmp_path / "results" / "audit.json").read_text())
    assert data["passed"] is True and len(data["results"]) == 12


def test_a_failing_check_exits_1_and_is_a_junit_failure(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0", "image_preserved <= 0.01"])
    result = _invoke(str(config))
    assert result.exit_code == 1, result.output
    suite = ET.parse(tmp_path / "results" / "junit.xml").getroot().find("testsuite")
    failures = [case for case in suite.findall("testcase") if case.find("failure") is not None]
    assert len(failures) == int(suite.get("failures")) == 4
    assert all(case.get("name") == "image_preserved <= 0.01" for case in failures)
    # Each failure says the check, its bound and direction, and the value, in both reports.
    report = json.loads((tmp_path / "results" / "audit.json").read_text())
    failed = [r for r in report["results"] if not r["passed"]]
    assert len(failed) == 4
    for junit_case, record in zip(failures, failed, strict=True):
        message = junit_case.find("failure").get("message")
        value = float(record["value"])
        assert message == record["message"]
        assert message.startswith("image_preserved must be at most 0.01 (image_preserved <= 0.01)")
        assert message.endswith(f"got {value:.4g}") and value > 0.01


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model = "missing.onnx"\ncases = ["x.npz"]\nchecks = []', "does not exist"),
        ("model = ", "not valid TOML"),
        (None, "not 'score >= number'"),
    ],
)
def test_bad_configurations_exit_2_with_one_line(tmp_path: Path, text, message) -> None:
    if text is None:
        config = _config(tmp_path, ["prediction_preserved about 0.8"])
    else:
        config = tmp_path / "bad.toml"
        config.write_text(text)
    result = _invoke(str(config))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_results_already_written_are_reused_only_when_resuming(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    first = audit(config)
    record = tmp_path / "results" / "cases" / "case90000.gradcam.json"
    stamp = record.stat().st_mtime_ns
    again = audit(config, resume=True)
    assert again.reused == 2 and record.stat().st_mtime_ns == stamp
    assert [r.value for r in again.results] == [r.value for r in first.results]
    forced = audit(config, resume=True, force=True)
    assert forced.reused == 0 and record.stat().st_mtime_ns != stamp
    assert audit(config).reused == 0  # without resume, every run is this run's


def test_a_changed_case_is_rerun_when_resuming_and_a_planted_result_is_never_read(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, ["image_preserved <= 0.01"], methods=("gradcam", "kwc"))
    assert not audit(config).passed
    # Another valid case under the same name: exactly its two runs (gradcam, kwc) are redone.
    save_case(make_case(90_005, dim=2, size=64), tmp_path / "cases" / "case90001.npz", force=True)
    assert audit(config, resume=True).reused == 2
    # Results planted with the right fingerprint turn nothing green without --resume.
    for record in (tmp_path / "results" / "cases").glob("*.json"):
        data = json.loads(record.read_text())
        data["scores"]["image_preserved"] = 0.0
        record.write_text(json.dumps(data))
    assert not audit(config).passed  # (and this fresh run stored its own results again)
    result = _invoke(str(config), "--resume")  # the CLI says what it reused
    assert result.exit_code == 1 and "(0 case runs computed, 4 reused)" in result.output


def test_resuming_over_an_unreadable_case_is_an_error_not_a_reuse(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    audit(config)
    case = tmp_path / "cases" / "case90000.npz"
    case.unlink()
    case.mkdir()  # the name still matches the glob but holds no readable file
    result = _invoke(str(config), "--resume")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_the_installed_command_gates_a_pipeline(tmp_path: Path) -> None:
    config = _config(tmp_path, ["image_preserved <= 0.01"], methods=("gradcam",))
    command = [sys.executable, "-m", "segattr_onnx", "audit", str(config), "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1, completed.stderr
    assert "FAIL" in completed.stdout


def test_a_model_card_prepares_audit_cases(tmp_path: Path) -> None:
    """Cases of 100² do not fit the U-Net's pooling; the card beside the model resizes them
    (labels too, by nearest neighbour) and the audit runs."""
    model = tmp_path / "model.onnx"
    shutil.copy(example_model_path(), model)
    (tmp_path / "model.card.toml").write_text("[input]\nresize = [64, 64]\n")
    cases = tmp_path / "cases"
    cases.mkdir()
    case = make_case(90_006, dim=2, size=100)
    np.savez(cases / "big.npz", image=case.image, labels=case.labels)
    config = tmp_path / "audit.toml"
    config.write_text(
        'model = "model.onnx"\nmethods = ["gradcam"]\nprovider = "cpu"\n'
        'checks = ["target_mass_fraction > 0"]\n[[cases]]\ninput = "cases/*.npz"\n'
        'labels = "same"\n'
    )
    report = audit(config)
    assert report.passed and len(report.results) == 1


def test_roi_mass_fraction_checks_a_user_mask(tmp_path: Path) -> None:
    config = _config(tmp_path, ["roi_mass_fraction >= 0.999"], methods=("gradcam",))
    rois = tmp_path / "rois"
    rois.mkdir()
    for seed in (90_000, 90_001):
        np.save(rois / f"case{seed}.npy", np.ones((64, 64), bool))  # the whole image
    config.write_text(config.read_text() + '\nroi = "rois/{stem}.npy"\n')
    report = audit(config)
    assert report.passed and {r.check for r in report.results} == {"roi_mass_fraction >= 0.999"}
    for seed in (90_000, 90_001):
        np.save(rois / f"case{seed}.npy", np.zeros((64, 64), bool))
    assert not audit(config, force=True).passed


def test_stored_results_are_not_reused_after_the_settings_change(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    audit(config)
    assert audit(config, resume=True).reused == 2
    config.write_text(config.read_text().replace('layers = "last"', 'layers = "decoder"'))
    assert audit(config, resume=True).reused == 0  # other layers: other maps
    config.write_text(
        config.read_text().replace('"prediction_preserved >= 0"', '"deletion_auc >= 0"')
    )
    report = audit(config, resume=True)
    assert report.reused == 0 and report.passed  # the new score is computed, not missing


def test_cases_in_image_formats_are_read_through_plugins(tmp_path: Path) -> None:
    from PIL import Image

    case = make_case(90_008, dim=2, size=64)
    grey = ((case.image + 1) * 127.5).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "slice.png")
    config = tmp_path / "audit.toml"
    config.write_text(
        f'model = "{example_model_path()}"\nmethods = ["gradcam"]\nlayers = "last"\n'
        'provider = "cpu"\nchecks = ["image_preserved <= 1"]\ncases = ["slice.png"]\n'
    )
    assert audit(config).passed


def _refused(tmp_path: Path, text: str) -> Result:
    """An audit config beside an empty case file 'afile', run: it must stop with exit 2 and
    one error line, never a traceback."""
    (tmp_path / "afile").write_text("")
    config = tmp_path / "audit.toml"
    config.write_text(f'model = "{example_model_path()}"\n{text}\n')
    result = _invoke(str(config))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('steps = "x"', "'steps'"),
        ('methods = "gradcam"', "'methods'"),
        ('[target]\nclass_index = "x"', "class_index"),
        ('output = "afile"', "is a file"),
    ],
)
def test_config_values_of_the_wrong_kind_exit_2(tmp_path: Path, extra: str, message: str) -> None:
    result = _refused(tmp_path, f'checks = ["image_preserved <= 1"]\ncases = ["afile"]\n{extra}')
    assert message in result.stderr


@pytest.mark.parametrize(
    ("extra", "cases", "message"),
    [
        ('methdos = ["kwc"]', '["afile"]', "unknown key 'methdos' in the audit config; did you "
         "mean 'methods'?"),
        ("[target]\nclass_indx = 1", '["afile"]', "did you mean 'class_index'?"),
        ("", '[{input = "afile", provider = "cpu"}]',
         "'provider' does not belong in case 'afile'; it goes in the top level"),
        ("", '[{input = "afile", label = "afile"}]', "did you mean 'labels'?"),
        ('[target]\nroi = "afile"', '["afile"]', "it goes in a [[cases]] entry"),
        ("", '[{input = "afile", labels = "{stem.__class__}"}]', "only {stem}"),
        ("", '[{input = "afile", roi = "rois/{0}.npy"}]', "only {stem}"),
        ("", '[{input = "afile", labels = "x{"}]', "malformed"),
        ("", '[{input = "afile", labels = "{stem!r}"}]', "only {stem}"),
    ],
)  # fmt: skip
def test_unknown_or_misplaced_config_keys_exit_2_naming_the_fix(
    tmp_path: Path, extra: str, cases: str, message: str
) -> None:
    """A typo must not fall back to a default: the run stops and names the key."""
    result = _refused(tmp_path, f'checks = ["image_preserved <= 1"]\ncases = {cases}\n{extra}')
    assert message in result.stderr
    assert not (tmp_path / "segattr-audit").exists()  # refused before any work


def test_the_package_level_audit_function(tmp_path: Path) -> None:
    import segattr_onnx

    config = _config(tmp_path, ["image_preserved <= 1"], methods=("gradcam",))
    assert segattr_onnx.audit(config).passed


@pytest.mark.parametrize(
    ("text", "value", "words"),
    [
        ("prediction_preserved >= 0.8", 0.75, "must be at least 0.8"),
        ("prediction_preserved > 0.8", 0.8, "must be above 0.8"),
        ("image_preserved <= 0.3", 0.3054, "must be at most 0.3"),
        ("image_preserved < 0.3", 0.3, "must be below 0.3"),
    ],
)
def test_a_failure_message_gives_the_bound_its_direction_and_the_value(
    text: str, value: float, words: str
) -> None:
    from segattr_onnx.audit import Check

    check = Check.parse(text)
    assert not check.passes(value)
    assert check.failure_message(value) == f"{check.score} {words} ({text}); got {value:.4g}"


def _reports(folder: Path) -> tuple[dict, ET.Element]:
    report = json.loads((folder / "audit.json").read_text())
    suite = ET.parse(folder / "junit.xml").getroot().find("testsuite")
    return report, suite


def test_a_run_that_exits_2_leaves_reports_that_say_so_not_the_previous_verdict(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    assert _invoke(str(config)).exit_code == 0
    assert _reports(tmp_path / "results")[0]["passed"] is True
    broken = config.read_text().replace('methods = ["gradcam"]', 'methods = ["gradcam"]\nstpes = 3')
    config.write_text(broken)
    result = _invoke(str(config))
    assert result.exit_code == 2, result.output
    report, suite = _reports(tmp_path / "results")
    assert report["passed"] is False and "stpes" in report["error"]
    assert suite.get("errors") == "1" and "stpes" in suite.find("testcase/error").get("message")


@pytest.mark.parametrize(
    ("spoil", "extra", "said"),
    [
        (lambda text: text + "\n[[cases]\n", [], "TOML"),  # not TOML any more
        (lambda text: text, ["--provider", "tpu"], "tpu"),
        (lambda text: text, ["--memory-budget", "lots"], "lots"),
    ],
)
def test_every_refused_rerun_voids_the_previous_verdict(
    tmp_path: Path, spoil, extra: list[str], said: str
) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    assert _invoke(str(config)).exit_code == 0
    assert _reports(tmp_path / "results")[0]["passed"] is True
    config.write_text(spoil(config.read_text()))
    result = _invoke(str(config), *extra)
    assert result.exit_code == 2, result.output
    report, suite = _reports(tmp_path / "results")
    assert report["passed"] is False and said in report["error"], report
    assert suite.get("errors") == "1"


def test_a_refused_config_voids_the_reports_in_the_output_folder_given(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    elsewhere = tmp_path / "ci-reports"
    assert _invoke(str(config), "--output", str(elsewhere)).exit_code == 0
    config.write_text(config.read_text() + "\nmethdos = []\n")
    result = _invoke(str(config), "--output", str(elsewhere))
    assert result.exit_code == 2, result.output
    report, _ = _reports(elsewhere)
    assert report["passed"] is False and "methdos" in report["error"]


def test_ctrl_c_exits_130_and_leaves_a_failed_report_and_no_temporary_file(
    tmp_path: Path, monkeypatch
) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    assert _invoke(str(config)).exit_code == 0  # a green verdict on disk first

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # (segattr_onnx.audit the attribute is the function; patch the module itself)
    audit_module = importlib.import_module("segattr_onnx.audit")
    monkeypatch.setattr(audit_module, "score_case_run", interrupted)
    result = _invoke(str(config), "--force")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    report, suite = _reports(tmp_path / "results")
    assert report["passed"] is False and "interrupted" in report["error"]
    assert suite.get("errors") == "1"
    leftovers = [p.name for p in (tmp_path / "results").rglob("*") if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.skipif(cuda_works(), reason="CUDA works here: auto warns about nothing")
def test_audit_takes_the_provider_option_of_every_command(tmp_path: Path, monkeypatch) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    config.write_text(config.read_text().replace('provider = "cpu"', 'provider = "auto"'))
    monkeypatch.setattr("segattr_onnx.runtime.providers._fallback_reported", False)
    result = _invoke(str(config), "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert "CUDA is not usable" not in result.output  # cpu asked for: nothing to warn about
    auto = _invoke(str(config), "--force")  # the config's "auto" falls back, and says so once
    assert auto.exit_code == 0 and auto.output.count("CUDA is not usable") == 1
    bad = _invoke(str(config), "--provider", "tpu")
    assert bad.exit_code == 2 and "tpu" in bad.stderr and "Traceback" not in bad.output


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_block(after: str, language: str) -> str:
    text = README.read_text()
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```\n", start)]


def test_the_readme_audit_example_runs_green_as_written(tmp_path: Path) -> None:
    """The README's commands and config, verbatim, on the bundled model: exit 0."""
    bundled = tmp_path / "segattr_onnx" / "data"
    bundled.mkdir(parents=True)
    shutil.copy(example_model_path(), bundled / "unet2d_synthetic.onnx")
    commands = _readme_block("Try it on the bundled model", "bash")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-ec", commands], cwd=tmp_path, env=env, check=True)
    (tmp_path / "audit" / "audit.toml").write_text(
        _readme_block("<!-- readme:audit-config -->", "toml")
    )
    result = _invoke(str(tmp_path / "audit" / "audit.toml"), "--provider", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "segattr-audit" / "audit.json").read_text())
    assert report["passed"] and len(report["results"]) == 3 * (2 + 2 + 1 + 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("checks = []", "no checks"),
        ('methods = []\nchecks = ["image_preserved <= 1"]', "no methods"),
        ('methods = ["kwc"]\n[checks]\ngradcam = ["image_preserved <= 1"]',
         "unknown key 'gradcam' in the audit config's [checks]"),
        ("[checks]\nall = []", "no checks"),
    ],
)  # fmt: skip
def test_a_vacuous_or_mistargeted_gate_is_a_configuration_error(
    tmp_path: Path, settings: str, message: str
) -> None:
    assert message in _refused(tmp_path, f'cases = ["afile"]\n{settings}').stderr


def test_per_method_checks_apply_to_their_method_only(tmp_path: Path) -> None:
    config = _config(tmp_path, [], methods=("gradcam", "kwc"))
    text = config.read_text().replace("checks = []", "")
    config.write_text(
        text + '\n\n[checks]\nkwc = ["prediction_preserved >= 0.5"]\n'
        'gradcam = ["prediction_preserved <= 0.5"]\n'
    )
    report = audit(config)
    assert {(r.method, r.check) for r in report.results} == {
        ("kwc", "prediction_preserved >= 0.5"),
        ("gradcam", "prediction_preserved <= 0.5"),
    }
    values = {r.method: r.value for r in report.results if r.case == "case90000"}
    assert [r.passed for r in report.results] == [
        (r.value >= 0.5) if r.method == "kwc" else (r.value <= 0.5) for r in report.results
    ]
    assert values["kwc"] != values["gradcam"]


def test_a_config_cannot_send_its_outputs_outside_its_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = _config(project, ["prediction_preserved >= 0"], methods=("gradcam",))
    config.write_text(config.read_text().replace('output = "results"', 'output = "../elsewhere"'))
    result = _invoke(str(config))
    assert result.exit_code == 2 and "outside the config's folder" in result.stderr
    assert not (tmp_path / "elsewhere").exists()
    # The command line may choose any folder.
    chosen = _invoke(str(config), "--output", str(tmp_path / "elsewhere"))
    assert chosen.exit_code == 0, chosen.output
    assert (tmp_path / "elsewhere" / "junit.xml").is_file()


def test_an_audit_never_writes_over_its_own_inputs(tmp_path: Path) -> None:
    model = tmp_path / "junit.xml"  # a model file that happens to carry a report's name
    shutil.copy(example_model_path(), model)
    before = model.read_bytes()
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    text = config.read_text().replace(str(example_model_path()), "junit.xml")
    config.write_text(text.replace('output = "results"', 'output = "."'))
    result = _invoke(str(config))
    assert result.exit_code == 2 and "over or into its own input" in result.stderr
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    "planted",
    [
        "[1, 2, 3]",  # not a record
        '{"fingerprint": "%s", "scores": [0.1]}',  # scores not a table
        '{"fingerprint": "%s", "scores": {"prediction_preserved": "high"}}',  # not a number
        '{"fingerprint": "%s", "scores": {"prediction_preserved": true}}',
    ],
)
def test_malformed_stored_results_are_recomputed_when_resuming(
    tmp_path: Path, planted: str
) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    assert audit(config).computed == 2
    record = tmp_path / "results" / "cases" / "case90000.gradcam.json"
    fingerprint = json.loads(record.read_text())["fingerprint"]
    record.write_text(planted % fingerprint if "%s" in planted else planted)
    again = audit(config, resume=True)
    assert (again.computed, again.reused) == (1, 1) and again.passed


def test_an_output_folder_reached_through_a_link_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cases").symlink_to(elsewhere)
    result = _invoke(str(config))
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output
    assert list(elsewhere.iterdir()) == []


def test_a_config_nested_beyond_reason_is_one_error_line(tmp_path: Path) -> None:
    config = _config(tmp_path, ["prediction_preserved >= 0"], methods=("gradcam",))
    assert _invoke(str(config)).exit_code == 0
    config.write_text(config.read_text() + "\nx = " + "[" * 50_000 + "]" * 50_000 + "\n")
    result = _invoke(str(config))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")]
    assert _reports(tmp_path / "results")[0]["passed"] is False

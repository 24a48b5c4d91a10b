"""``segattr audit``: explain and score a set of cases, and gate on thresholds.

A deployment pipeline needs a yes/no: does this model, on these cases, still look at the right
evidence? An audit config (TOML) names the model, the cases, the methods and the checks
(``"prediction_preserved >= 0.8"``); every case × method is explained and scored, every check
becomes one JUnit test case, and the exit code says whether all passed. Results are written
per case × method as they come, so an interrupted audit resumes where it stopped.
"""

from __future__ import annotations

import glob
import hashlib
import json
import operator
import os
import re
import string
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from segattr_onnx.card import ModelCard
from segattr_onnx.case_runs import CaseRun, read_case, score_case_run
from segattr_onnx.compare import (
    COMPARE_FIGURES,
    CaseComparison,
    compare_file,
    model_cards,
    needs_scores,
)
from segattr_onnx.errors import SegattrError
from segattr_onnx.explainer import Explainer
from segattr_onnx.files import (
    folder_without_reader,
    load_toml,
    reject_unknown_keys,
    write_bytes,
)
from segattr_onnx.graph.loading import LoadedModel, external_location, iter_all_tensors
from segattr_onnx.metrics.curves import DEFAULT_STEPS, MAX_STEPS
from segattr_onnx.plugins import registry
from segattr_onnx.progress import make_progress
from segattr_onnx.runtime.backends import (
    LOCAL,
    ExecutorBackend,
    ExecutorError,
    ExecutorOptions,
    executor_backend,
)
from segattr_onnx.runtime.budget import MemoryBudget, MemoryBudgetError, parse_memory_budget
from segattr_onnx.runtime.providers import requested_providers
from segattr_onnx.sanity_audit import (
    SANITY_SCORES,
    SanitySettings,
    audit_job,
    missing_reason,
    sanity_fingerprint,
)
from segattr_onnx.target import Region, Target, check_target_table
from segattr_onnx.text import setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class AuditConfigError(SegattrError):
    """The audit configuration is missing, malformed or names files that do not exist."""


_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CHECK = re.compile(
    r"^\s*([a-z][a-z0-9_]*)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*$"
)  # a name may hold digits after its first letter: [compare]'s top10_iou
LABEL_SCORES = {
    "attribution_quality",
    "relative_entropy",
    "relative_foreground_attribution",
    "external_peak_attribution",
    "target_mass_fraction",
}
ROI_SCORES = {"roi_mass_fraction"}
KNOWN_SCORES = (
    {
        "prediction_preserved",
        "image_preserved",
        "excess_prediction",
        "deletion_auc",
        "insertion_auc",
    }
    | LABEL_SCORES
    | ROI_SCORES
    | set(SANITY_SCORES)
)


@dataclass(frozen=True)
class Check:
    score: str
    comparison: str
    threshold: float
    method: str | None = None  # None: the check applies to every method

    def applies_to(self, method: str) -> bool:
        return self.method is None or self.method == method

    @classmethod
    def parse(
        cls, text: str, method: str | None = None, known: Collection[str] | None = None
    ) -> Check:
        """``known``: the names a check may take (default: the scores of a map); a model
        comparison's checks name its own figures, parsed and judged the same way."""
        names = KNOWN_SCORES if known is None else known
        example = "prediction_preserved" if known is None else min(names)
        match = _CHECK.match(text)
        if match is None:
            raise AuditConfigError(
                f"check {text!r} is not 'score >= number' (or <=, >, <); e.g. '{example} >= 0.8'"
            )
        score, comparison, threshold = match.groups()
        if score not in names:
            listed = ", ".join(sorted(names))
            raise AuditConfigError(f"check {text!r} names an unknown score; use one of {listed}")
        return cls(score, comparison, float(threshold), method)

    def __str__(self) -> str:
        return f"{self.score} {self.comparison} {self.threshold:g}"

    def passes(self, value: float) -> bool:
        return _OPERATORS[self.comparison](value, self.threshold)

    def failure_message(self, value: float) -> str:
        """What a failure says: the check, its bound and direction, and the value found."""
        bound = {
            ">=": "at least",
            ">": "above",
            "<=": "at most",
            "<": "below",
        }[self.comparison]
        return f"{self.score} must be {bound} {self.threshold:g} ({self}); got {value:.4g}"


@dataclass(frozen=True)
class AuditCase:
    name: str
    input: Path
    labels: Path | None
    roi: Path | None = None


@dataclass(frozen=True)
class CompareSection:
    """``[compare]``: a baseline model every case × method is also explained with, and the
    checks on how far the audited model's explanations drifted from it (``compare.py``)."""

    baseline: Path
    checks: tuple[Check, ...]
    card: ModelCard | None = None  # the card beside the baseline; None: the audited model's


# Every key an audit config takes, by place: anything else is a typo or misplaced, an error.
CONFIG_KEYS = frozenset(
    {"model", "cases", "methods", "checks", "output", "layers", "variant", "provider", "steps",
     "target", "card", "memory_budget", "executor", "ray_address", "workers", "worker_cpus",
     "worker_gpus", "compare", "sanity"}
)  # fmt: skip
CASE_KEYS = frozenset({"input", "labels", "roi"})
COMPARE_KEYS = frozenset({"baseline", "checks"})
TARGET_KEYS = frozenset({"class_index", "output", "activation", "region"})
CONFIG_PLACES = {key: "the top level of the audit config" for key in CONFIG_KEYS - {"target"}}
CONFIG_PLACES.update({key: "a [[cases]] entry" for key in CASE_KEYS - {"input"}})


@dataclass(frozen=True)
class AuditConfig:
    """What to audit, read from TOML; relative paths are relative to the config file."""

    model: Path
    cases: tuple[AuditCase, ...]
    methods: tuple[str, ...]
    checks: tuple[Check, ...]
    output: Path
    layers: str = "decoder"
    variant: str = "p2"
    provider: str = "auto"
    steps: int | None = None
    target: dict = field(default_factory=dict)
    card: ModelCard | None = None
    memory_budget: MemoryBudget | None = None  # None: the explainer's default share of free RAM
    executor: str = LOCAL  # what runs the case runs: this process, or a cluster's workers
    executor_options: ExecutorOptions = field(default_factory=ExecutorOptions)
    base: Path | None = None  # the config file's folder, which its outputs must stay inside
    compare: CompareSection | None = None  # [compare]: also explained with a baseline model
    sanity: SanitySettings = field(default_factory=SanitySettings)  # [sanity]: the cascade

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AuditConfig:
        source = Path(path)
        data = load_toml(source, "audit config", AuditConfigError)
        return cls.from_dict(data, source.parent)

    @classmethod
    def from_dict(cls, data: dict, base: Path) -> AuditConfig:
        def path(value: str) -> Path:
            candidate = Path(value)
            return candidate if candidate.is_absolute() else base / candidate

        reject_unknown_keys(data, CONFIG_KEYS, "the audit config", AuditConfigError)
        for key in ("model", "cases", "checks"):
            if key not in data:
                raise AuditConfigError(f"the audit config needs a '{key}' entry")
        _expect(data, "model", str)
        _expect(data, "methods", list, required=False)
        if not isinstance(data["checks"], (list, dict)):
            raise AuditConfigError(
                "'checks' in the audit config must be a list of checks, or a [checks] table of "
                f"lists by method (and 'all'), not {data['checks']!r}"
            )
        _expect(data, "cases", list)
        _expect(data, "layers", str, required=False)
        _expect(data, "variant", str, required=False)
        _expect(data, "provider", str, required=False)
        _expect(data, "output", str, required=False)
        _expect(data, "target", dict, required=False)
        _expect(data, "card", str, required=False)
        _expect(data, "sanity", dict, required=False)
        sanity = SanitySettings.from_table(
            data.get("sanity", {}), "the audit config's [sanity]", AuditConfigError
        )
        memory_budget = _memory_budget(data)
        executor, executor_options = _executor(data)
        target = dict(data.get("target", {}))
        reject_unknown_keys(
            target, TARGET_KEYS, "the audit config's [target]", AuditConfigError, CONFIG_PLACES
        )
        check_target_table(target, "the audit config's [target]", AuditConfigError)
        if not all(isinstance(m, str) for m in data.get("methods", [])):
            raise AuditConfigError("methods in the audit config must be a list of names")
        model = path(data["model"])
        if not model.is_file():
            raise AuditConfigError(f"model {str(model)!r} named in the audit config does not exist")
        cases = tuple(_expand_cases(data["cases"], path))
        if not cases:
            raise AuditConfigError("the audit config's cases match no file")
        methods = tuple(data.get("methods", ["kwc"]))
        if not methods:
            raise AuditConfigError(
                "the audit config lists no methods; an audit that explains nothing would pass"
            )
        checks = _parse_checks(data["checks"], methods)
        compare = _compare_section(data, path, methods)
        if compare is not None:  # gated, stored and resumed like every other check
            checks += compare.checks
        if any(c.score in ROI_SCORES for c in checks) and any(c.roi is None for c in cases):
            missing = ", ".join(c.name for c in cases if c.roi is None)
            raise AuditConfigError(
                f"a check needs an ROI mask (roi_mass_fraction) but cases {missing} have none; "
                "give 'roi' for every case"
            )
        if any(c.score in LABEL_SCORES for c in checks) and any(c.labels is None for c in cases):
            raise AuditConfigError(
                "a check needs ground-truth labels (attribution_quality, ...) but some cases "
                "have none; give 'labels' for every case"
            )
        steps = _steps(data, checks)
        return cls(
            model=model,
            cases=cases,
            methods=methods,
            checks=checks,
            output=_output_folder(path(data.get("output", "segattr-audit"))),
            base=base,
            layers=data.get("layers", "decoder"),
            variant=data.get("variant", "p2"),
            provider=data.get("provider", "auto"),
            steps=steps,
            target=target,
            card=ModelCard.load(path(data["card"])) if "card" in data else ModelCard.beside(model),
            memory_budget=memory_budget,
            executor=executor,
            executor_options=executor_options,
            compare=compare,
            sanity=sanity,
        )


def _parse_checks(
    entries: list | dict,
    methods: tuple[str, ...],
    known: Collection[str] | None = None,
    where: str = "the audit config",
    table: str = "the audit config's [checks]",
) -> tuple[Check, ...]:
    """``checks``: a list for every method, or a table of lists keyed by method and ``all``
    (Grad-CAM's maps keep far less of the prediction than KWC's: one bound rarely fits both).
    ``known``, ``where`` and ``table``: the names and the place of [compare]'s checks."""
    tables = {"all": entries} if isinstance(entries, list) else dict(entries)
    reject_unknown_keys(tables, {"all", *methods}, table, AuditConfigError)
    checks = []
    for method, texts in tables.items():
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise AuditConfigError(f"checks for {method!r} must be a list of check strings")
        checks += [Check.parse(text, None if method == "all" else method, known) for text in texts]
    if not checks:
        raise AuditConfigError(
            f"{where} has no checks; an audit that checks nothing would pass anything"
        )
    return tuple(checks)


def _compare_section(
    data: dict, path: Callable[[str], Path], methods: tuple[str, ...]
) -> CompareSection | None:
    """``[compare]``: the baseline (a model file that exists) and its checks, which name the
    figures of ``compare.py`` (``spearman``, ``dice``, ``prediction_preserved_delta``, ...)."""
    if "compare" not in data:
        return None
    _expect(data, "compare", dict)
    table = data["compare"]
    reject_unknown_keys(table, COMPARE_KEYS, "the audit config's [compare]", AuditConfigError)
    for key in ("baseline", "checks"):
        if key not in table:
            raise AuditConfigError(f"the audit config's [compare] needs a '{key}' entry")
    if not isinstance(table["baseline"], str):
        raise AuditConfigError(
            f"'baseline' in the audit config's [compare] must be a string, not "
            f"{table['baseline']!r}"
        )
    if not isinstance(table["checks"], (list, dict)):
        raise AuditConfigError(
            "'checks' in the audit config's [compare] must be a list of checks, or a table of "
            f"lists by method (and 'all'), not {table['checks']!r}"
        )
    baseline = path(table["baseline"])
    if not baseline.is_file():
        raise AuditConfigError(
            f"baseline {str(baseline)!r} named in the audit config's [compare] does not exist"
        )
    checks = _parse_checks(
        table["checks"],
        methods,
        COMPARE_FIGURES,
        "the audit config's [compare]",
        "the audit config's [compare.checks]",
    )
    return CompareSection(baseline, checks, ModelCard.beside(baseline))


def _expect(data: dict, key: str, kind: type, required: bool = True) -> None:
    if key not in data:
        if required:
            raise AuditConfigError(f"the audit config needs a '{key}' entry")
        return
    if not isinstance(data[key], kind):
        raise AuditConfigError(
            f"'{key}' in the audit config must be {_TOML_TYPES[kind]}, not {data[key]!r}"
        )


# What each Python type is called in TOML, with its article.
_TOML_TYPES = {str: "a string", int: "an integer", list: "a list", dict: "a table"}
CURVE_SCORES = ("deletion_auc", "insertion_auc")


def _steps(data: dict, checks: tuple[Check, ...]) -> int | None:
    """``steps``: deletion/insertion steps, in the command line's range (0: no curves); by
    default the curves are drawn only when a check needs them."""
    steps = data.get("steps")
    # [compare]'s deletion_auc_delta compares two curves' areas: it needs the curves too.
    needed = [c.score for c in checks if c.score.removesuffix("_delta") in CURVE_SCORES]
    if steps is None:
        return DEFAULT_STEPS if needed else None
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
        raise AuditConfigError(
            f"'steps' in the audit config must be a whole number from 0 to {MAX_STEPS} "
            f"(0: no deletion/insertion curves), not {steps!r}"
        )
    if steps == 0 and needed:
        raise AuditConfigError(
            f"steps = 0 in the audit config turns the deletion/insertion curves off, but a "
            f"check needs them ({needed[0]}); give steps from 1 to {MAX_STEPS} or drop the check"
        )
    return steps or None


def _memory_budget(data: dict) -> MemoryBudget | None:
    """``memory_budget``: a size string ("4G"), bytes (an integer) or a fraction (0.3, "30%")."""
    if "memory_budget" not in data:
        return None
    value = data["memory_budget"]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise AuditConfigError(
            f"'memory_budget' in the audit config must be a size like \"4G\" or a fraction "
            f"like 0.3, not {value!r}"
        )
    try:
        return parse_memory_budget(value, what="'memory_budget' in the audit config")
    except MemoryBudgetError as exc:
        raise AuditConfigError(str(exc)) from exc


def _executor(data: dict) -> tuple[str, ExecutorOptions]:
    """The config's executor and its options (``ray_address``, ``workers``, ...)."""
    _expect(data, "executor", str, required=False)
    _expect(data, "ray_address", str, required=False)
    for key, kinds in (
        ("workers", int),
        ("worker_cpus", int | float),
        ("worker_gpus", int | float),
    ):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise AuditConfigError(f"'{key}' in the audit config must be a number, not {value!r}")
    try:
        options = ExecutorOptions(
            address=data.get("ray_address"),
            workers=data.get("workers"),
            worker_cpus=data.get("worker_cpus"),
            worker_gpus=data.get("worker_gpus"),
        )
    except ExecutorError as exc:
        raise AuditConfigError(f"in the audit config: {exc}") from None
    return data.get("executor", LOCAL), options


def _output_folder(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise AuditConfigError(f"output {str(folder)!r} of the audit config is a file")
    return folder


def _check_output_inside(config: AuditConfig) -> None:
    """The config's output folder stays inside the config's own folder: a config from
    elsewhere must not send its files anywhere (the command line's --output may)."""
    if config.base is None:
        return
    if not config.output.resolve().is_relative_to(config.base.resolve()):
        raise AuditConfigError(
            f"output {str(config.output)!r} of the audit config is outside the config's "
            "folder; give the folder on the command line "
            f"({setting('--output', 'output=')}) instead"
        )


def _check_outputs_spare_inputs(config: AuditConfig) -> None:
    """No file the audit writes may be a file it reads (a model named junit.xml, a case in
    the results folder): refuse before anything is written."""
    written = [config.output / "audit.json", config.output / "junit.xml", config.output / "cases"]
    read = [config.model]
    if config.card is not None and config.card.source is not None:
        read.append(config.card.source)
    if config.compare is not None:
        read.append(config.compare.baseline)
        if config.compare.card is not None and config.compare.card.source is not None:
            read.append(config.compare.card.source)
    for case in config.cases:
        read += [p for p in (case.input, case.labels, case.roi) if p is not None]
    outputs = {w.resolve(): w for w in written}
    for source in read:
        resolved = source.resolve()
        clash = outputs.get(resolved) or next(
            (w for r, w in outputs.items() if r.name == "cases" and resolved.is_relative_to(r)),
            None,
        )
        if clash is None and source.is_dir():  # a series folder: nothing may be written in it
            clash = next((w for r, w in outputs.items() if r.is_relative_to(resolved)), None)
        if clash is not None:
            raise AuditConfigError(
                f"the audit would write {str(clash)!r} over or into its own input "
                f"{str(source)!r}; choose another output folder"
            )


def _fill_stem(template: str, stem: str, key: str) -> str:
    """``template`` with ``{stem}`` replaced: the one documented placeholder. Attribute or
    index lookups (``{stem.__class__}``), other names, conversions and lone braces are refused:
    str.format would evaluate them or fail with a traceback."""
    parts = []
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AuditConfigError(
            f"'{key}' pattern {template!r} is malformed ({exc}); only {{stem}} may be used"
        ) from exc
    for literal, field_name, spec, conversion in fields:
        parts.append(literal)
        if field_name is None:
            continue
        if field_name != "stem" or spec or conversion:
            raise AuditConfigError(
                f"'{key}' pattern {template!r} uses {{{field_name}}}; only {{stem}} (the case "
                "file's name without its suffix) may be used"
            )
        parts.append(stem)
    return "".join(parts)


def _expand_cases(entries: list, path: Callable[[str], Path]) -> list[AuditCase]:
    """Each entry: a file or glob string, or a table {input = ..., labels = ...}."""
    cases: list[AuditCase] = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"input": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
            raise AuditConfigError(f"case entry {entry!r} needs an 'input' file or glob")
        reject_unknown_keys(
            entry, CASE_KEYS, f"case {entry['input']!r}", AuditConfigError, CONFIG_PLACES
        )
        for key in ("labels", "roi"):
            if key in entry and not isinstance(entry[key], str):
                raise AuditConfigError(f"'{key}' of case {entry['input']!r} must be a path string")
        pattern = str(path(entry["input"]))
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(_is_case_input(Path(m)) for m in matches):
            raise AuditConfigError(f"case input {entry['input']!r} matches no file")
        for match in matches:
            stem = _case_stem(Path(match))
            labels = entry.get("labels")
            if labels == "same":  # a segattr synth case carries its labels
                if Path(match).is_dir():
                    raise AuditConfigError(
                        f'case {match!r} is a folder: labels = "same" is for a case file that '
                        "holds its labels (a segattr synth .npz); give the labels' path instead"
                    )
                label_path: Path | None = Path(match)
            elif labels:
                label_path = path(_fill_stem(labels, stem, "labels"))
                if not label_path.is_file():
                    raise AuditConfigError(f"labels {str(label_path)!r} do not exist")
            else:
                label_path = None
            roi_path = None
            if entry.get("roi"):
                # Optional: a case without its mask simply has no ROI; a check that needs one
                # then stops the audit, naming the cases.
                roi_path = path(_fill_stem(entry["roi"], stem, "roi"))
                if not roi_path.exists():
                    roi_path = None
                elif not roi_path.is_file():
                    raise AuditConfigError(f"ROI mask {str(roi_path)!r} is not a file")
            cases.append(AuditCase(stem, Path(match), label_path, roi_path))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise AuditConfigError("two cases share a file name; give them distinct names")
    return cases


def _is_case_input(candidate: Path) -> bool:
    """A file, or a folder an installed plugin reads (a DICOM series); a folder no plugin
    reads is refused here, saying what would read it."""
    if candidate.is_file():
        return True
    if not candidate.is_dir():
        return False
    if registry().reader_for(candidate) is None:
        raise AuditConfigError(f"case input {folder_without_reader(candidate)}")
    return True


def _case_stem(case: Path) -> str:
    """A case's name, and what ``{stem}`` stands for: a file's name without its suffix, a
    folder's whole name (a series folder 'ct.2024' is not a file of type '.2024')."""
    return case.name if case.is_dir() else case.stem


@dataclass(frozen=True)
class CheckResult:
    case: str
    method: str
    check: str
    value: float | None
    passed: bool
    message: str = ""


@dataclass
class AuditReport:
    """Every check of every case × method, and where the files went."""

    results: list[CheckResult]
    json_path: Path
    junit_path: Path
    reused: int = 0  # case × method runs whose stored results --resume took
    computed: int = 0  # case × method runs this audit computed

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if not result.passed]

    def summary_table(self) -> str:
        rows = [("case", "method", "check", "value", "result")]
        for r in self.results:
            value = "-" if r.value is None else f"{r.value:.4f}"
            rows.append((r.case, r.method, r.check, value, "pass" if r.passed else "FAIL"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
        )


def audit(
    config: AuditConfig | str | os.PathLike[str],
    force: bool = False,
    progress: bool | object = False,
    memory_budget: MemoryBudget | str | None = None,
    resume: bool = False,
    provider: str | None = None,
    output: str | os.PathLike[str] | None = None,
    executor: str | ExecutorBackend | None = None,
    executor_options: ExecutorOptions | None = None,
) -> AuditReport:
    """Run an audit, every case × method computed afresh.

    ``resume=True`` (an interrupted run) reuses a stored result only when the content of every
    file that shaped it (model and external data, case, labels, ROI; the card's settings) and
    every setting are unchanged; ``force`` recomputes even then. A gate's verdict must come from
    this run's computation, so reuse is never the default.

    ``memory_budget`` ("4G", "30%", ...) overrides the config's; a fraction of free memory is
    read once, here, for the whole audit. ``provider`` and ``output`` override the config's.

    ``executor`` ("ray", or a backend object) runs the case runs on a cluster's workers; the
    scores, reports and resumption are the same as in this process. ``executor_options``
    (address, workers, ...) override the config's one by one.
    """
    if output is not None:
        reports = Path(output)
    elif isinstance(config, AuditConfig):
        reports = config.output
    else:
        reports = _declared_output(Path(config))
    try:
        config, memory_budget = _checked_setup(config, memory_budget, provider, output)
        backend, owned = _backend(config, executor, executor_options)
    except SegattrError as exc:
        # The previous run's reports must not stand for this one, whatever was refused.
        _replace_old_reports(reports, f"the audit did not run: {exc}")
        raise
    # Until this run's reports are written, the folder says the audit did not finish (a killed
    # run leaves that, never the previous run's verdict for CI to pick up).
    if config.output.is_dir():
        _write_failed_reports(config.output, "the audit started but did not finish")
    try:
        return _audit(config, force or not resume, progress, memory_budget, backend)
    except (SegattrError, KeyboardInterrupt) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        if config.output.is_dir():
            _write_failed_reports(config.output, f"the audit did not finish: {reason}")
        raise
    finally:
        if owned:
            backend.close()


def _backend(
    config: AuditConfig,
    executor: str | ExecutorBackend | None,
    options: ExecutorOptions | None,
) -> tuple[ExecutorBackend, bool]:
    """The backend that runs the case runs, and whether this audit made it (and closes it).

    Options given to the call replace the config's one by one; a backend object is the
    caller's, used as it is."""
    if executor is not None and not isinstance(executor, str):
        return executor, False
    merged = config.executor_options
    if executor == LOCAL:  # the caller runs it here: the config's cluster settings do not apply
        merged = ExecutorOptions()
    if options is not None:
        merged = replace(merged, **{name: getattr(options, name) for name in options.given})
    return executor_backend(executor or config.executor, merged), True


def _checked_setup(
    config: str | os.PathLike[str] | AuditConfig,
    memory_budget: MemoryBudget | str | None,
    provider: str | None,
    output: str | os.PathLike[str] | None,
) -> tuple[AuditConfig, MemoryBudget | None]:
    """The config as this run uses it, every setting checked before anything is written."""
    if isinstance(memory_budget, str):
        memory_budget = parse_memory_budget(memory_budget)
    if not isinstance(config, AuditConfig):
        config = AuditConfig.load(Path(config))
    if output is not None:  # the caller's choice: it may lie outside the config's folder
        folder = Path(output)
        if folder.exists() and not folder.is_dir():
            raise AuditConfigError(f"output {str(folder)!r} is a file")
        config = replace(config, output=folder)
    else:
        _check_output_inside(config)
    _check_outputs_spare_inputs(config)
    if provider is not None:
        config = replace(config, provider=provider)
        requested_providers(provider)  # an unknown name is refused before anything is written
    return config, memory_budget


def _audit(
    config: AuditConfig,
    force: bool,
    progress: bool | object,
    memory_budget: MemoryBudget | None,
    backend: ExecutorBackend,
) -> AuditReport:
    results_dir = config.output / "cases"
    for folder in (config.output, results_dir):
        if folder.is_symlink():
            raise AuditConfigError(
                f"{str(folder)!r} is a symbolic link; the audit writes only into real folders "
                "(remove the link, or give another output folder)"
            )
    results_dir.mkdir(parents=True, exist_ok=True)
    budget = memory_budget if memory_budget is not None else config.memory_budget
    explainer = Explainer(
        config.model,
        provider=config.provider,
        memory_budget=budget.resolve() if budget is not None else None,
    )
    baseline = (  # [compare]: the baseline model, run as the audited one is
        Explainer(
            config.compare.baseline,
            provider=config.provider,
            memory_budget=explainer.memory_budget,
        )
        if config.compare is not None
        else None
    )
    target = _target(config.target)
    settings = _fingerprint(config, explainer.model, baseline.model if baseline else None)
    jobs = [(case, method) for case in config.cases for method in config.methods]
    scores_by_job: dict[int, dict] = {}
    to_compute: list[int] = []
    bar = make_progress(progress, len(jobs), f"audit: {len(jobs)} case × method runs")
    try:
        for index, (case, method) in enumerate(jobs):
            stored = None
            if not force:
                record_path = results_dir / f"{case.name}.{method}.json"
                fingerprint = _case_fingerprint(settings, case, method)
                stored = _reusable(record_path, fingerprint, config, method)
            if stored is not None:
                scores_by_job[index] = stored
                bar.update(1)
            else:
                to_compute.append(index)
        groups = _by_case(to_compute, jobs)
        fingerprints: dict[int, str] = {}  # taken as each case is read, before it is scored
        runs = _case_runs(explainer, config, target, jobs, groups, settings, fingerprints)
        # Each result is stored as it arrives (in any order), so an interruption loses none.
        job = audit_job(config.checks, config.methods, config.sanity, score_case_run)
        for position, method_scores in backend.map(explainer, job, runs):
            group = groups[position]
            compared = (
                _compared(explainer, baseline, config, target, jobs, group, method_scores)
                if baseline is not None
                else [None] * len(method_scores)
            )
            for index, scores, comparison in zip(group, method_scores, compared, strict=True):
                case, method = jobs[index]
                record = {
                    "case": str(case.input),
                    "method": method,
                    "fingerprint": fingerprints[index],
                    "scores": scores,
                }
                if comparison is not None:  # its figures are checked like the scores
                    scores = record["scores"] = {**scores, **comparison.figures()}
                    record["compare"] = {
                        "baseline": str(config.compare.baseline),
                        **comparison.to_dict(),
                    }
                _write_json(results_dir / f"{case.name}.{method}.json", record)
                scores_by_job[index] = scores
                bar.update(1)
    finally:
        bar.close()
    results = [
        _check_result(check, case.name, method, scores_by_job[index])
        for index, (case, method) in enumerate(jobs)
        for check in config.checks
        if check.applies_to(method)
    ]
    computed = len(to_compute)
    report = AuditReport(
        results,
        config.output / "audit.json",
        config.output / "junit.xml",
        len(jobs) - computed,
        computed,
    )
    _write_json(
        report.json_path,
        {
            "model": str(config.model),
            "passed": report.passed,
            "case_runs": {"computed": computed, "reused": report.reused},
            "results": [asdict(r) for r in results],
        },
    )
    _write_junit(report)
    return report


def _compared(
    explainer: Explainer,
    baseline: Explainer,
    config: AuditConfig,
    target: Target,
    jobs: list[tuple[AuditCase, str]],
    group: list[int],
    method_scores: list[dict],
) -> list[CaseComparison]:
    """[compare]: one case's methods explained with the baseline (A) and the audited model
    (B) in this process, as ``compare.py`` compares them; B's scores are the run's own.

    The baseline's maps are scored only when a check names a score delta."""
    assert config.compare is not None
    case = jobs[group[0]][0]
    card_a, card_b = model_cards(baseline, explainer, config.compare.card, config.card)
    return compare_file(
        baseline,
        card_a,
        explainer,
        card_b,
        case.input,
        case.name,
        target,
        [jobs[index][1] for index in group],
        config.layers,
        config.variant,
        scores=needs_scores([check.score for check in config.compare.checks]),
        steps=config.steps,
        scores_b=method_scores,
    )


def _by_case(indices: list[int], jobs: list[tuple[AuditCase, str]]) -> list[list[int]]:
    """The job indices in runs of the same case (the jobs come case by case)."""
    groups: list[list[int]] = []
    for index in indices:
        if groups and jobs[groups[-1][0]][0] == jobs[index][0]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _case_runs(
    explainer: Explainer,
    config: AuditConfig,
    target: Target,
    jobs: list[tuple[AuditCase, str]],
    groups: list[list[int]],
    settings: str,
    fingerprints: dict[int, str],
) -> Iterator[CaseRun]:
    """One run per case, its methods together, each case read only when a worker is ready
    for it: thousands of cases never sit in memory at once.

    Each job's fingerprint is taken just before its case is read, so a stored result is keyed
    by the content it was computed from, even if a file changes while the audit runs.
    """
    for group in groups:
        case = jobs[group[0]][0]
        for index in group:
            fingerprints[index] = _case_fingerprint(settings, case, jobs[index][1])
        inputs = read_case(
            explainer, case.name, case.input, case.labels, case.roi, config.card, target
        )
        methods = tuple(jobs[index][1] for index in group)
        yield CaseRun(inputs, methods, config.layers, config.variant, config.steps)


def _check_result(check: Check, case: str, method: str, scores: dict) -> CheckResult:
    value = scores.get(check.score)
    if value is None:
        reason = (
            f"the map is constant: it attributes nothing and has no {check.score}"
            if scores.get("degenerate")
            else missing_reason(scores, check.score) or f"score {check.score} was not computed"
        )
        return CheckResult(case, method, str(check), None, False, reason)
    passed = check.passes(float(value))
    message = "" if passed else check.failure_message(float(value))
    return CheckResult(case, method, str(check), float(value), passed, message)


def _declared_output(source: Path) -> Path | None:
    """The output folder a config names, read leniently (the config itself may be broken:
    then from its ``output = "..."`` line, if it has one, else the default folder)."""
    try:
        if not source.is_file() or source.stat().st_size > 1 << 20:
            return None
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        output = tomllib.loads(text).get("output", "segattr-audit")
    except (tomllib.TOMLDecodeError, RecursionError):
        line = re.search(r'^\s*output\s*=\s*"([^"\n]*)"', text, re.MULTILINE)
        output = line.group(1) if line else "segattr-audit"
    if not isinstance(output, str):
        return None
    folder = Path(output)
    folder = folder if folder.is_absolute() else source.parent / folder
    # Never outside the config's folder, where this run may not write.
    return folder if folder.resolve().is_relative_to(source.parent.resolve()) else None


def _replace_old_reports(folder: Path | None, message: str) -> None:
    """Where a previous run left reports, replace them with ones that say this run failed."""
    if folder is None or not folder.is_dir():
        return
    if any(_is_our_report(folder / name) for name in ("audit.json", "junit.xml")):
        _write_failed_reports(folder, message)


def _is_our_report(path: Path) -> bool:
    """Whether ``path`` is a report an audit wrote: a refused config may point its output at
    a folder of other files (a model called junit.xml), which must stay as they are."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 64 << 20:
            return False
        if path.name == "audit.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and "passed" in data and "results" in data
        root = ET.parse(path).getroot()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, ET.ParseError):
        return False
    return root.tag == "testsuites" and any(
        suite.get("name") == "segattr-audit" for suite in root.iter("testsuite")
    )


def _write_failed_reports(folder: Path, message: str) -> None:
    """audit.json and junit.xml that say the audit failed, and why (a JUnit error); a file
    of either name that no audit wrote is left alone."""
    if _is_our_report(folder / "audit.json") or not (folder / "audit.json").exists():
        write_bytes(
            folder / "audit.json",
            json.dumps({"passed": False, "error": message, "results": []}, indent=2).encode(),
        )
    if _is_our_report(folder / "junit.xml") or not (folder / "junit.xml").exists():
        suite = ET.Element("testsuite", name="segattr-audit", tests="1", failures="0", errors="1")
        case = ET.SubElement(suite, "testcase", classname="segattr-audit", name="audit")
        ET.SubElement(case, "error", message=message).text = message
        root = ET.Element("testsuites")
        root.append(suite)
        data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        write_bytes(folder / "junit.xml", data)


def _file_digest(path: Path) -> str:
    """SHA-256 of a file's content, read in blocks; an unreadable file is an error, never a
    reason to trust what is stored."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise AuditConfigError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _input_digest(path: Path) -> str:
    """A case file's digest; for a case folder (a DICOM series), the names and contents of
    every file in it and its subfolders (links to folders are not followed: no loop)."""
    if not path.is_dir():
        return _file_digest(path)
    parts = []
    for root, folders, names in os.walk(path, onerror=_walk_error):
        folders.sort()
        for name in sorted(names):
            file = Path(root) / name
            if file.is_file():  # a link that leads nowhere, or in a loop, is read by no one
                parts.append(f"{file.relative_to(path).as_posix()}:{_file_digest(file)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _walk_error(exc: OSError) -> None:
    raise AuditConfigError(f"cannot read {exc.filename!r}: {exc.strerror or exc}") from exc


def _model_digest(model: LoadedModel) -> str:
    """The model file and every external-data file it names, by content (the explainer's own
    load, whose external paths are checked to stay beside the model)."""
    assert model.path is not None
    parts = [_file_digest(model.path)]
    locations = {external_location(t) for t in iter_all_tensors(model.proto)} - {None}
    folder = model.path.parent
    parts += [f"{name}:{_file_digest(folder / name)}" for name in sorted(locations)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _case_fingerprint(settings: str, case: AuditCase, method: str) -> str:
    """One stored result's key: the run's settings and the content of the case's files."""
    files = [case.input, case.labels, case.roi]
    digests = [None if path is None else _input_digest(path) for path in files]
    text = json.dumps([settings, method, digests])
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprint(
    config: AuditConfig, model: LoadedModel, baseline: LoadedModel | None = None
) -> str:
    """What every stored result depends on: the model's content (with its external data) and
    every setting that shapes a result, the card's included; with [compare], the baseline's
    content and card too (its figures are stored with the scores).

    The memory budget is left out: it only changes how many masks share a run, not the scores.
    """
    digest = _model_digest(model)
    settings = {
        "model": digest,
        "layers": config.layers,
        "variant": config.variant,
        "steps": config.steps,
        "target": config.target,
        "card": str(config.card) if config.card is not None else None,
    }
    if config.compare is not None and baseline is not None:
        card = config.compare.card
        settings["compare"] = {
            "baseline": _model_digest(baseline),
            "card": str(card) if card is not None else None,
        }
    settings.update(sanity_fingerprint(config.checks, config.sanity))
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(path: Path, fingerprint: str, config: AuditConfig, method: str) -> dict | None:
    """A stored result's scores, when made with the same model and settings and holding every
    score the checks need; None means run the case again."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
        return None  # a planted link or an oversized file is no result of ours: run again
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("scores"), dict):
        return None
    scores = record["scores"]
    if record.get("fingerprint") != fingerprint:
        return None
    needed = [check.score for check in config.checks if check.applies_to(method)]
    if any(not _is_number(scores.get(name)) for name in needed):
        return None
    return scores


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _target(options: dict) -> Target:
    """The config's [target], its values checked when the config was read."""
    return Target(
        class_index=options.get("class_index"),
        output=options.get("output"),
        activation=options.get("activation", "auto"),
        region=Region.coerce(options.get("region")),
    )


def _write_json(path: Path, data: dict) -> None:
    # A fresh private temporary name, renamed over the target: never a predictable ``.tmp``
    # that a planted link could redirect, and nothing half-written after an interruption.
    write_bytes(path, json.dumps(data, indent=2).encode("utf-8"))


def _write_junit(report: AuditReport) -> None:
    write_bytes(report.junit_path, junit_xml(report.results))


def junit_xml(results: list[CheckResult], suite_name: str = "segattr-audit") -> bytes:
    """One JUnit test case per check result (class name ``CASE.METHOD``, name the check), a
    failed check a ``<failure>`` with its message: what CI systems show. ``segattr compare
    --junit`` writes its checks the same way, under its own suite name."""
    failures = [result for result in results if not result.passed]
    suite = ET.Element(
        "testsuite", name=suite_name, tests=str(len(results)), failures=str(len(failures))
    )
    for result in results:
        case = ET.SubElement(
            suite, "testcase", classname=f"{result.case}.{result.method}", name=result.check
        )
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=result.message)
            failure.text = f"{result.check}: got {result.value}"
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

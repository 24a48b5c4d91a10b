"""The sanity cascade as a gate: ``sanity_spearman`` checks, the audit's ``[sanity]``
settings and the audit job that adds the cascade to a case's scores.

Kept apart from ``sanity.py`` (the cascade itself), which the audit imports through this
module: the gate needs the audit's ``Check``, the cascade does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from segattr_onnx.case_runs import CaseRun, score_case_run
from segattr_onnx.errors import SegattrError
from segattr_onnx.explainer import Explainer
from segattr_onnx.files import reject_unknown_keys
from segattr_onnx.sanity import SANITY_SCORES, SanityError, SanityResult, sanity_check

if TYPE_CHECKING:
    from segattr_onnx.audit import Check


def parse_check(text: str) -> Check:
    """``"sanity_spearman <= 0.5"`` as an audit ``Check``; any other score is refused."""
    from segattr_onnx.audit import AuditConfigError, Check

    try:
        check = Check.parse(text)
    except AuditConfigError:
        raise SanityError(
            f"check {text!r} is not 'sanity_spearman OP number' (OP one of <=, <, >=, >); "
            "e.g. 'sanity_spearman <= 0.5'"
        ) from None
    if check.score not in SANITY_SCORES:
        raise SanityError(
            f"check {text!r} judges {check.score}, which a sanity check does not compute; "
            "give a check on sanity_spearman, e.g. 'sanity_spearman <= 0.5'"
        )
    return check


def unjudged_reason(result: SanityResult) -> str:
    """Why the final figure is missing: the last step's error, with what to do."""
    advice = "explain another class or region"
    if result.final.step > 1:
        advice = f"give fewer steps (at most {result.final.step - 1}), or {advice}"
    return f"the sanity check cannot be judged: {result.final.error}; {advice}"


SANITY_KEYS = frozenset({"steps", "seed"})


@dataclass(frozen=True)
class SanitySettings:
    """An audit config's ``[sanity]``: how far the cascade goes and how its weights are
    drawn, for every case × method a ``sanity_spearman`` check applies to."""

    steps: int | None = None  # None: every kernel layer that feeds the explained output
    seed: int = 0

    @classmethod
    def from_table(cls, table: dict, where: str, error: type[SegattrError]) -> SanitySettings:
        """The table's values, each checked; an unknown key is ``error``, as the config's are."""
        reject_unknown_keys(table, SANITY_KEYS, where, error)
        for key, least in (("steps", 1), ("seed", 0)):
            value = table.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise error(
                    f"{key} = {value!r} in {where} is not allowed: use a whole number ≥ {least}"
                )
        return cls(table.get("steps"), table.get("seed", 0))


def audit_job(
    checks: Sequence[Check],
    methods: Sequence[str],
    settings: SanitySettings,
    score: Callable[[Explainer, CaseRun], list[dict]] = score_case_run,
) -> Callable[[Explainer, CaseRun], list[dict]]:
    """What an audit runs on each case: ``score`` (by default ``score_case_run``), or, when
    a check needs ``sanity_spearman``, a ``SanityScoring`` that adds the cascade to what
    ``score`` gives, for the methods such a check applies to (the others are not randomised).
    """
    needing = frozenset(
        method
        for method in methods
        if any(check.score in SANITY_SCORES and check.applies_to(method) for check in checks)
    )
    if not needing:
        return score
    return SanityScoring(needing, settings.steps, settings.seed, score)


def sanity_fingerprint(checks: Sequence[Check], settings: SanitySettings) -> dict:
    """What stored results depend on besides the audit's other settings: the cascade's
    settings, when a check needs it (nothing otherwise, so other audits' keys stay as they
    were)."""
    if not any(check.score in SANITY_SCORES for check in checks):
        return {}
    return {"sanity": {"steps": settings.steps, "seed": settings.seed}}


@dataclass(frozen=True)
class SanityScoring:
    """An audit's job when a check needs ``sanity_spearman``: the case's usual scores, plus,
    for each method a sanity check applies to, the cascade's final Spearman and its record.

    Plain data with a ``__call__``, so a cluster executor can send it to its workers.
    """

    methods: frozenset[str]
    steps: int | None = None
    seed: int = 0
    score: Callable[[Explainer, CaseRun], list[dict]] = score_case_run  # the usual scores

    def __call__(self, explainer: Explainer, run: CaseRun) -> list[dict]:
        results = self.score(explainer, run)
        for method, scores in zip(run.methods, results, strict=True):
            if method not in self.methods or scores.get("degenerate"):
                continue  # a constant map fails its checks already, saying why
            if run.case.window is not None:
                warnings.warn(
                    "the sanity cascade explains the whole input: the model card's "
                    "[inference] sliding window is not used for it",
                    stacklevel=2,
                )
            try:
                result = sanity_check(explainer, run.case.x, method, run.layers, run.case.target,
                                      run.variant, steps=self.steps, seed=self.seed)  # fmt: skip
            except SegattrError as exc:
                # This case cannot be randomised or re-explained (a layer whose weights are
                # shared, a model fixed at its window's size): its check fails, saying why,
                # and the audit goes on with the other cases.
                scores["sanity_spearman"] = None
                scores["sanity_error"] = f"the sanity check cannot run on this case: {exc}"
                continue
            scores["sanity_spearman"] = result.final_spearman
            scores["sanity"] = result.to_dict()
            if result.final_spearman is None:
                scores["sanity_error"] = unjudged_reason(result)
        return results


def missing_reason(scores: dict, score: str) -> str | None:
    """Why an audit's stored scores lack a sanity figure (the randomised model broke)."""
    if score in SANITY_SCORES and isinstance(scores.get("sanity_error"), str):
        return scores["sanity_error"]
    return None

"""The paper table's verdicts follow from the scores they are given."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "paper_table.py"
spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
paper_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_table)


def _bucket(pp: float, ip: float, aq: float, spread: float = 0.01, n: int = 12) -> dict:
    rng = np.random.default_rng(int(1000 * (pp + ip + aq)))
    noise = rng.normal(0, spread, (3, n))
    return {
        "seeds": list(range(n)),
        "prediction_preserved": list(pp + noise[0]),
        "image_preserved": list(ip + noise[1]),
        "attribution_quality": list(aq + noise[2]),
    }


def _scores(kwc_aq: float, p1_kwc: tuple[float, float]) -> dict:
    scores = {}
    for combination in paper_table.COMBINATIONS:
        for method in paper_table.METHODS:
            aq = kwc_aq if method == "kwc" else 0.5
            if method == "kwc" and combination == "encoder+decoder":
                aq += 0.2
            scores[("p2", method, combination)] = _bucket(0.5, 0.3, aq)
    for method in paper_table.CAM_METHODS:
        scores[("p1", method, "decoder")] = _bucket(0.60, 0.30, 0.5)
    scores[("p1", "kwc", "decoder")] = _bucket(*p1_kwc, 1.0)
    return scores


def test_claims_hold_when_the_scores_say_so() -> None:
    text = "\n".join(paper_table.claims(_scores(kwc_aq=1.0, p1_kwc=(0.75, 0.25))))
    assert "the P1 claim holds" in text  # PP +15 points, IP −5 points
    assert "KWC on encoder+decoder is best holds" in text
    assert "in 5 of 5 combinations, significantly" in text and ": holds" in text


def test_claims_fail_when_the_scores_do_not_support_them() -> None:
    text = "\n".join(paper_table.claims(_scores(kwc_aq=0.2, p1_kwc=(0.95, 0.40))))
    assert "the P1 claim does not hold" in text  # PP +35 points, IP +10 points
    assert "is best does not hold" in text
    assert "in 0 of 5 combinations" in text and "does not hold" in text

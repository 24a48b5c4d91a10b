"""The batch-consistency check: does the model keep the cases of one batch apart?

A model can declare a free batch dim yet hard-code a batch of 1 inside (a fixed Reshape, say);
batching its runs would then mix cases silently. Two different cases, run once as one batch and
once one by one, tell. The check costs three passes of the full model, more than a gradient
method's whole explanation, and only batched runs (ablations, masked inputs) depend on it, so it
is scheduled when an engine is made and runs when the first batched request is planned.
"""

from __future__ import annotations

import warnings

import numpy as np
from onnx import helper

from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from segattr_onnx.runtime.sessions import SessionCache


def keeps_cases_apart(analysis: ModelAnalysis, sessions: SessionCache, seed: int) -> bool:
    """True when two random cases give the same outputs batched together as one by one; a
    batch the model cannot run at all counts as mixing them."""
    model = analysis.model.proto
    session = sessions.get(("full", None), lambda: model)
    name = analysis.input.name
    (declared,) = [i for i in model.graph.input if i.name == name]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(declared.type.tensor_type.elem_type))
    rng = np.random.default_rng(seed)
    shape = analysis.input.shape
    if np.issubdtype(dtype, np.integer):
        rows = [rng.integers(0, 2, shape).astype(dtype) for _ in range(2)]
    else:
        rows = [rng.uniform(0, 1, shape).astype(dtype) for _ in range(2)]
    try:
        together = session.run(None, {name: np.concatenate(rows)})
        alone = [session.run(None, {name: row}) for row in rows]
        return all(
            value.shape[:1] == (2,)
            and all(
                np.allclose(
                    value[k],
                    single[position][0],
                    rtol=1e-3,
                    atol=1e-5 * max(float(np.abs(value).max()), 1.0),
                )
                for k, single in enumerate(alone)
            )
            for position, value in enumerate(together)
        )
    except Exception:  # ORT's own exception types: the batch does not even run
        return False


class BatchCheck:
    """The check for one engine (i.e. one input size): scheduled once, run at most once."""

    def __init__(self, analysis: ModelAnalysis, ablation: AblationRunner) -> None:
        self.analysis = analysis
        self.ablation = ablation
        self._seed: int | None = None  # a check still to run, with its seed

    def schedule(self, seed: int = 0) -> None:
        """Run the check, with ``seed``, before the first batched run."""
        self._seed = seed

    def settle(self) -> None:
        """Run the scheduled check, if any; a model that mixes the cases of a batch runs one
        case at a time from then on (the batch cap is shared by every run on the model)."""
        seed = self._seed
        if seed is None:
            return
        self._seed = None
        cap = self.ablation.batch_cap
        if not self.analysis.input.dynamic_batch or cap.limit == 1:
            return
        if not keeps_cases_apart(self.analysis, self.ablation.sessions, seed):
            warnings.warn(
                "the model's output for a case changes with the batch it runs in, although its "
                "batch dim is free (a batch of 1 is likely hard-coded inside); running one "
                "case at a time",
                BatchFallbackWarning,
                stacklevel=4,  # the caller of Explainer.run (e.g. explain), through the plan
            )
            cap.limit = 1

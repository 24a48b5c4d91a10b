"""The batch-consistency check: does the model keep the cases of one batch apart?

A model can declare a free batch dim yet hard-code a batch of 1 inside (a fixed Reshape, say);
batching its runs would then mix cases silently. Two different cases, run once as one batch and
once one by one, tell. The check costs three passes of the full model, more than a gradient
method's whole explanation, and only batched runs (ablations, masked inputs) depend on it, so it
is scheduled when an engine is made and runs when the first batched request is planned.

Most exported networks need no run at all: when every node the input reaches works on each
case alone (convolutions, pooling, per-case normalisations, activations, channel joins), the
graph proves the verdict (``graph/batch_independence.py``) and the three passes are skipped.

The verdict depends only on the model, the input size, the seed and the ONNX Runtime build
that computed it, so with a disk cache in use (the CLI's) it is kept there under all of that
(``verdict_key``) and the next call on the same model and size skips the three passes. Like
the optimised graphs, only CPU verdicts of models without external data are kept: an external
model's weights are not in the bytes the key hashes.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from onnx import helper

from segattr_onnx.graph.batch_independence import provably_keeps_cases_apart
from segattr_onnx.graph.catalogue import ModelAnalysis
from segattr_onnx.runtime.ablation import AblationRunner
from segattr_onnx.runtime.chunks import BatchFallbackWarning
from segattr_onnx.runtime.disk_cache import cache_key
from segattr_onnx.runtime.optimised_cache import (
    active_disk_cache,
    cpu_signature,
    runtime_signature,
)
from segattr_onnx.runtime.providers import CPU, requested_providers
from segattr_onnx.runtime.sessions import QDQ_AS_SPECIFIED, SessionCache

VERDICT_FORMAT = "batch-check-v1"
_VERDICTS = {True: b"keeps cases apart", False: b"mixes cases"}


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


def verdict_key(analysis: ModelAnalysis, sessions: SessionCache, seed: int) -> str | None:
    """The disk-cache key of this check's verdict: the model's bytes, its input's shape and
    type, the seed, ONNX Runtime's build, this package's version, the session setting that
    changes the arithmetic and the CPU. None where a verdict is not kept (see the module)."""
    if sessions.external_data_dir is not None or requested_providers(sessions.provider) != [CPU]:
        return None
    from segattr_onnx import __version__

    model = analysis.model.proto
    return cache_key(
        VERDICT_FORMAT,
        hashlib.sha256(model.SerializeToString()).digest(),
        tuple(int(size) for size in analysis.input.shape),
        analysis.input.name,
        seed,
        runtime_signature(),
        __version__,
        QDQ_AS_SPECIFIED,
        cpu_signature(),
    )


def checked_verdict(analysis: ModelAnalysis, sessions: SessionCache, seed: int) -> bool:
    """``keeps_cases_apart``: proven from the graph where it can be, else from the disk cache
    when an earlier process stored it, else run."""
    model = analysis.model.proto
    if provably_keeps_cases_apart(model, analysis.input.name, len(analysis.input.shape)):
        return True
    cache = active_disk_cache()
    key = verdict_key(analysis, sessions, seed) if cache is not None else None
    if cache is not None and key is not None:
        stored = cache.load(key)
        for verdict, payload in _VERDICTS.items():
            if stored == payload:
                return verdict
    verdict = keeps_cases_apart(analysis, sessions, seed)
    if cache is not None and key is not None:
        cache.store(key, _VERDICTS[verdict])
    return verdict


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
        if not checked_verdict(self.analysis, self.ablation.sessions, seed):
            warnings.warn(
                "the model's output for a case changes with the batch it runs in, although its "
                "batch dim is free (a batch of 1 is likely hard-coded inside); running one "
                "case at a time",
                BatchFallbackWarning,
                stacklevel=4,  # the caller of Explainer.run (e.g. explain), through the plan
            )
            cap.limit = 1

"""Finding a session's optimised graph on disk before the graph is rewritten.

The optimised-graph cache (``optimised_cache.py``) is keyed by the bytes of the rewritten graph
handed to ONNX Runtime, so a second process still rewrites the model (suffix cuts, linear tails,
readers, heads), serialises and hashes every graph before it can look one up: on the benchmark
U-Net that is about 0.1 s of a 3.5 s CLI call, most of it before the first row runs.

A rewritten graph is a function of the model, the input size, the seed and the session's key:
the in-memory ``SessionCache`` relies on exactly that, as it hands out one session per key for
the life of one model at one size. Given the code that rewrites, then, that recipe names the
graph, and a *recipe entry* maps it to the key of the optimised graph's entry. A hit loads the
optimised graph without building anything; the entry it points to is verified as always, and a
pointer to an evicted or rejected graph is a miss (the graph is built and both are stored).

Everything the graph is computed from is in the recipe, by content:

- the model's serialised bytes (sha256), not its path or name;
- the input shape and the seed (the glorot form of an ablation draws its weights from it);
- the session key, encoded type by type (``encode_session_key``); a key holding anything else
  (an object without a stable value) is not looked up at all;
- the source of this package and of onnx-graphsurgeon, every module (``code_fingerprint``): a
  checkout edited under the same version number must not reuse the graphs its old code
  rewrote; and the versions of onnx, numpy and protobuf;
- ONNX Runtime's build, the CPU and the session settings, as in the optimised graph's key.

Only keys of the kinds this package builds (``RECIPE_KINDS``) are looked up: a plugin that made
sessions through the same cache with a key of its own would have its graphs built as before.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
from collections.abc import Hashable, Sequence
from pathlib import Path

import onnx

FORMAT = "segattr-recipe-v1"
# The first element of every session key whose graph is a function of the key, the model, the
# input size and the seed alone (runtime/ablation.py, observation.py, gradients.py, ...).
RECIPE_KINDS = frozenset(
    {
        "full",
        "observe",
        "boundary",
        "prefix",
        "suffix",
        "suffix-hoisted",
        "linear-tail",
        "linear-hoisted",
        "linear-readers",
        "linear-contributions",
        "gradients",
        "input-gradients",
    }
)


class _NotEncodable(Exception):
    pass


def _encode(value: object) -> tuple:
    """A tagged tuple for ``cache_key``: equal exactly when the values are equal and of the
    same type (1, 1.0, True and "1" all differ)."""
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("bool", int(value))
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, tuple):
        return ("tuple", *(_encode(part) for part in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise _NotEncodable
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        fields = tuple(
            (field.name, _encode(getattr(value, field.name))) for field in dataclasses.fields(value)
        )
        return ("dataclass", kind, fields)
    raise _NotEncodable


def encode_session_key(key: Hashable) -> tuple | None:
    """``key`` as parts of a disk-cache key, or None when it is not a recipe: not a tuple of a
    known kind, or holding a value that has no stable encoding (a plain object, a list, a
    mutable dataclass)."""
    if not isinstance(key, tuple) or not key or key[0] not in RECIPE_KINDS:
        return None
    try:
        return _encode(key)
    except _NotEncodable:
        return None


def _hash_sources(digest: hashlib._Hash, root: Path) -> bool:
    """Feed every module under ``root`` (relative path and bytes, sorted) to ``digest``;
    False when there is none to read."""
    modules = sorted(root.rglob("*.py"))
    for path in modules:
        name = path.relative_to(root).as_posix().encode()
        body = path.read_bytes()
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(len(body).to_bytes(8, "little") + body)
    return bool(modules)


@functools.cache
def code_fingerprint() -> bytes | None:
    """The sha256 of the code that rewrites: every module of this package and of
    onnx-graphsurgeon (found, not imported: it takes 0.1-0.3 s to import, and a process whose
    graphs all come from the cache never needs it), and the versions of onnx, numpy and
    protobuf. None when a source cannot be read (a frozen application): no recipe then."""
    import google.protobuf
    import numpy as np

    from segattr_onnx import __version__

    digest = hashlib.sha256()
    for part in (__version__, onnx.__version__, np.__version__, google.protobuf.__version__):
        digest.update(part.encode() + b"\0")
    try:
        surgeon = importlib.util.find_spec("onnx_graphsurgeon")
        if surgeon is None or surgeon.origin is None:
            return None
        for root in (Path(__file__).resolve().parent.parent, Path(surgeon.origin).parent):
            if not _hash_sources(digest, root):
                return None
    except (OSError, ImportError, ValueError):
        return None
    return digest.digest()


class RecipeContext:
    """What every graph of one model at one input size is rewritten from, besides its key.

    The model's digest is computed on first use: a process without a disk cache never pays
    for serialising the model.
    """

    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int], seed: int) -> None:
        self._model = model
        self.input_shape = tuple(int(size) for size in input_shape)
        self.seed = int(seed)

    @functools.cached_property
    def model_digest(self) -> bytes:
        return hashlib.sha256(self._model.SerializeToString()).digest()

    def parts(self, key: Hashable) -> tuple | None:
        """The recipe of the graph of ``key``, or None when it is not one (see above)."""
        encoded = encode_session_key(key)
        code = code_fingerprint() if encoded is not None else None
        if encoded is None or code is None:
            return None
        return (FORMAT, code, self.model_digest, self.input_shape, self.seed, encoded)

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
- the session key, encoded type by type (``encode_session_key``); only keys of the kinds and
  shapes this package builds (``KEY_SHAPES``) are looked up: a key holding anything else (a
  head of a caller's own, whose code is outside the recipe; a plugin's kind) is built as before.
- the source of this package and of onnx-graphsurgeon, every module (``code_fingerprint``): a
  checkout edited under the same version number must not reuse the graphs its old code
  rewrote, and a process whose sources changed after it started stores no pointer from then
  on (``sources_unchanged``);
  and the versions of onnx, numpy and protobuf;
- ONNX Runtime's build, the CPU and the session settings, as in the optimised graph's key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
from collections.abc import Hashable
from pathlib import Path

import onnx

from segattr_onnx.graph.heads import ScoreHeadSpec

FORMAT = "segattr-recipe-v1"

# What each element of a session key may be (``_fits``):
NAME = "name"  # a str: a layer, an ablation form, a tensor
NAMES = "names"  # a tuple of str: exposed tensors, a gradient's layers
COUNT = "count"  # an int (not a bool): a channel group, a batch
FLAG = "flag"  # a bool
SPEC = "spec"  # this package's ScoreHeadSpec, exactly (a subclass could attach another head)
HEAD = "head"  # None, or ("score-head", SPEC): a caller's own head is code outside the recipe
# The keys this package builds sessions under (runtime/ablation.py, observation.py,
# gradients.py, input_gradients.py, score_heads.py, work.py), each graph a function of its key,
# the model, the input size and the seed. A key of any other kind or shape is no recipe.
KEY_SHAPES: dict[str, tuple[tuple[str, ...], ...]] = {
    "full": ((HEAD,), (NAME, NAME, HEAD)),
    "observe": ((NAMES,),),
    "boundary": ((NAME, NAME),),
    "prefix": ((NAME, NAME),),
    "suffix": ((NAME, NAME, HEAD),),
    "suffix-hoisted": ((NAME, NAME),),
    "linear-tail": ((NAME, NAME, HEAD),),
    "linear-hoisted": ((NAME, NAME),),
    "linear-readers": ((NAME, NAME),),
    "linear-contributions": ((NAME, NAME, NAME, COUNT, FLAG),),
    "gradients": ((SPEC, NAMES),),
    "input-gradients": ((SPEC, COUNT),),
}


def _plain(value: object) -> bool:
    """None, or exactly a str or an int (not a bool, not numpy's integers, not a subclass):
    the values ``_encode`` tells apart by type."""
    return value is None or type(value) in (str, int)


def _fits(value: object, kind: str) -> bool:
    if kind == NAME:
        return type(value) is str
    if kind == NAMES:
        return type(value) is tuple and all(type(part) is str for part in value)
    if kind == COUNT:
        return type(value) is int
    if kind == FLAG:
        return type(value) is bool
    spec = value
    if kind == HEAD:
        if value is None:
            return True
        if type(value) is not tuple or len(value) != 2 or value[0] != "score-head":
            return False
        spec = value[1]
    else:
        assert kind == SPEC
    return type(spec) is ScoreHeadSpec and all(
        _plain(getattr(spec, field.name)) for field in dataclasses.fields(spec)
    )


def _encode(value: object) -> tuple:
    """A tagged tuple for ``cache_key`` of a value that fits its key shape: equal exactly when
    the values are equal and of the same type."""
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("bool", int(value))
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, ScoreHeadSpec):
        fields = tuple(
            (field.name, _encode(getattr(value, field.name))) for field in dataclasses.fields(value)
        )
        return ("score-head-spec", fields)
    assert isinstance(value, tuple)
    return ("tuple", *(_encode(part) for part in value))


def encode_session_key(key: Hashable) -> tuple | None:
    """``key`` as parts of a disk-cache key, or None when it is not a recipe: not a tuple of a
    known kind and shape (``KEY_SHAPES``)."""
    if not isinstance(key, tuple) or not key or not isinstance(key[0], str):
        return None
    rest = key[1:]
    for shape in KEY_SHAPES.get(key[0], ()):
        if len(shape) == len(rest) and all(map(_fits, rest, shape)):
            return _encode(key)
    return None


def _source_roots() -> list[Path] | None:
    """The folders whose modules rewrite graphs: this package's and onnx-graphsurgeon's (found,
    not imported: it takes 0.1-0.3 s to import, and a process whose graphs all come from the
    cache never needs it)."""
    try:
        surgeon = importlib.util.find_spec("onnx_graphsurgeon")
    except (ImportError, ValueError):
        return None
    if surgeon is None or surgeon.origin is None:
        return None
    return [Path(__file__).resolve().parent.parent, Path(surgeon.origin).parent]


def _source_stamps() -> dict[str, tuple[str, int, int]] | None:
    """Each module's path with its name in the fingerprint (its root's number and its path
    under it: the same code installed elsewhere has the same fingerprint), modification time
    and size; None when a root has no module or one cannot be read."""
    roots = _source_roots()
    if roots is None:
        return None
    stamps: dict[str, tuple[str, int, int]] = {}

    def unreadable(error: OSError) -> None:
        raise error

    try:
        for number, root in enumerate(roots):
            found = len(stamps)
            for folder, subfolders, files in os.walk(root, onerror=unreadable):
                subfolders[:] = [name for name in subfolders if name != "__pycache__"]
                if any(os.path.islink(os.path.join(folder, name)) for name in subfolders):
                    return None  # os.walk would not enter it: modules left out of the hash
                under = Path(folder).relative_to(root).as_posix()
                for name in files:
                    if not name.endswith(".py"):
                        continue
                    path = os.path.join(folder, name)
                    info = os.stat(path)
                    label = f"{number}/{name}" if under == "." else f"{number}/{under}/{name}"
                    stamps[path] = (label, info.st_mtime_ns, info.st_size)
            if len(stamps) == found:
                return None
    except OSError:
        return None
    return stamps


# The sources as this process found them when it started rewriting: a module edited, checked
# out or upgraded later may not be the code running here (it was imported before), so its
# graphs must not be stored under the new source's fingerprint (``code_fingerprint``), nor,
# once some of it is imported after the edit, under the old one (``sources_unchanged``).
_STAMPS_AT_IMPORT = _source_stamps()


def sources_unchanged() -> bool:
    """Whether every module fingerprinted is as it was when this module was imported (its
    modification time and size; 0.3 ms for the 120 modules). Checked before each pointer is
    stored: modules imported lazily (onnx-graphsurgeon, the gradient rules) after an edit
    would build graphs that the fingerprint of the old files does not describe."""
    if _STAMPS_AT_IMPORT is None:
        return False
    try:
        for path, (_, modified, size) in _STAMPS_AT_IMPORT.items():
            info = os.stat(path)
            if info.st_mtime_ns != modified or info.st_size != size:
                return False
    except OSError:
        return False
    return True


@functools.cache
def code_fingerprint() -> bytes | None:
    """The sha256 of the code that rewrites: every module of this package and of
    onnx-graphsurgeon (path and bytes, in sorted order), and the versions of onnx, numpy and
    protobuf. None, and no recipe in this process, when a source cannot be read (a frozen
    application) or changed since this module was imported."""
    import google.protobuf
    import numpy as np

    from segattr_onnx import __version__

    stamps = _source_stamps()
    if stamps is None or stamps != _STAMPS_AT_IMPORT:
        return None
    digest = hashlib.sha256()
    for part in (__version__, onnx.__version__, np.__version__, google.protobuf.__version__):
        digest.update(part.encode() + b"\0")
    try:
        for path, (name, _, _) in sorted(stamps.items(), key=lambda item: item[1][0]):
            body = Path(path).read_bytes()
            label = name.encode("utf-8", "surrogateescape")
            digest.update(len(label).to_bytes(8, "little") + label)
            digest.update(len(body).to_bytes(8, "little") + body)
    except OSError:
        return None
    if _source_stamps() != stamps:  # changed while being read
        return None
    return digest.digest()


def model_digest(model: onnx.ModelProto) -> bytes:
    """The sha256 of the model's serialised bytes: taken beside its analysis, so that the graphs
    stored under it are rewritten from the proto that was analysed."""
    return hashlib.sha256(model.SerializeToString()).digest()


@dataclasses.dataclass(frozen=True)
class RecipeContext:
    """What every graph of one model at one input size is rewritten from, besides its key."""

    model_digest: bytes
    input_shape: tuple[int, ...]
    seed: int

    def parts(self, key: Hashable) -> tuple | None:
        """The recipe of the graph of ``key``, or None when it is not one (see above)."""
        encoded = encode_session_key(key)
        code = code_fingerprint() if encoded is not None else None
        if encoded is None or code is None:
            return None
        shape = tuple(int(size) for size in self.input_shape)
        return (FORMAT, code, self.model_digest, shape, int(self.seed), encoded)

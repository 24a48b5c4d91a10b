"""Layer patterns (``--layers re:REGEX``) matched in time linear in the name, whatever the pattern.

A pattern comes from a user (or a config written by someone else): ``re:(a+)+$`` makes Python's
backtracking ``re`` run for ever on a long layer name, and ``re`` has no timeout. So patterns
are parsed by ``re``'s own parser and matched by simulating their automaton instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from segattr_onnx.errors import LayerSelectionError

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

# Limits on a user's layer pattern (``re:REGEX``): its length, the states of its automaton (a
# counted repeat {m,n} makes n copies of what it repeats) and the steps matching it against
# every layer name may take. Each is far above what a pattern over layer names needs.
PATTERN_CHAR_LIMIT = 1000
PATTERN_STATE_LIMIT = 5000
PATTERN_WORK_LIMIT = 1_000_000

# A user's pattern is matched by simulating its automaton (Thompson's construction over Python's
# own parse of it), never by ``re``'s backtracking engine: ``re:(a+)+$`` against a long layer
# name would backtrack for ever there, and ``re`` has no timeout. The simulation takes at most
# (name length x automaton states) steps whatever the pattern, and PATTERN_WORK_LIMIT caps the
# total. Characters are still tested by ``re`` (one character against one class: nothing to
# backtrack), so classes, \d \w \s, (?i) and (?a) mean exactly what they mean in Python.
_MATCH, _CHAR, _SPLIT, _ASSERT = range(4)
_CHARACTER_OPS = (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN)
_REPEAT_OPS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
_CATEGORIES = {
    _sre.CATEGORY_DIGIT: r"\d",
    _sre.CATEGORY_NOT_DIGIT: r"\D",
    _sre.CATEGORY_SPACE: r"\s",
    _sre.CATEGORY_NOT_SPACE: r"\S",
    _sre.CATEGORY_WORD: r"\w",
    _sre.CATEGORY_NOT_WORD: r"\W",
}
# Constructs only a backtracking engine can match, named so the refusal says what to remove.
_UNSUPPORTED = {
    _sre.GROUPREF: r"a backreference (\1, (?P=name))",
    _sre.GROUPREF_EXISTS: "a conditional group (?(1)...|...)",
    _sre.ASSERT: "a look-ahead or look-behind ((?=...), (?<=...))",
    _sre.ASSERT_NOT: "a negative look-ahead or look-behind ((?!...), (?<!...))",
}
for _name, _what in (
    ("ATOMIC_GROUP", "an atomic group (?>...)"),
    ("POSSESSIVE_REPEAT", "a possessive repeat (*+, ++, ?+, {m,n}+)"),
):
    if hasattr(_sre, _name):  # Python 3.11+
        _UNSUPPORTED[getattr(_sre, _name)] = _what
_CHARACTER_FLAGS = re.IGNORECASE | re.DOTALL | re.ASCII
# re's \B on an empty text changed in Python 3.14 (it now matches); follow the running one.
_NON_BOUNDARY_IN_EMPTY = re.search(r"\B", "") is not None


class SafePattern:
    r"""A regular expression whose search takes time linear in the text, whatever the pattern.

    Takes what layer patterns need (literals, classes, ``.``, ``^ $ \A \Z \b \B``, alternatives,
    groups, inline flags, every repeat) and refuses with a ``LayerSelectionError`` naming it
    what only backtracking can match: backreferences, look-arounds, conditional and atomic
    groups, possessive repeats. Captures and greediness do not matter: only whether the pattern
    occurs in a name does.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        if len(pattern) > PATTERN_CHAR_LIMIT:
            raise LayerSelectionError(
                f"a layer pattern of {len(pattern)} characters is longer than "
                f"{PATTERN_CHAR_LIMIT}; give a shorter 're:REGEX', a group or layer names"
            )
        try:
            re.compile(pattern)
            parsed = _sre_parse.parse(pattern, 0)
        except re.error as exc:
            raise LayerSelectionError(
                f"layer pattern {pattern!r} is not a valid regex: {exc}"
            ) from exc
        except (RecursionError, OverflowError) as exc:
            raise LayerSelectionError(
                f"layer pattern {pattern!r} nests too deeply; give a simpler 're:REGEX'"
            ) from exc
        if self._count(parsed) > PATTERN_STATE_LIMIT:
            raise LayerSelectionError(
                f"layer pattern {pattern!r} is too large to match safely (its counted repeats "
                f"expand to more than {PATTERN_STATE_LIMIT} steps); use fewer or smaller "
                "{m,n} repeats, or * and +"
            )
        self._kinds: list[int] = []
        self._args: list[list] = []
        self._tests: dict[tuple[str, int], Callable[[str], bool]] = {}
        self._has_assertions = False
        match = self._add(_MATCH, [])
        self._start = self._build(parsed, parsed.state.flags, match)
        self._closures: dict[tuple, tuple[frozenset[int], bool]] = {}
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self.work = 0

    # ------------------------------------------------------------------ building the automaton
    def _count(self, items) -> int:
        """States the automaton of ``items`` will have (capped just above the limit); a
        ``LayerSelectionError`` for a construct it cannot have."""
        total = 0
        for op, av in items:
            if op in _UNSUPPORTED:
                raise LayerSelectionError(
                    f"layer pattern {self.pattern!r} uses {_UNSUPPORTED[op]}, which layer "
                    "patterns do not support (they are matched without backtracking, so that no "
                    "pattern can hang); use groups, alternatives (a|b), classes and repeats"
                )
            if op in _CHARACTER_OPS or op is _sre.AT:
                size = 1
            elif op is _sre.SUBPATTERN:
                size = self._count(av[-1])
            elif op is _sre.BRANCH:
                size = sum(self._count(branch) for branch in av[1]) + len(av[1])
            elif op in _REPEAT_OPS:
                low, high, body = av
                copies = low + 1 if high == _sre.MAXREPEAT else high
                size = min(copies, PATTERN_STATE_LIMIT + 1) * (self._count(body) + 1)
            else:
                raise LayerSelectionError(
                    f"layer pattern {self.pattern!r} uses a construct ({op}) that layer "
                    "patterns do not support; use groups, alternatives (a|b), classes and repeats"
                )
            total = min(total + size, PATTERN_STATE_LIMIT + 1)
        return total

    def _add(self, kind: int, args: list) -> int:
        self._kinds.append(kind)
        self._args.append(args)
        return len(self._kinds) - 1

    def _build(self, items, flags: int, following: int) -> int:
        """The start state of ``items`` followed by state ``following`` (built back to front)."""
        for op, av in reversed(list(items)):
            following = self._build_one(op, av, flags, following)
        return following

    def _build_one(self, op, av, flags: int, following: int) -> int:
        if op in _CHARACTER_OPS:
            return self._add(_CHAR, [self._character_test(op, av, flags), following])
        if op is _sre.AT:
            self._has_assertions = True
            return self._add(_ASSERT, [av, flags, following])
        if op is _sre.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            return self._build(body, (flags | add_flags) & ~del_flags, following)
        if op is _sre.BRANCH:
            branches = av[1]
            start = self._build(branches[-1], flags, following)
            for branch in reversed(branches[:-1]):
                start = self._add(_SPLIT, [self._build(branch, flags, following), start])
            return start
        low, high, body = av  # a repeat, greedy or lazy alike
        if high == _sre.MAXREPEAT:
            loop = self._add(_SPLIT, [None, following])
            self._args[loop][0] = self._build(body, flags, loop)
            start = loop
        else:
            start = following
            for _ in range(high - low):
                start = self._add(_SPLIT, [self._build(body, flags, start), following])
        for _ in range(low):
            start = self._build(body, flags, start)
        return start

    def _character_test(self, op, av, flags: int) -> Callable[[str], bool]:
        """Whether one character matches a literal, ``.`` or a class, as ``re`` decides it."""
        if op is _sre.LITERAL:
            source = _escape(av)
        elif op is _sre.NOT_LITERAL:
            source = f"[^{_escape(av)}]"
        elif op is _sre.ANY:
            source = "."
        else:
            parts = []
            for item_op, item in av:
                if item_op is _sre.NEGATE:
                    parts.insert(0, "^")
                elif item_op is _sre.LITERAL:
                    parts.append(_escape(item))
                elif item_op is _sre.RANGE:
                    parts.append(f"{_escape(item[0])}-{_escape(item[1])}")
                else:
                    parts.append(_CATEGORIES[item])
            source = f"[{''.join(parts)}]"
        return self._test(source, flags)

    def _test(self, source: str, flags: int) -> Callable[[str], bool]:
        key = (source, flags & _CHARACTER_FLAGS)
        if key not in self._tests:
            single = re.compile(source, key[1]).fullmatch
            answers: dict[str, bool] = {}

            def test(character: str) -> bool:
                if character not in answers:
                    answers[character] = single(character) is not None
                return answers[character]

            self._tests[key] = test
        return self._tests[key]

    # ------------------------------------------------------------------ matching
    def search(self, text: str) -> bool:
        """True when the pattern occurs anywhere in ``text`` (what ``re.search`` finds)."""
        size = len(text)
        current: frozenset[int] = frozenset((self._start,))
        for position in range(size + 1):
            if position:
                current = self._step(current, text[position - 1])
            context = None
            if self._has_assertions:
                context = (
                    position == 0,
                    position == size,
                    position == size - 1,
                    text[position - 1] if position else "",
                    text[position] if position < size else "",
                )
            current, matched = self._closure(current, context)
            if matched:
                return True
        return False

    def _spend(self, steps: int) -> None:
        self.work += steps
        if self.work > PATTERN_WORK_LIMIT:
            raise LayerSelectionError(
                f"layer pattern {self.pattern!r} takes too long to match against this model's "
                "layer names; give a simpler 're:REGEX', a group or layer names"
            )

    def _step(self, states: frozenset[int], character: str) -> frozenset[int]:
        """The states after reading ``character``, and the start (a match may begin anywhere)."""
        key = (states, character)
        found = self._steps.get(key)
        if found is None:
            self._spend(len(states) + 1)
            following = {self._start}
            for state in states:
                test, target = self._args[state]
                if test(character):
                    following.add(target)
            found = self._steps[key] = frozenset(following)
        return found

    def _closure(self, states: frozenset[int], context) -> tuple[frozenset[int], bool]:
        """The character-reading states reachable without reading one, and whether the match
        state is reachable."""
        key = (states, context)
        found = self._closures.get(key)
        if found is not None:
            return found
        seen: set[int] = set()
        stack = list(states)
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = self._kinds[state]
            if kind == _SPLIT:
                stack.extend(self._args[state])
            elif kind == _ASSERT:
                code, flags, target = self._args[state]
                if self._holds(code, flags, context):
                    stack.append(target)
        self._spend(len(seen) + 1)
        kept = frozenset(state for state in seen if self._kinds[state] == _CHAR)
        found = self._closures[key] = (kept, any(self._kinds[s] == _MATCH for s in seen))
        return found

    def _holds(self, code, flags: int, context) -> bool:
        at_start, at_end, before_last, previous, following = context
        multiline = bool(flags & re.MULTILINE)
        if code is _sre.AT_BEGINNING_STRING:
            return at_start
        if code is _sre.AT_END_STRING:
            return at_end
        if code is _sre.AT_BEGINNING:
            return at_start or (multiline and previous == "\n")
        if code is _sre.AT_END:
            if multiline:
                return at_end or following == "\n"
            return at_end or (before_last and following == "\n")
        # \b and \B: a word character on one side only.
        if at_start and at_end:
            return code is _sre.AT_NON_BOUNDARY and _NON_BOUNDARY_IN_EMPTY
        word = self._test(r"\w", flags)
        boundary = (bool(previous) and word(previous)) != (bool(following) and word(following))
        return boundary if code is _sre.AT_BOUNDARY else not boundary


def _escape(code: int) -> str:
    """A character as an escape that means exactly it, inside a class or out."""
    return f"\\U{code:08x}"

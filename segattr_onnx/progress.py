"""Progress reporting for long work, kept out of the engine's logic.

The library is silent unless asked (pipelines log, they do not draw bars); the CLI asks for a
bar on stderr. Anything with ``update(n)`` and ``close()`` can be passed instead.
"""

from __future__ import annotations

import sys
from typing import Protocol


class Progress(Protocol):
    def update(self, count: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


class ClickProgress:
    """A click progress bar on stderr (click is already a dependency; no tqdm needed)."""

    def __init__(self, total: int, label: str) -> None:
        import click

        self._bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True)
        self._bar.__enter__()

    def update(self, count: int) -> None:
        self._bar.update(count)

    def close(self) -> None:
        self._bar.__exit__(None, None, None)


def make_progress(setting: bool | object, total: int, label: str) -> Progress:
    """``True`` → a bar on stderr, ``False``/``None`` → silent, a callable → ``setting(total,
    label)``, which must return an object with ``update`` and ``close``."""
    if setting is True:
        return ClickProgress(total, label)
    if not setting:
        return NoProgress()
    if callable(setting):
        return setting(total, label)
    raise TypeError("progress must be True, False or a factory (total, label) -> Progress")

"""Text from a model or a user, made safe to print on one terminal line.

Layer, tensor and output names come from the model file: a vendor's name can hold a newline
(forging an ``error:`` line for a CI log parser) or terminal escape sequences (rewriting the
screen). Everything printed passes through ``printable``, which shows such characters as
Python escapes instead of sending them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


def printable(text: str) -> str:
    """``text`` with every non-printable character (newlines, ESC, ...) written as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# Messages tell the user what to change in the words of the interface they use: an option on
# the command line, an argument in Python. The CLI sets this for the length of one command.
_COMMAND_LINE: ContextVar[bool] = ContextVar("segattr_command_line", default=False)


def setting(command_line: str, python: str) -> str:
    """``command_line`` (e.g. ``--provider cpu``) under the CLI, ``python`` (``provider="cpu"``)
    anywhere else, so that no Python user is told to pass an option they do not have."""
    return command_line if _COMMAND_LINE.get() else python


@contextmanager
def command_line_messages() -> Iterator[None]:
    """Within this block, messages name command-line options (``setting``)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)

"""Text from a model or a user, made safe to print on one terminal line.

Layer, tensor and output names come from the model file: a vendor's name can hold a newline
(forging an ``error:`` line for a CI log parser) or terminal escape sequences (rewriting the
screen). Everything printed passes through ``printable``, which shows such characters as
Python escapes instead of sending them.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character (newlines, ESC, ...) written as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

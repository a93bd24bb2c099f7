"""The error of bad input data (:class:`DataError`): its message names the file (and line) at fault."""

from __future__ import annotations

__all__ = ["DataError", "printable"]


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""


def printable(text) -> str:
    """``text`` safe to print on a terminal: control characters (escape codes) and undecodable
    bytes of file names shown as Python escapes (``\\x1b``), everything else unchanged."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s)

"""The error of bad input data (:class:`DataError`): its message names the file (and line) at fault."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""

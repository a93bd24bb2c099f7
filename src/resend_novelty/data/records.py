"""One labelled image: :class:`ImageRecord` (path, integer label, where it was listed)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ImageRecord"]


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute or root-resolved path to the image
    label: int
    source: str = ""  # "list.txt:12" or the folder it came from, for error messages

"""Atomic file writing for results (JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["write_json"]


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON; atomic (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"  # NaN/inf: an error, not bad JSON
    tmp.write_text(text)
    os.replace(tmp, path)

"""Official list files: one image a line, ``<path relative to a root> <integer label>``.

Every problem is reported with the list file and line number (bad line, negative or non-integer
label, missing image). Nothing is skipped silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DataError
from .records import ImageRecord

__all__ = ["read_list_file", "resolve_list_path"]


# Prefixes used by the official lists that do not exist on disk in our layout
# (`PACS/kfold/<domain>/...` lives at `<data-root>/pacs/<domain>/...`).
_PREFIX_ALIASES = {"PACS/kfold/": "pacs/"}

_INT_RE = re.compile(r"[+-]?[0-9]+")


def resolve_list_path(root: str | os.PathLike, rel: str) -> str:
    """Resolve a list entry under ``root``; official prefixes are mapped (``PACS/kfold/`` -> ``pacs/``).

    The literal path is tried first, so a data root laid out exactly like the official repository
    works as well.
    """
    root = Path(root)
    literal = root / rel
    if literal.exists():
        return str(literal)
    for prefix, alias in _PREFIX_ALIASES.items():
        if rel.startswith(prefix):
            return str(root / (alias + rel[len(prefix):]))
    return str(literal)


def read_list_file(
    list_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    check_exists: bool = True,
) -> list[ImageRecord]:
    """Parse an official list file into records; paths resolved under ``root`` (if given).

    Raises :class:`DataError` naming ``file:line`` for malformed lines, non-integer or negative
    labels, and (with ``check_exists``) images that do not exist. Blank lines and lines starting
    with ``#`` are ignored; an empty list is an error.
    """
    list_file = str(list_file)
    if not os.path.isfile(list_file):
        raise DataError(f"list file not found: {list_file}")
    records: list[ImageRecord] = []
    missing: list[str] = []
    with open(list_file, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig").strip()  # -sig: a BOM is not part of a path
            except UnicodeDecodeError as exc:
                raise DataError(f"{list_file}:{lineno}: not UTF-8 text ({exc.reason})") from None
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            where = f"{list_file}:{lineno}"
            if len(parts) != 2:
                raise DataError(f"{where}: expected '<path> <label>', got {line!r}")
            rel, label_s = parts
            # ASCII digits only: int() would also take '1_000' or non-ASCII digits
            if not _INT_RE.fullmatch(label_s):
                raise DataError(f"{where}: label {label_s!r} is not an integer")
            label = int(label_s)
            if label < 0:
                raise DataError(f"{where}: label {label} is negative")
            path = resolve_list_path(root, rel) if root is not None else rel
            if check_exists and not os.path.isfile(path):
                missing.append(f"{where}: image not found: {path}")
            records.append(ImageRecord(path=path, label=label, source=where))
    if missing:
        head = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{len(missing)} image(s) of {list_file} are missing:\n  {head}{more}")
    if not records:
        raise DataError(f"list file {list_file} holds no images")
    return records

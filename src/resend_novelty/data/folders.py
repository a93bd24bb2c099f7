"""Class folders (``root/<class>/<image>``) and plain image folders.

A class folder or image folder without images is an error, naming the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import DataError
from .images import IMAGE_EXTENSIONS
from .records import ImageRecord

__all__ = ["scan_class_folders", "list_images"]


def scan_class_folders(
    root: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    recursive: bool = True,
) -> tuple[list[ImageRecord], list[str]]:
    """Scan ``root/<class>/<image>``; returns records and the sorted class names (label = index).

    A class folder with no image is an error (it would silently make a class without prototype).
    Files with other extensions are ignored only if they are not images by extension; hidden
    files are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        classes = list(class_names) + unknown
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    records: list[ImageRecord] = []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue  # a requested class absent from this folder
        files = _list_images(folder, recursive)
        if not files:
            raise DataError(f"class folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        records.extend(ImageRecord(str(f), label, str(folder)) for f in files)
    return records, classes


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in it
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """All image files under ``folder`` (sorted); error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = _list_images(folder, recursive)
    if not files:
        raise DataError(f"{folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [str(f) for f in files]

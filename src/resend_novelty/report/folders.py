"""The practitioner's folders: a support folder of class sub-folders and a test folder.

- **support**: ``support/<class>/<image>`` (sub-folders of a class are searched too). Every class
  folder must hold an image; images lying directly in ``support/`` are an error (no class).
- **test**: any folder, searched recursively (symbolic links followed). The test images carry
  labels only if the folder is exactly class sub-folders (every image at ``test/<class>/<image>``).

Images: JPEG, PNG, WebP, BMP (``IMAGE_EXTENSIONS``); hidden files and folders are skipped.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import IMAGE_EXTENSIONS, DataError, scan_class_folders

__all__ = ["scan_support", "scan_test", "TestImages"]


def _images_directly_in(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def _walk_images(folder: Path) -> list[Path]:
    """Images under ``folder``, recursively, following symbolic links (each directory once)."""
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or the same directory linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def scan_support(folder: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``support/<class>/<image>`` -> (paths, integer labels, sorted class names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"support folder not found: {folder}")
    loose = _images_directly_in(folder)
    if loose:
        raise DataError(
            f"the support folder {folder} must hold one sub-folder per class "
            f"({folder}/<class>/<image>), but {len(loose)} image(s) lie directly in it, "
            f"e.g. {loose[0]}"
        )
    records, classes = scan_class_folders(folder)  # error for an empty class folder
    return [r.path for r in records], np.array([r.label for r in records]), list(classes)


@dataclass
class TestImages:
    """Test images found under a folder; ``labels`` are class-folder names, or None."""

    paths: list[str]
    labels: list[str] | None
    root: str
    layout: str  # "class folders" | "flat" | "nested"


def scan_test(folder: str | os.PathLike) -> TestImages:
    """All images under ``folder`` (recursively, symlinks followed); labelled iff exactly
    ``test/<class>/<image>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"test folder not found: {folder}")
    paths = _walk_images(folder)
    if not paths:
        raise DataError(f"the test folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    depths = {len(p.relative_to(folder).parts) for p in paths}
    if depths == {2}:
        subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        used = {p.relative_to(folder).parts[0] for p in paths}
        empty = [d.name for d in subdirs if d.name not in used]
        if empty:
            warnings.warn(
                f"test class folder(s) with no image ignored: {', '.join(empty)}", stacklevel=2
            )
        labels = [p.relative_to(folder).parts[0] for p in paths]
        return TestImages([str(p) for p in paths], labels, str(folder), "class folders")
    layout = "flat" if depths == {1} else "nested"
    return TestImages([str(p) for p in paths], None, str(folder), layout)

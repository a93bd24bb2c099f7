"""The practitioner's folders: a support folder of class sub-folders and a test folder.

- **support**: ``support/<class>/<image>`` (sub-folders of a class are searched too). Every class
  folder must hold an image; images lying directly in ``support/`` are an error (no class).
- **test**: any folder, searched recursively. The test images carry labels only if the folder is
  exactly class sub-folders (every image at ``test/<class>/<image>``).
- neither folder may lie inside the other (:func:`check_disjoint`).

Both are searched by the one walker of :func:`resend_novelty.data.walk_images` (images: JPEG,
PNG, WebP, BMP by extension; hidden entries skipped; symbolic links followed, each folder once);
what it skips is reported as one warning line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import (IMAGE_EXTENSIONS, DataError, printable, scan_class_folders, walk_images,
                    warn_skipped)

__all__ = ["scan_support", "scan_test", "TestImages", "check_disjoint"]


def _check_utf8(paths) -> None:
    """File names must be valid UTF-8 (they are written to scores.csv): checked before any work."""
    for p in paths:
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"file name is not valid UTF-8: {printable(p)} (rename it)") from None


def check_disjoint(support: str | os.PathLike, test: str | os.PathLike) -> None:
    """Refuse a test folder inside the support folder (or the reverse): its images would be both."""
    s, t = Path(os.path.realpath(support)), Path(os.path.realpath(test))
    if s == t or s in t.parents or t in s.parents:
        inner, outer = ("test", "support") if s == t or s in t.parents else ("support", "test")
        raise DataError(
            f"the {inner} folder {test if inner == 'test' else support} lies inside the {outer} "
            f"folder {support if outer == 'support' else test}: its images would count as both"
        )


def scan_support(folder: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``support/<class>/<image>`` -> (paths, integer labels, sorted class names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"support folder {'is not a folder' if folder.exists() else 'not found'}: {folder}")
    loose, _ = walk_images(folder, recursive=False)
    if loose:
        raise DataError(
            f"the support folder {folder} must hold one sub-folder per class "
            f"({folder}/<class>/<image>), but {len(loose)} image(s) lie directly in it, "
            f"e.g. {loose[0]}"
        )
    records, classes = scan_class_folders(folder)  # error for an empty class folder
    _check_utf8([r.path for r in records])
    seen: dict[str, int] = {}
    for r in records:  # one file reached through links under two classes
        real = os.path.realpath(r.path)
        if seen.setdefault(real, r.label) != r.label:
            raise DataError(f"the support image {real} is in two classes ({classes[seen[real]]} "
                            f"and {classes[r.label]}), e.g. through a link: {r.path}")
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
        raise DataError(f"test folder {'is not a folder' if folder.exists() else 'not found'}: {folder}")
    paths, skipped = walk_images(folder)
    warn_skipped(skipped, folder)
    _check_utf8(paths)
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

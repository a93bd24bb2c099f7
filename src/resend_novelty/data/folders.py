"""Class folders (``root/<class>/<image>``) and plain image folders, found by one walker.

:func:`walk_images` is the one rule for which files under a folder are images, used for the
support set and the test set alike:

- an image is a regular file whose extension is one of :data:`IMAGE_EXTENSIONS`
  (case-insensitive); every other entry is skipped;
- hidden files and folders (name starting with ``.``) are skipped;
- symbolic links to files and folders are followed; a folder reached a second time (a link
  loop, or the same folder linked twice) is searched once;
- what is skipped is reported, not dropped silently: :func:`warn_skipped` emits one warning
  line naming the entries and why (hidden entries are only counted). Skipped are: files of
  other formats (``.tif``, ``.gif``, ...), FIFOs / sockets / devices (never opened), broken
  links, folders that cannot be read.

A class folder or image folder without images is an error, naming the folder.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import DataError, printable
from .images import IMAGE_EXTENSIONS
from .records import ImageRecord

__all__ = ["Skipped", "SkippedFilesWarning", "walk_images", "warn_skipped", "scan_class_folders",
           "list_images"]

_SHOWN = 5  # skipped entries named in the warning line


class SkippedFilesWarning(UserWarning):
    """Entries under a data folder that are not used as images (named in the message)."""


@dataclass(frozen=True)
class Skipped:
    """An entry the walker did not use, and why."""

    path: str
    reason: str


def _folder_error(folder: Path, what: str) -> DataError:
    if folder.exists() or folder.is_symlink():
        kind = "not a folder" if not folder.is_symlink() or folder.exists() else "a broken link"
        return DataError(f"{what} is {kind}: {folder}")
    return DataError(f"{what} not found: {folder}")


def walk_images(
    folder: str | os.PathLike, recursive: bool = True
) -> tuple[list[Path], list[Skipped]]:
    """Images under ``folder`` (sorted) and the entries skipped, by the module's one rule."""
    folder = Path(folder)
    found: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()

    def visit(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as exc:
            skipped.append(Skipped(str(d), f"cannot read folder: {exc.strerror or exc}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.append(Skipped(str(d), "folder already searched (link loop or duplicate link)"))
            return
        seen.add(key)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(Skipped(str(d), f"cannot read folder: {exc.strerror or exc}"))
            return
        for e in entries:
            p = d / e.name
            if e.name.startswith("."):
                skipped.append(Skipped(str(p), "hidden"))
                continue
            try:
                mode = os.stat(p).st_mode  # follows links
            except OSError as exc:
                reason = "broken link" if e.is_symlink() else f"cannot read: {exc.strerror or exc}"
                skipped.append(Skipped(str(p), reason))
                continue
            if stat.S_ISDIR(mode):
                if recursive:
                    visit(p)
                else:
                    skipped.append(Skipped(str(p), "sub-folder (not searched)"))
            elif not stat.S_ISREG(mode):
                skipped.append(Skipped(str(p), "not a regular file (FIFO, socket or device)"))
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(p)
            else:
                skipped.append(Skipped(str(p), "not a JPEG/PNG/WebP/BMP file by its extension"))

    visit(folder)
    return sorted(found), skipped


def warn_skipped(skipped: Sequence[Skipped], where: str | os.PathLike, stacklevel: int = 2) -> None:
    """One :class:`SkippedFilesWarning` line naming what was skipped under ``where`` (if any)."""
    hidden = [s for s in skipped if s.reason == "hidden"]
    named = [s for s in skipped if s.reason != "hidden"]
    if not named and not hidden:
        return
    parts = [f"{_printable(s.path)} ({s.reason})" for s in named[:_SHOWN]]
    if len(named) > _SHOWN:
        parts.append(f"and {len(named) - _SHOWN} more")
    if hidden:
        parts.append(f"{len(hidden)} hidden file(s)/folder(s)")
    warnings.warn(
        f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} under {_printable(where)}: "
        + "; ".join(parts), SkippedFilesWarning, stacklevel=stacklevel + 1,
    )


def _printable(path) -> str:
    return printable(os.fspath(path))


def scan_class_folders(
    root: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    recursive: bool = True,
    report_skipped: bool = True,
) -> tuple[list[ImageRecord], list[str]]:
    """Scan ``root/<class>/<image>``; returns records and the sorted class names (label = index).

    The class folders are the non-hidden sub-folders of ``root`` (links followed); their images
    are found by :func:`walk_images`. A class folder with no image is an error (it would silently
    make a class without prototype). Skipped entries (files directly in ``root`` included) are
    reported by one :class:`SkippedFilesWarning` unless ``report_skipped=False``.
    """
    root = Path(root)
    if not root.is_dir():
        raise _folder_error(root, "image folder")
    top, skipped = walk_images(root, recursive=False)
    skipped = [s for s in skipped if s.reason != "sub-folder (not searched)"]
    skipped += [Skipped(str(p), "image not in a class folder") for p in top]
    classes = sorted(p.name for p in _class_dirs(root))
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
        files, skip = walk_images(folder, recursive)
        skipped += skip
        if not files:
            raise DataError(f"class folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        records.extend(ImageRecord(str(f), label, str(folder)) for f in files)
    if report_skipped:
        warn_skipped(skipped, root)
    return records, classes


def _class_dirs(root: Path) -> list[Path]:
    out = []
    with os.scandir(root) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                if stat.S_ISDIR(os.stat(root / e.name).st_mode):
                    out.append(root / e.name)
            except OSError:
                continue  # a broken link: reported by walk_images
    return out


def list_images(
    folder: str | os.PathLike, recursive: bool = True, report_skipped: bool = True
) -> list[str]:
    """All image files under ``folder`` (sorted, by :func:`walk_images`); error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _folder_error(folder, "image folder")
    files, skipped = walk_images(folder, recursive)
    if not files:
        raise DataError(f"{folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    if report_skipped:
        warn_skipped(skipped, folder)
    return [str(f) for f in files]

"""Image datasets: official list files and class folders.

List files use the official ReSeND format, one image a line::

    <path relative to a root> <integer label>

Every problem is reported with the list file and line number (bad line, negative or non-integer
label, missing image) or the image path (zero-byte, truncated or undecodable image). Nothing is
skipped silently.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "ImageRecord",
    "read_list_file",
    "resolve_list_path",
    "scan_class_folders",
    "load_image",
    "ImageDataset",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute or root-resolved path to the image
    label: int
    source: str = ""  # "list.txt:12" or the folder it came from, for error messages


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB (grayscale, palette and RGBA converted); errors name the file."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


class ImageDataset:
    """Map-style dataset over image records: ``ds[i] -> (tensor, label)``."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable | None = None):
        self.records = list(records)
        self.transform = transform

    @classmethod
    def from_list(cls, list_file, root=None, transform=None) -> "ImageDataset":
        return cls(read_list_file(list_file, root), transform)

    @classmethod
    def from_folder(cls, root, transform=None) -> "ImageDataset":
        records, _ = scan_class_folders(root)
        return cls(records, transform)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.records]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int):
        rec = self.records[idx]
        img = load_image(rec.path)
        x = self.transform(img) if self.transform is not None else img
        return x, rec.label

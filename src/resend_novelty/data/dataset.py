"""Map-style dataset over image records (from a list file or class folders): ``ds[i] -> (x, label)``."""

from __future__ import annotations

from typing import Callable, Sequence

from .folders import scan_class_folders
from .images import load_image
from .lists import read_list_file
from .records import ImageRecord

__all__ = ["ImageDataset"]


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

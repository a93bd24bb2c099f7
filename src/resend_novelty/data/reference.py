"""The reference set: the labelled images that pretraining and its validation draw from.

A reference set is a class-folder root (``DIR/<class>/<image>``) or a list file
(``<path> <label>`` per line). Its images are listed per class in natural file order
(:func:`reference_records`); whole classes are held out of pretraining by a seeded draw
(:func:`split_validation`), and the same draw gives the classes of the synthetic domain-shift
proxy (:mod:`resend_novelty.evaluation.proxy`). Stylised views of reference images use the
styles of :data:`STYLE_ORDER` in turn (:class:`resend_novelty.data.augment.DomainShiftView`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from .folders import scan_class_folders
from .lists import read_list_file
from .records import ImageRecord

__all__ = ["STYLE_ORDER", "natural_key", "reference_records", "split_validation"]

# the styles of the stylised views, in the order view v = STYLE_ORDER[v] is used
STYLE_ORDER = ("sketch", "cartoon", "painting", "grayscale")


def natural_key(path: str) -> list:
    """Sort key of a file name with its digit runs compared as numbers (``img2`` < ``img10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def reference_records(data: str, root: str | None = None,
                      max_per_class: int = 0) -> tuple[list[ImageRecord], list[str]]:
    """The images of a reference set, class by class, each class in natural file order.

    ``data``: a class-folder root or a list file (its paths resolved under ``root``);
    ``max_per_class``: keep the first N images of each class (0 = all). Returns
    ``(records, class names)``; the class names of a list file are its labels as strings.
    """
    if os.path.isdir(data):
        records, classes = scan_class_folders(data)
    else:
        records = read_list_file(data, root)
        classes = [str(c) for c in sorted({r.label for r in records})]
    by_class: dict[int, list[ImageRecord]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    out = []
    for label in sorted(by_class):
        recs = sorted(by_class[label], key=lambda r: natural_key(r.path))
        out.extend(recs[:max_per_class] if max_per_class else recs)
    return out, classes


def split_validation(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``n_val`` whole classes (seeded choice); returns (train mask, val class ids)."""
    classes = np.unique(labels)
    if n_val <= 0:
        return np.ones(len(labels), bool), np.array([], dtype=labels.dtype)
    if n_val > len(classes) - 2:
        raise ValueError(f"val_classes={n_val} leaves fewer than 2 training classes")
    rng = np.random.default_rng([seed, 7919])
    val = np.sort(rng.choice(classes, size=n_val, replace=False))
    return ~np.isin(labels, val), val

"""Reference items for frozen-backbone pretraining: cached backbone features (+ stylised views).

The stylised views (sketch, cartoon, painting, grayscale; :mod:`resend_novelty.data.augment`)
join the reference set as extra items of their class, so that same-class pairs span domains;
each image item records its domain (0 = the original image, 1 + v = stylised view v of
:data:`resend_novelty.data.STYLE_ORDER`), which per-domain normalisation
(:func:`center_by_domain`) uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file

from ..backbones import build_backbone
from ..data import STYLE_ORDER, DataError, DomainShiftView, ImageRecord, reference_records
from ..features import check_features, extract_features
from ..transforms import normalize_by_domain

__all__ = ["ReferenceSet", "load_reference_features", "center_by_domain"]


@dataclass
class ReferenceSet:
    features: torch.Tensor | None  # (N, D) in frozen mode
    labels: np.ndarray  # (N,)
    paths: list[str]  # image of each item ("" for precomputed features)
    is_view: np.ndarray  # item is a stylised view
    class_names: list[str]
    domain: np.ndarray | None = None  # 0 = original image, 1 + v = stylised view v


def _features_file(path: str) -> ReferenceSet:
    """A .safetensors file with 'features' (N, D) and 'labels' (N,) tensors."""
    try:
        t = load_file(path)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise DataError(f"cannot read features file {path}: {exc}") from None
    if "features" not in t or "labels" not in t:
        raise DataError(f"{path} must hold 'features' and 'labels' tensors")
    raw = t["labels"]
    if raw.ndim != 1:
        raise DataError(f"{path}: 'labels' must be one integer per row, got shape {tuple(raw.shape)}")
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise DataError(f"{path}: 'labels' must be integers, got {raw.dtype} (would be truncated)")
    labels = raw.numpy().astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: 'labels' must be >= 0, got {int(labels.min())}")
    n = len(labels)
    feats = t["features"].float()
    if feats.ndim != 2 or feats.shape[0] != n:
        raise DataError(f"{path}: features {tuple(feats.shape)} do not match {n} labels")
    feats = check_features(feats, f"features of {path}")  # no NaN/inf
    return ReferenceSet(feats, labels, [""] * n, np.zeros(n, bool),
                        [str(c) for c in np.unique(labels)])


def load_reference_features(data: str, backbone: str = "efficientnet_lite0", *,
                            root: str | None = None, max_per_class: int = 0,
                            style_views: int = 0, workers: int = 4,
                            progress: bool = True) -> ReferenceSet:
    """Reference items with their backbone features (cached on disk by the extractor).

    ``data``: a class-folder root or a list file (paths under ``root``), read by
    :func:`resend_novelty.data.reference_records` (``max_per_class``), or a ``.safetensors``
    file of precomputed ``features`` and ``labels`` (the other options are then unused).
    ``style_views``: the first N images of each class get one stylised view each, the styles of
    :data:`~resend_novelty.data.STYLE_ORDER` in turn (image i of a class gets style
    ``i % 4``); ``workers``: image-decoding processes.
    """
    if data.endswith(".safetensors"):
        return _features_file(data)
    records, classes = reference_records(data, root, max_per_class)
    bb = build_backbone(backbone)
    paths = [r.path for r in records]
    feats = [extract_features(bb, paths, desc="reference features", progress=progress,
                              num_workers=workers)]
    labels = [np.array([r.label for r in records])]
    all_paths = list(paths)
    is_view = [np.zeros(len(records), bool)]
    domain = [np.zeros(len(records), np.int64)]
    if style_views:
        by_class: dict[int, list[ImageRecord]] = {}
        for r in records:
            by_class.setdefault(r.label, []).append(r)
        for v, _ in enumerate(STYLE_ORDER):
            sel = [rec for label in sorted(by_class)
                   for i, rec in enumerate(by_class[label][:style_views])
                   if i % len(STYLE_ORDER) == v]
            if not sel:
                continue
            aug = DomainShiftView(v, bb.transform, STYLE_ORDER)
            feats.append(extract_features(
                bb, [r.path for r in sel], desc=f"{aug.style} views", progress=progress,
                transform=aug, namespace_suffix=aug.namespace_suffix, num_workers=workers))
            labels.append(np.array([r.label for r in sel]))
            all_paths += [r.path for r in sel]
            is_view.append(np.ones(len(sel), bool))
            domain.append(np.full(len(sel), 1 + v, np.int64))
    return ReferenceSet(torch.cat(feats), np.concatenate(labels), all_paths,
                        np.concatenate(is_view), classes, np.concatenate(domain))


def center_by_domain(feats: torch.Tensor, domain: np.ndarray, fit_mask: np.ndarray,
                     mode: str = "center") -> torch.Tensor:
    """Normalise every item with the statistics of its domain (computed over ``fit_mask`` items):
    ``mode`` "center" subtracts the domain mean, "standardize" also divides by its std
    (:func:`resend_novelty.transforms.normalize_by_domain`)."""
    return normalize_by_domain(feats, domain, mode, fit_mask)

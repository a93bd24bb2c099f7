"""Support statistics of prototype detectors: class means and leave-one-out similarities.

Calibration scores each support image *leave-one-out*: the prototype of its own class is
recomputed without it, the other prototypes are unchanged, so it is scored like an unseen image
of a known class (:func:`leave_one_out_similarities`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["class_means", "leave_one_out_similarities"]


def class_means(features: torch.Tensor, index: torch.Tensor, n_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means (K, D), counts (K,))`` of the rows of ``features`` per class ``index`` (0..K-1)."""
    protos = torch.zeros(n_classes, features.shape[1])
    protos.index_add_(0, index, features)
    counts = torch.bincount(index, minlength=n_classes).clamp_min(1)
    return protos / counts[:, None], counts


def leave_one_out_similarities(similarities: Callable[..., torch.Tensor],
                               prototypes: torch.Tensor, features: torch.Tensor,
                               index: np.ndarray, block: int = 16, progress: bool = False
                               ) -> tuple[torch.Tensor, np.ndarray]:
    """Leave-one-out similarities ``u`` ``(N, K)`` of the support ``features`` (row i of class
    ``index[i]``) w.r.t. their class means ``prototypes``.

    For image i of class c (n_c images) the prototype of c becomes
    ``(n_c * p_c - f_i) / (n_c - 1)``; the other prototypes are unchanged.
    ``similarities(features, prototypes=P)`` is the detector's u against any prototypes ``P``;
    the similarity of each image to its own LOO prototype is the diagonal of u of a block of
    ``block`` images against their ``block`` LOO prototypes (``block`` x more pairs than
    needed, ``N / block`` calls). Returns ``(u, used)``: ``used`` marks the images in classes
    with >= 2 images (the rows of ``u`` that are leave-one-out similarities); the other rows
    are similarities to the full prototypes.
    """
    n_classes = prototypes.shape[0]
    u = similarities(features).clone()  # (N, K), full prototypes
    used = np.zeros(len(index), dtype=bool)
    counts = np.bincount(index, minlength=n_classes)
    bar = tqdm(total=int(counts[counts >= 2].sum()), desc="leave-one-out calibration",
               unit="img", disable=not progress)
    protos64 = prototypes.double()
    feats64 = features.double()
    for k in range(n_classes):
        members = np.flatnonzero(index == k)
        n = len(members)
        if n < 2:
            continue
        used[members] = True
        for start in range(0, n, block):
            rows = torch.as_tensor(members[start : start + block])
            loo = ((n * protos64[k] - feats64[rows]) / (n - 1)).float()
            s = similarities(features[rows], prototypes=loo)  # (B, B)
            u[rows, k] = torch.diagonal(s)
            bar.update(len(rows))
    bar.close()
    return u, used

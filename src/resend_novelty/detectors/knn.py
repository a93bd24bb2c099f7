"""Class-wise k-nearest-neighbour detector (paper Table 2 baseline).

u_k = mean cosine similarity of the test feature to its ``k`` nearest support features of class
k (all of them if the class has fewer); normality = max_k u_k. A class-wise variant of deep-kNN
(Sun et al., ICML 2022), whose score is the distance to the k-th nearest support feature
regardless of class; the class-wise form also gives a closed-set prediction (argmax_k u_k).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .prototype import PrototypeDetector

__all__ = ["KNNDetector"]


class KNNDetector(PrototypeDetector):
    """u_k = mean cosine to the ``k`` nearest support features of class k; normality = max_k u_k."""

    name = "knn"
    cli_params = {"knn_k": "k"}
    description = "max over classes of the mean cosine to the K nearest support features of the class"

    def __init__(self, k: int = 10, chunk: int = 1024, **kwargs):
        super().__init__(**kwargs)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.chunk = int(chunk)

    def fit_features(self, features, labels, domains=None) -> "KNNDetector":
        super().fit_features(features, labels, domains=domains)
        self._restore_fitted()
        return self

    def _restore_fitted(self) -> None:
        feats = self.support_features_  # domain-normalised like the test features (center=)
        idx = self.support_index_
        self._support = F.normalize(feats, dim=1)
        self._members = [torch.as_tensor(np.flatnonzero(idx == k)) for k in range(len(self.classes_))]

    def _class_means(self, sims: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) similarities to the support -> (N, K) mean of the top-k of each class."""
        out = torch.empty(sims.shape[0], len(self.classes_))
        for k, members in enumerate(self._members):
            s = sims[:, members]
            n = s.shape[1]
            if exclude is None or n > self.k:
                if exclude is not None:  # leave-one-out: an image is not its own neighbour
                    s = s.masked_fill(exclude[:, members], -math.inf)  # >= k others remain
                out[:, k] = s.topk(min(self.k, n), dim=1).values.mean(dim=1)
            else:  # a class of <= k images: the mean over all of them, minus the excluded one
                ex = exclude[:, members]
                count = (n - ex.sum(dim=1)).clamp_min(0)
                mean = s.masked_fill(ex, 0.0).sum(dim=1) / count.clamp_min(1)
                out[:, k] = torch.where(count > 0, mean, torch.full_like(mean, -math.inf))
        return out

    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        """u ``(N, K)`` from the support features themselves (``prototypes`` is not used)."""
        q = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
        return torch.cat([self._class_means(q[i : i + self.chunk] @ self._support.T)
                          for i in range(0, len(q), self.chunk)]) if len(q) else \
            torch.empty(0, len(self.classes_))

    def loo_scores_features(self, features, labels, block: int = 16):
        """Leave-one-out scores of the support images: each is excluded from its own neighbours.

        ``features``/``labels`` must be the support set the detector was fitted on.
        """
        features = self.prepare_features(features)
        labels = np.asarray(labels)
        if features.shape[0] != self._support.shape[0]:
            raise ValueError("kNN leave-one-out scores need the fitted support features")
        idx = np.searchsorted(self.classes_, labels)
        counts = np.bincount(idx, minlength=len(self.classes_))
        used = counts[idx] >= 2
        scores = []
        q = F.normalize(features, dim=1)
        for i in range(0, len(q), self.chunk):
            rows = torch.arange(i, min(i + self.chunk, len(q)))
            exclude = torch.zeros(len(rows), len(q), dtype=torch.bool)
            exclude[torch.arange(len(rows)), rows] = True
            scores.append(self._class_means(q[rows] @ self._support.T, exclude))
        u = torch.cat(scores)[torch.as_tensor(used)]
        return self.normality_from_similarities(u).numpy(), used

"""The reference closed-set classifier of the OSDG benchmark and out-of-fold source scores.

:func:`train_linear_classifier` fits an ERM linear head (:class:`LinearClassifier`) on frozen
backbone features. :func:`crossfit_source_scores` gives *out-of-fold* scores of the support
(source) set: the classifier and a novelty detector are refitted on k-1 folds and score the
held-out fold, so that the source-based threshold is not set on the overconfident scores of the
classifier's own training samples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from ..detectors import fit_support
from .probabilities import classifier_probabilities

__all__ = ["LinearClassifier", "train_linear_classifier", "crossfit_source_scores"]


class LinearClassifier(nn.Module):
    """Linear head on standardised frozen features; ``forward`` returns logits.

    ``classes_`` maps output columns to labels (sorted known labels).
    """

    def __init__(self, in_dim: int, classes, mean=None, std=None):
        super().__init__()
        self.classes_ = np.asarray(classes)
        self.register_buffer("mean", torch.zeros(in_dim) if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("std", torch.ones(in_dim) if std is None else torch.as_tensor(std).float())
        self.linear = nn.Linear(in_dim, len(self.classes_))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)

    def predict_proba(self, features) -> np.ndarray:
        return classifier_probabilities(self, features, outputs="logits")

    def predict(self, features) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]


def train_linear_classifier(
    features,
    labels,
    seed: int = 0,
    weight_decay: float = 1e-2,
    max_iter: int = 100,
    classes: Sequence[int] | None = None,
) -> LinearClassifier:
    """ERM linear head (multinomial logistic regression) on frozen backbone features.

    Features are standardised with their mean/std, then the head is fitted full-batch with
    L-BFGS on ``mean cross-entropy + weight_decay/2 * ||W||^2`` (a convex problem; ``seed``
    fixes the initialisation, so the result is reproducible). ``classes`` sets the output
    columns (default: the sorted labels present); CPU, a second or two for a few thousand
    samples.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y_lab = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    if y_lab.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} features but {y_lab.shape} labels")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    classes = np.unique(y_lab) if classes is None else np.asarray(classes)
    if not np.isin(y_lab, classes).all():
        raise ValueError("some labels are not in classes")
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {classes.tolist()}")
    y = torch.as_tensor(np.searchsorted(classes, y_lab))
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    model = LinearClassifier(x.shape[1], classes, mean, std)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(model.linear.weight.shape, generator=gen) * 0.01)
        model.linear.bias.zero_()
    xs = (x - mean) / std
    opt = torch.optim.LBFGS(
        model.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model.linear(xs), y)
        loss = loss + 0.5 * weight_decay * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    model.eval()
    return model


def crossfit_source_scores(
    labels,
    classifier_features=None,
    detector_features=None,
    make_detector: Callable[[], object] | None = None,
    folds: int = 5,
    seed: int = 0,
    domains=None,
    **train_kwargs,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Out-of-fold source scores for the source-based threshold and normalisation statistics.

    The support set is split into ``folds`` stratified folds; for each fold, the linear
    classifier (on ``classifier_features``) and a fresh detector (``make_detector()`` fitted on
    ``detector_features``) are fitted on the other folds and score the held-out one. Returns
    ``(probs (N, K), novelty (N,))``; either is None when its features are not given.
    ``domains`` (one source-domain id per sample, multi-source): the detector is fitted with
    them and scores the held-out samples of each domain as one batch, so that detectors with
    per-domain normalisation see one domain at a time, as at test time.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    n = len(labels)
    min_count = np.bincount(np.searchsorted(classes, labels)).min()
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if min_count < folds:
        raise ValueError(
            f"the smallest known class has {min_count} support sample(s): cannot make {folds} "
            "stratified folds (lower --folds or pass a fixed --threshold)"
        )
    probs = np.zeros((n, len(classes))) if classifier_features is not None else None
    novelty = np.zeros(n) if detector_features is not None else None
    if detector_features is not None and make_detector is None:
        raise ValueError("detector_features need make_detector")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in skf.split(np.zeros(n), labels):
        if probs is not None:
            cf = np.asarray(classifier_features)
            clf = train_linear_classifier(cf[tr], labels[tr], seed=seed, classes=classes, **train_kwargs)
            probs[te] = clf.predict_proba(cf[te])
        if novelty is not None:
            df = torch.as_tensor(np.asarray(detector_features), dtype=torch.float32)
            det = make_detector()
            if domains is None:
                fit_support(det, df[tr], labels[tr])
                novelty[te] = det.score_features(df[te])
            else:
                dom = np.asarray(domains)
                fit_support(det, df[tr], labels[tr], dom[tr])
                for d in np.unique(dom[te]):  # one batch per domain, as at test time
                    rows = te[dom[te] == d]
                    novelty[rows] = det.score_features(df[rows])
    return probs, novelty

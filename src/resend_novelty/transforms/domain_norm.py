"""Transductive, label-free feature normalisation per image domain (not in the paper).

A whole domain (all sketches, all paintings) shifts backbone features in a common direction and
changes their spread. Normalising each domain's features with that domain's own statistics
removes much of this shift without any label:

- ``center``: ``x - mean_d``;
- ``standardize``: ``(x - mean_d) / std_d`` per feature dimension (first and second moments
  matched, as in AdaBN-style domain adaptation, but on the pooled backbone features).

Pretraining applies it per reference domain (original images, each stylised view); detectors
apply it to the support set (per source domain where the domains are known) and to the test
features scored together (*transductive*), or - with ``per_image=True`` - to each test feature
with the statistics of the support set, so that no statistic of any other test image is used
(each image is scored as if alone). With a *shift gate* (``shift_threshold > 0``, not in the
paper) the test features get their own statistics only when they differ from the support: when
the support and the test batch are close (:func:`shift_gap` at most the threshold), both are
normalised with one set of statistics of support and test together (*pooled*), so that
classes present in the test batch but not in the support do not shift the test features
against the support. ``std_d`` is floored at ``STD_FLOOR`` times the median std of the
domain, so that a dimension that is (almost) constant in one domain is not blown up.

The functions work on one set of features; :class:`DomainNormalizer` is the fit/transform object
detectors compose: ``fit_transform(support, domains)`` on the support set,
``transform(test)`` on the test features scored together, ``set_statistics(stream)`` to fix the
test statistics for a stream of small batches.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from ..models import check_shift_threshold

__all__ = ["MODES", "STD_FLOOR", "as_mode", "domain_statistics", "normalize",
           "normalize_by_domain", "mean_direction", "shift_gap", "DomainNormalizer"]

MODES = ("none", "center", "standardize")
STD_FLOOR = 0.1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"domain normalisation must be one of {MODES}, got {mode!r}")


def as_mode(center) -> str:
    """The mode meant by a ``center=`` argument: False/None -> "none", True -> "center", or one
    of :data:`MODES` by name."""
    if center is None or center is False:
        return "none"
    if center is True:
        return "center"
    if isinstance(center, str) and center in MODES:
        return center
    raise ValueError(f"center must be True, False or one of {MODES}, got {center!r}")


def domain_statistics(features: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, std)`` of ``features`` (N, D) for ``mode``; ``std`` is None unless standardising."""
    _check_mode(mode)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"domain statistics need (N >= 1, D) features, got {tuple(features.shape)}")
    mean = features.mean(dim=0)
    if mode != "standardize":
        return mean, None
    if features.shape[0] < 2:
        raise ValueError("standardising needs at least 2 features of the domain")
    std = features.std(dim=0)
    return mean, std.clamp_min(STD_FLOOR * float(std.median()) + 1e-12)


def normalize(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None) -> torch.Tensor:
    """``features - mean``, divided by ``std`` unless it is None."""
    out = features - mean
    return out / std if std is not None else out


def mean_direction(features: torch.Tensor) -> torch.Tensor:
    """The mean of the unit-length rows of ``features`` (N, D): where a set of images points."""
    return torch.nn.functional.normalize(features.float(), dim=1).mean(dim=0)


def shift_gap(support_direction: torch.Tensor, features: torch.Tensor) -> float:
    """``1 - cos(support direction, mean direction of features)``: 0 when the test features
    point where the support does; a style shift (photos -> sketches) makes it large. Class
    composition alone (test classes that the support lacks) moves it too, less."""
    t = mean_direction(features)
    return float(1.0 - torch.nn.functional.cosine_similarity(support_direction, t, dim=0))


Statistics = Callable[[torch.Tensor, str], "tuple[torch.Tensor, torch.Tensor | None]"]


def normalize_by_domain(features: torch.Tensor, domains, mode: str,
                        fit_mask: np.ndarray | None = None,
                        statistics: Statistics | None = None) -> torch.Tensor:
    """Normalise every row with the statistics of its domain (``domains``: one id per row).

    ``fit_mask`` restricts the rows the statistics are computed from (e.g. training classes
    only); every row is normalised. ``mode="none"`` returns ``features`` unchanged.
    ``statistics``: the ``(features, mode) -> (mean, std)`` estimator (default
    :func:`domain_statistics`).
    """
    statistics = statistics or domain_statistics
    _check_mode(mode)
    if mode == "none":
        return features
    domains = np.asarray(domains)
    if domains.shape != (features.shape[0],):
        raise ValueError(f"{features.shape[0]} features but {domains.size} domain ids")
    fit = np.ones(len(domains), bool) if fit_mask is None else np.asarray(fit_mask, bool)
    out = features.clone()
    for d in np.unique(domains):
        rows = torch.as_tensor(np.flatnonzero(domains == d))
        fit_rows = torch.as_tensor(np.flatnonzero((domains == d) & fit))
        if len(fit_rows) == 0:
            raise ValueError(f"domain {d!r} has no row to compute its statistics from")
        mean, std = statistics(features[fit_rows], mode)
        out[rows] = normalize(features[rows], mean, std)
    return out


class DomainNormalizer:
    """Transductive per-domain normalisation (``mode``: one of :data:`MODES`) as an object.

    - :meth:`fit_transform` ``(support, domains=None)``: support statistics ``support_mean_`` /
      ``support_std_`` of the whole support set; the support is normalised per source domain
      when ``domains`` (one id per row) is given, with the support statistics otherwise.
    - :meth:`transform` ``(test)``: test features scored together are normalised with their own
      statistics (their domain); with ``test_mean_`` fixed by :meth:`set_statistics`, with
      those; a batch smaller than ``min_batch`` without them uses the support statistics (no
      domain shift assumed) and warns.
    - :meth:`set_statistics` ``(features)``: fix ``test_mean_`` / ``test_std_`` from many test
      features ``(N, D)`` (a first batch of a stream), or a ``(D,)`` mean when only centring;
      ``None`` goes back to the statistics of each batch.

    ``per_image=True``: test features are always normalised with the support statistics, whatever
    the batch (no statistic of any other test image is used; the result of a batch equals that of
    its images one by one); :meth:`set_statistics` is then refused.

    ``shift_threshold`` (default 0 = off): the shift gate. A transductive batch (or the features
    given to :meth:`set_statistics`) whose :func:`shift_gap` to the support is at most the
    threshold is *pooled*: :meth:`pooled` says so, and :meth:`pooled_statistics` gives the
    statistics of support and test together, which the caller applies to both (the support
    references must be normalised again with them). The gate needs one support domain
    (``domains`` not given at fit) and a batch of at least ``min_batch`` features; otherwise the
    batch is normalised as without it.

    ``statistics``: the ``(features, mode) -> (mean, std)`` estimator (default
    :func:`domain_statistics`).
    """

    def __init__(self, mode: str = "none", min_batch: int = 16,
                 statistics: Statistics | None = None, per_image: bool = False,
                 shift_threshold: float = 0.0):
        _check_mode(mode)
        if not isinstance(per_image, (bool, np.bool_)):
            raise ValueError(f"per_image must be True or False, got {per_image!r}")
        self.mode = mode
        self.min_batch = int(min_batch)
        self.statistics = statistics or domain_statistics
        self.per_image = bool(per_image)
        self.shift_threshold = check_shift_threshold(shift_threshold)
        self.test_mean_ = self.test_std_ = None
        self.test_pooled_ = False  # the fixed test statistics are pooled ones
        self.support_direction_ = None  # mean_direction of the support (one support domain)

    @property
    def active(self) -> bool:
        """Whether features are normalised at all (mode other than "none")."""
        return self.mode != "none"

    def fit_transform(self, features: torch.Tensor, domains=None) -> torch.Tensor:
        """Support statistics of ``features`` and the normalised support (unchanged when the
        mode is "none")."""
        if not self.active:
            return features
        self.support_mean_, self.support_std_ = self.statistics(features, self.mode)
        self.support_direction_ = mean_direction(features) if domains is None else None
        if domains is None:
            return normalize(features, self.support_mean_, self.support_std_)
        return normalize_by_domain(features, domains, self.mode, statistics=self.statistics)

    def support_features(self, normalized: torch.Tensor) -> torch.Tensor:
        """The support features as they were before :meth:`fit_transform` (one support domain),
        from their normalised values."""
        out = normalized * self.support_std_ if self.support_std_ is not None else normalized
        return out + self.support_mean_

    def pooled(self, features: torch.Tensor) -> bool:
        """Whether the transductive batch ``features`` is normalised with pooled statistics
        (the shift gate is closed for it; see the class docstring)."""
        if self.test_mean_ is not None:
            return self.test_pooled_
        return (self.active and not self.per_image and self.shift_threshold > 0
                and self.support_direction_ is not None
                and features.shape[0] >= max(2, self.min_batch)
                and shift_gap(self.support_direction_, features) <= self.shift_threshold)

    def pooled_statistics(self, features: torch.Tensor, support: torch.Tensor):
        """``(mean, std)`` of the test ``features`` and the (unnormalised) ``support`` together;
        the fixed ones when :meth:`set_statistics` pooled them."""
        if self.test_mean_ is not None and self.test_pooled_:
            return self.test_mean_, self.test_std_
        return self.statistics(torch.cat([support, features]), self.mode)

    def set_statistics(self, features: torch.Tensor | None,
                       support: torch.Tensor | None = None) -> "DomainNormalizer":
        """Fix the test statistics (see the class docstring); with mode "none" the mean of
        ``features`` is kept (it is not applied). ``support``: the unnormalised support
        features, needed to pool the statistics when the shift gate is closed for ``features``
        (without it the statistics are those of ``features`` alone)."""
        self.test_pooled_ = False
        if features is None:
            self.test_mean_ = self.test_std_ = None
            return self
        if self.per_image:
            raise ValueError("per-image scoring uses the support statistics for every test image: "
                             "fixing test statistics (set_test_mean) would use other test images")
        if features.ndim != 2 and self.mode == "standardize":
            raise ValueError("standardising needs test features (N, D) to estimate their std, "
                             f"not a mean of shape {tuple(features.shape)}")
        self.test_mean_ = self.test_std_ = None  # pooled() must not read the previous ones
        if features.ndim == 2 and support is not None and self.pooled(features):
            self.test_mean_, self.test_std_ = self.pooled_statistics(features, support)
            self.test_pooled_ = True
        elif features.ndim == 2:
            self.test_mean_, self.test_std_ = self.statistics(
                features, self.mode if self.active else "center")
        else:
            self.test_mean_, self.test_std_ = features, None
        return self

    def test_statistics(self, features: torch.Tensor, stacklevel: int = 2):
        """``(mean, std)`` that :meth:`transform` applies to the batch ``features``."""
        if self.per_image:
            return self.support_mean_, self.support_std_
        if self.test_mean_ is not None:
            return self.test_mean_, self.test_std_
        if features.shape[0] >= max(2, self.min_batch):
            return self.statistics(features, self.mode)
        warnings.warn(
            f"normalising a batch of {features.shape[0]} test features (< {self.min_batch}) "
            "with the support statistics; call set_test_mean(features of many test images) for "
            "a stream",
            stacklevel=stacklevel + 1,
        )
        return self.support_mean_, self.support_std_

    def transform(self, features: torch.Tensor, stacklevel: int = 2) -> torch.Tensor:
        """Normalised test features (unchanged when the mode is "none")."""
        if not self.active:
            return features
        return normalize(features, *self.test_statistics(features, stacklevel + 1))

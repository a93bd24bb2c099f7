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
(each image is scored as if alone). ``std_d`` is floored at ``STD_FLOOR`` times the median std of the
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

__all__ = ["MODES", "STD_FLOOR", "as_mode", "domain_statistics", "normalize",
           "normalize_by_domain", "DomainNormalizer"]

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

    ``statistics``: the ``(features, mode) -> (mean, std)`` estimator (default
    :func:`domain_statistics`).
    """

    def __init__(self, mode: str = "none", min_batch: int = 16,
                 statistics: Statistics | None = None, per_image: bool = False):
        _check_mode(mode)
        if not isinstance(per_image, (bool, np.bool_)):
            raise ValueError(f"per_image must be True or False, got {per_image!r}")
        self.mode = mode
        self.min_batch = int(min_batch)
        self.statistics = statistics or domain_statistics
        self.per_image = bool(per_image)
        self.test_mean_ = self.test_std_ = None

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
        if domains is None:
            return normalize(features, self.support_mean_, self.support_std_)
        return normalize_by_domain(features, domains, self.mode, statistics=self.statistics)

    def set_statistics(self, features: torch.Tensor | None) -> "DomainNormalizer":
        """Fix the test statistics (see the class docstring); with mode "none" the mean of
        ``features`` is kept (it is not applied)."""
        if features is None:
            self.test_mean_ = self.test_std_ = None
            return self
        if self.per_image:
            raise ValueError("per-image scoring uses the support statistics for every test image: "
                             "fixing test statistics (set_test_mean) would use other test images")
        if features.ndim == 2:
            self.test_mean_, self.test_std_ = self.statistics(
                features, self.mode if self.active else "center")
        elif self.mode == "standardize":
            raise ValueError("standardising needs test features (N, D) to estimate their std, "
                             f"not a mean of shape {tuple(features.shape)}")
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

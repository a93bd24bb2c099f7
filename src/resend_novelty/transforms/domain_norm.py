"""Transductive, label-free feature normalisation per image domain (not in the paper).

A whole domain (all sketches, all paintings) shifts backbone features in a common direction and
changes their spread. Normalising each domain's features with that domain's own statistics
removes much of this shift without any label:

- ``center``: ``x - mean_d``;
- ``standardize``: ``(x - mean_d) / std_d`` per feature dimension (first and second moments
  matched, as in AdaBN-style domain adaptation, but on the pooled backbone features).

Pretraining applies it per reference domain (original images, each stylised view); detectors
apply it to the support set (per source domain where the domains are known) and to the test
features scored together. ``std_d`` is floored at ``STD_FLOOR`` times the median std of the
domain, so that a dimension that is (almost) constant in one domain is not blown up.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MODES", "STD_FLOOR", "as_mode", "domain_statistics", "normalize",
           "normalize_by_domain"]

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
    out = features - mean
    return out / std if std is not None else out


def normalize_by_domain(features: torch.Tensor, domains, mode: str,
                        fit_mask: np.ndarray | None = None) -> torch.Tensor:
    """Normalise every row with the statistics of its domain (``domains``: one id per row).

    ``fit_mask`` restricts the rows the statistics are computed from (e.g. training classes
    only); every row is normalised. ``mode="none"`` returns ``features`` unchanged.
    """
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
        mean, std = domain_statistics(features[fit_rows], mode)
        out[rows] = normalize(features[rows], mean, std)
    return out

"""Cosine detectors: normality = max cosine similarity to the class prototypes.

``cosine`` on the raw features; ``cosine-centered`` and ``cosine-standardized`` after
transductive per-domain normalisation (:class:`~resend_novelty.transforms.DomainNormalizer`).
The similarity depends on a prototype's direction only, so all three support test-time
prototype refinement (``refine=``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .prototype import PrototypeDetector

__all__ = ["CosineDetector", "CenteredCosineDetector", "StandardizedCosineDetector"]


class CosineDetector(PrototypeDetector):
    """Normality = max cosine similarity to the class prototypes."""

    name = "cosine"
    description = "max cosine similarity to the class prototypes"
    supports_refinement = True
    supports_shift_gate = True

    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        p = self.prototypes_ if prototypes is None else prototypes
        return F.normalize(features, dim=1) @ F.normalize(p, dim=1).T


class CenteredCosineDetector(CosineDetector):
    """Max cosine after transductive centring (support on its mean, test on its mean)."""

    name = "cosine-centered"
    description = "max cosine after centring support and test features on their own means"

    def __init__(self, center: bool | str = True, **kwargs):
        super().__init__(center=center, **kwargs)


class StandardizedCosineDetector(CosineDetector):
    """Max cosine after transductive per-domain standardisation (mean and std per dimension:
    support per source domain where known, test on its own statistics)."""

    name = "cosine-standardized"
    description = "max cosine after standardising support and test features per domain"

    def __init__(self, center: bool | str = "standardize", **kwargs):
        super().__init__(center=center, **kwargs)

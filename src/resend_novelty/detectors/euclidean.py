"""Euclidean detector: normality = minus the distance to the nearest class prototype."""

from __future__ import annotations

import torch

from .prototype import PrototypeDetector

__all__ = ["EuclideanDetector"]


class EuclideanDetector(PrototypeDetector):
    """Normality = minus the Euclidean distance to the nearest class prototype."""

    name = "euclidean"
    description = "minus the Euclidean distance to the nearest class prototype"
    supports_shift_gate = True

    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        p = self.prototypes_ if prototypes is None else prototypes
        return -torch.cdist(features, p)

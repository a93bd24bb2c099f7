"""The backbone interface f: images to pooled features, with the preprocessing that goes with them.

A :class:`Backbone` maps a batch of preprocessed images ``(N, 3, H, W)`` to global-average-pooled
features ``(N, feature_dim)``. It also owns its preprocessing (:class:`Preprocessing`,
``transform``) and a ``cache_namespace`` string that identifies backbone + weights +
preprocessing, used as part of the feature-cache key so that cached features are never reused
across different extractors. :class:`IdentityBackbone` passes precomputed features through.

The concrete CNNs live in :mod:`.efficientnet` and :mod:`.resnet`, ensembles in
:mod:`.ensemble`, and :mod:`.registry` builds any of them by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["Preprocessing", "Backbone", "IdentityBackbone"]


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing: Resize(resize) -> CenterCrop(crop) -> Normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def describe(self) -> str:
        return f"resize{self.resize}-crop{self.crop}-mean{list(self.mean)}-std{list(self.std)}"


class Backbone(nn.Module):
    """Base class: ``forward(images) -> (N, feature_dim)`` pooled features."""

    name: str = "backbone"
    feature_dim: int = 0

    def __init__(self, preprocessing: Preprocessing | None = None):
        super().__init__()
        self.preprocessing = preprocessing or Preprocessing()

    @property
    def transform(self) -> Callable:
        return self.preprocessing.transform()

    @property
    def weights_id(self) -> str:
        return "none"

    @property
    def cache_namespace(self) -> str:
        """Identifies backbone + weights + preprocessing for the feature cache."""
        return f"{self.name}|{self.weights_id}|{self.preprocessing.describe()}"


class IdentityBackbone(Backbone):
    """Pass-through for precomputed features: ``forward(x) == x`` (shape ``(N, feature_dim)``)."""

    name = "identity"

    def __init__(self, feature_dim: int):
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"identity backbone expects features of shape (N, {self.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        return features

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

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import load_image

__all__ = ["Preprocessing", "Backbone", "IdentityBackbone"]


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing: Resize(resize) -> CenterCrop(crop) -> Normalize.

    ``draft``: decode JPEGs with Pillow's draft mode (DCT scaling) when the image is at least
    twice the resize target, so large photos decode at a fraction of the cost. It changes the
    pixels of such images slightly, so it is part of :meth:`describe` (the cache namespace):
    features decoded with and without it are never mixed. Off by default.

    :meth:`transform` is the per-image torchvision pipeline (PIL image -> normalised tensor);
    the feature extractor uses the equivalent, faster split :meth:`load` (file -> PIL image),
    :meth:`pixels` (PIL image -> uint8 ``(crop, crop, 3)`` array) and :meth:`to_batch` (uint8
    arrays -> normalised float32 ``(N, 3, crop, crop)``), which gives the same values.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    draft: bool = False

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
        base = f"resize{self.resize}-crop{self.crop}-mean{list(self.mean)}-std{list(self.std)}"
        return base + ("-jpegdraft2x" if self.draft else "")

    @property
    def decode_key(self) -> tuple:
        """Preprocessings with equal ``decode_key`` decode a file to the same PIL image."""
        return ("draft", 2 * self.resize) if self.draft else ("full",)

    def load(self, path: str | os.PathLike):
        """Decode the image file at ``path`` (RGB), with JPEG draft mode if ``draft``."""
        if self.draft:
            return load_image(path, draft=(2 * self.resize, 2 * self.resize))
        return load_image(path)

    def pixels(self, img) -> np.ndarray:
        """Resized, centre-cropped uint8 ``(crop, crop, 3)`` pixels of a PIL image."""
        from torchvision.transforms import functional as F

        return np.asarray(F.center_crop(F.resize(img, self.resize), self.crop))

    def to_batch(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Normalised float32 ``(N, 3, crop, crop)`` batch of :meth:`pixels` arrays (the values of
        :meth:`transform`: ``(x / 255 - mean) / std``)."""
        x = np.stack(pixels).astype(np.float32)
        x /= np.float32(255)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


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

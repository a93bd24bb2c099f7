"""Backbone ensembles: several backbones side by side, their features concatenated.

Built by name with ``+`` (``"a+b"``, e.g. ``efficientnet_lite0+efficientnet_lite1``, 2560-d).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import Backbone

__all__ = ["BackboneEnsemble"]


class BackboneEnsemble(Backbone):
    """Several backbones side by side: the features of an image are the concatenation of its
    members' features (``feature_dim`` = their sum), each member with its own preprocessing.

    Built by name with ``+``: ``build_backbone("efficientnet_lite0+efficientnet_lite1")``. There is
    no single preprocessing, so the ensemble is used through
    :func:`~resend_novelty.features.extract_features`, which runs (and caches) every member on its
    own and concatenates; the members' caches are shared with their single-backbone use.
    """

    def __init__(self, members: list[Backbone]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two backbones, got {len(members)}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"an ensemble's backbones must differ, got {names}")
        self.members = nn.ModuleList(members)
        self.name = "+".join(names)
        self.feature_dim = sum(m.feature_dim for m in members)

    @property
    def cache_namespace(self) -> str:
        return "ensemble(" + ";".join(m.cache_namespace for m in self.members) + ")"

    def _no_single_input(self, *_args, **_kwargs):
        raise TypeError(
            f"the backbone ensemble {self.name!r} has no single preprocessing: each member "
            "preprocesses the image itself. Give image files (paths, folders, datasets) or "
            "precomputed features, not preprocessed image tensors"
        )

    @property
    def transform(self) -> Callable:
        return self._no_single_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._no_single_input()

"""What one training step feeds the model, beyond the pair indices of :mod:`.pairs`.

Frozen mode: optional *partner sets* (the partner of a pair replaced by the mean feature of
several items of its class, like a prototype at evaluation time). End to end: image batches
with training augmentation, the backbone and the relational module as one module, and the
features of held-out images for validation.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms as T

from ..data import load_image
from .pairs import PairSampler, Pairs

__all__ = ["partner_sets", "EndToEnd", "train_transform", "load_batch", "backbone_features"]


def partner_sets(sampler: PairSampler, batch: Pairs, m: int, seed: int, step: int) -> np.ndarray:
    """For each pair, ``m`` items of the partner's class (the partner first, never the anchor).

    Their mean feature plays the role of a class prototype, as at evaluation time. Drawn from
    ``(seed, step)`` so that resumed and distributed runs see the same sets.
    """
    rng = np.random.default_rng([seed, step, 17])
    cls = sampler.cls[batch.j]
    sets = np.empty((len(batch), m), dtype=np.int64)
    sets[:, 0] = batch.j
    u = rng.random((len(batch), m - 1))
    for c in np.unique(cls):
        rows = cls == c
        items = sampler.members[c]
        sets[rows, 1:] = items[(u[rows] * len(items)).astype(np.int64)]
    anchor_hit = sets == batch.i[:, None]
    sets[anchor_hit] = np.broadcast_to(batch.j[:, None], sets.shape)[anchor_hit]
    return sets


class EndToEnd(torch.nn.Module):
    """Backbone + relational module, trained together (images in)."""

    def __init__(self, backbone, relational):
        super().__init__()
        self.backbone, self.relational = backbone, relational

    def forward(self, images_i, images_j):
        return self.relational(self.backbone(images_i), self.backbone(images_j))


def train_transform(preprocessing) -> T.Compose:
    """Training augmentation of the end-to-end mode: random resized crop (scale 0.5-1) and
    horizontal flip, then the backbone's normalisation."""
    p = preprocessing
    return T.Compose([T.RandomResizedCrop(p.crop, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(p.mean, p.std)])


def load_batch(paths, idx, transform) -> torch.Tensor:
    """The images ``paths[i]`` for ``i`` in ``idx``, transformed and stacked."""
    return torch.stack([transform(load_image(paths[i])) for i in idx])


@torch.no_grad()
def backbone_features(backbone, paths, mask, device, batch: int = 64) -> torch.Tensor:
    """Features of the items in ``mask`` (other rows zero) with the backbone in eval mode."""
    was = backbone.training
    backbone.eval()
    t = backbone.preprocessing.transform()
    rows = np.flatnonzero(mask)
    out = torch.zeros(len(paths), backbone.feature_dim, device=device)
    for start in range(0, len(rows), batch):
        idx = rows[start : start + batch].tolist()
        out[idx] = backbone(load_batch(paths, idx, t).to(device)).float()
    backbone.train(was)
    return out

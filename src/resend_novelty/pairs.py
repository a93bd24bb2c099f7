"""Pair sampling for relational pretraining (paper Sec. 3.2, Algorithm 1).

Every item of the reference set is an anchor, paired with one partner of its own class (label 1)
and ``neg_per_pos`` partners of other classes (label 0). Pairs are regenerated every epoch from
``(seed, epoch)`` alone, so any epoch can be rebuilt exactly when a run resumes.

``balance=True`` draws each negative partner's class uniformly among the other classes (rather
than proportionally to class size) and weights positive pairs by ``neg_per_pos`` in the loss, so
that same-class and different-class pairs carry equal total weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PairSampler", "Pairs"]


@dataclass
class Pairs:
    i: np.ndarray  # anchor item index
    j: np.ndarray  # partner item index
    y: np.ndarray  # 1.0 same class, 0.0 different class
    w: np.ndarray  # loss weight

    def __len__(self) -> int:
        return len(self.i)

    def slice(self, start: int, stop: int) -> "Pairs":
        return Pairs(self.i[start:stop], self.j[start:stop], self.y[start:stop], self.w[start:stop])


class PairSampler:
    def __init__(self, labels, neg_per_pos: int = 1, seed: int = 0, balance: bool = True):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-d array")
        if neg_per_pos < 1:
            raise ValueError(f"neg_per_pos must be >= 1, got {neg_per_pos}")
        self.labels = labels
        self.neg_per_pos = int(neg_per_pos)
        self.seed = int(seed)
        self.balance = bool(balance)
        self.classes, inverse = np.unique(labels, return_inverse=True)
        if len(self.classes) < 2:
            raise ValueError("pretraining needs at least two classes in the reference set")
        self.cls = inverse  # class index of each item
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        self.members = np.split(order, np.cumsum(counts)[:-1])  # items of each class
        self.counts = counts
        if (counts < 2).any():
            bad = self.classes[counts < 2].tolist()
            raise ValueError(f"classes {bad} have a single item: no same-class partner exists")

    def pairs_per_epoch(self) -> int:
        return len(self.labels) * (1 + self.neg_per_pos)

    def epoch(self, epoch: int) -> Pairs:
        rng = np.random.default_rng([self.seed, int(epoch)])
        n, k = len(self.labels), self.neg_per_pos
        anchors = np.arange(n)
        cls = self.cls
        # positive partner: another item of the same class
        pos = np.empty(n, dtype=np.int64)
        for c, items in enumerate(self.members):
            m = len(items)
            shift = rng.integers(1, m, size=m)  # never the anchor itself
            pos_of = items[(np.arange(m) + shift) % m]
            pos[items] = pos_of
        # negative partners
        n_cls = len(self.classes)
        if self.balance:
            off = rng.integers(1, n_cls, size=(n, k))
            neg_cls = (cls[:, None] + off) % n_cls
            pick = rng.random((n, k))
            neg = np.empty((n, k), dtype=np.int64)
            for c, items in enumerate(self.members):
                sel = neg_cls == c
                neg[sel] = items[(pick[sel] * len(items)).astype(np.int64)]
        else:
            neg = rng.integers(0, n, size=(n, k))
            clash = cls[neg] == cls[:, None]
            while clash.any():
                neg[clash] = rng.integers(0, n, size=int(clash.sum()))
                clash = cls[neg] == cls[:, None]
        i = np.concatenate([anchors, np.repeat(anchors, k)])
        j = np.concatenate([pos, neg.reshape(-1)])
        y = np.concatenate([np.ones(n), np.zeros(n * k)]).astype(np.float32)
        w = np.ones_like(y)
        if self.balance:
            w[:n] = k
        perm = rng.permutation(len(i))
        return Pairs(i[perm], j[perm], y[perm], w[perm])

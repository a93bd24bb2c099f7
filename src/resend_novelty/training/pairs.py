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
    def __init__(self, labels, neg_per_pos: int = 1, seed: int = 0, balance: bool = True,
                 domains=None, cross_domain: float = 0.0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-d array")
        if neg_per_pos < 1:
            raise ValueError(f"neg_per_pos must be >= 1, got {neg_per_pos}")
        self.labels = labels
        if not 0.0 <= float(cross_domain) <= 1.0:
            raise ValueError(f"cross_domain must be in [0, 1], got {cross_domain}")
        if cross_domain and domains is None:
            raise ValueError("cross_domain pairs need the domain of every item (domains=)")
        self.domains = None if domains is None else np.asarray(domains)
        if self.domains is not None and self.domains.shape != labels.shape:
            raise ValueError(f"{len(labels)} labels but {self.domains.size} domain ids")
        self.cross_domain = float(cross_domain)
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

    def _cross_domain(self, rng, pos: np.ndarray, neg: np.ndarray):
        """With probability ``cross_domain`` per pair: the positive partner comes from another
        domain than the anchor (same class, e.g. a photo and a sketch of it) and a negative
        partner from the anchor's own domain (other class): pairs where the domain must be
        ignored. Anchors without such a partner keep the one drawn before."""
        dom, cls = self.domains, self.cls
        n, k = neg.shape
        swap_pos = rng.random(n) < self.cross_domain
        pick = rng.random(n)
        for c, items in enumerate(self.members):
            d_items = dom[items]
            for d in np.unique(d_items):
                anchors = items[(d_items == d) & swap_pos[items]]
                other = items[d_items != d]
                if len(anchors) and len(other):
                    pos[anchors] = other[(pick[anchors] * len(other)).astype(np.int64)]
        swap_neg = rng.random((n, k)) < self.cross_domain
        pick_neg = rng.random((n, k))
        for d in np.unique(dom):
            same = np.flatnonzero(dom == d)
            rows, cols = np.nonzero(swap_neg & (dom == d)[:, None])
            if not len(rows):
                continue
            cand = same[(pick_neg[rows, cols] * len(same)).astype(np.int64)]
            ok = cls[cand] != cls[rows]  # a same-class draw keeps the original negative
            neg[rows[ok], cols[ok]] = cand[ok]
        return pos, neg

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
        if self.cross_domain:
            pos, neg = self._cross_domain(rng, pos, neg)
        i = np.concatenate([anchors, np.repeat(anchors, k)])
        j = np.concatenate([pos, neg.reshape(-1)])
        y = np.concatenate([np.ones(n), np.zeros(n * k)]).astype(np.float32)
        w = np.ones_like(y)
        if self.balance:
            w[:n] = k
        perm = rng.permutation(len(i))
        return Pairs(i[perm], j[perm], y[perm], w[perm])

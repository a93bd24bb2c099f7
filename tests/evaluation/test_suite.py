"""The generalisation suite's episode builders and scoring, on tiny generated features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resend_novelty.detectors import build_detector
from resend_novelty.evaluation import (Episode, FeaturePool, cap_per_class, intra_episodes,
                                       list_episodes, score_episodes, subsample_unknown_share)


def _pool(part="any", n_classes=8, per_class=20, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = torch.randn(n_classes, d, generator=g) * 3
    feats = centres[labels] + torch.randn(len(labels), d, generator=g)
    if part == "split":  # the first half of each class support, the rest test
        parts = np.tile(np.array(["support"] * (per_class // 2) + ["test"] * (per_class // 2)),
                        n_classes)
    else:
        parts = np.full(len(labels), part)
    return FeaturePool("gen", {"f": feats}, labels, np.full(len(labels), "photo"), parts)


@pytest.mark.parametrize("part", ["any", "split"])
def test_episodes_are_seeded_and_disjoint(part):
    pool = _pool(part)
    a = intra_episodes(pool, 3, 2, support=4, n_episodes=5, seed=1)
    b = intra_episodes(pool, 3, 2, support=4, n_episodes=5, seed=1)
    c = intra_episodes(pool, 3, 2, support=4, n_episodes=5, seed=2)
    assert all((x.support == y.support).all() and (x.test == y.test).all() for x, y in zip(a, b))
    assert any(len(x.support) != len(y.support) or (x.support != y.support).any()
               or (x.known != y.known).any() for x, y in zip(a, c))
    for ep in a:
        assert not np.intersect1d(ep.support, ep.test).size  # never a shared row
        assert len(ep.known) == 3 and len(ep.unknown) == 2
        assert not np.intersect1d(ep.known, ep.unknown).size
        assert set(pool.labels[ep.support]) == set(ep.known)
        assert (np.bincount(pool.labels[ep.support], minlength=8)[ep.known] == 4).all()
        assert set(pool.labels[ep.test]) == set(ep.known) | set(ep.unknown)
        if part == "split":
            assert (pool.part[ep.support] == "support").all()
            assert (pool.part[ep.test] == "test").all()


def test_all_support_and_test_cap():
    pool = _pool("any", per_class=20)
    ep = intra_episodes(pool, 2, 2, support=None, n_episodes=1, seed=0, test_per_class=3)[0]
    assert (np.bincount(pool.labels[ep.support])[ep.known] == 10).all()  # half of each class
    assert (np.bincount(pool.labels[ep.test], minlength=8)[np.r_[ep.known, ep.unknown]]
            == 3).all()


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_unknown_share_is_respected(share):
    pool = _pool("any", n_classes=8, per_class=40)
    for ep in intra_episodes(pool, 4, 4, support=5, n_episodes=3, seed=0, share=share):
        unk = np.isin(pool.labels[ep.test], ep.unknown).mean()
        assert abs(unk - share) < 0.03, (unk, share)
    rng = np.random.default_rng(0)
    rows = np.arange(100)
    is_unk = rows < 30
    sub = subsample_unknown_share(rows, is_unk, 0.8, rng)
    assert abs(is_unk[sub].mean() - 0.8) < 0.02 and len(np.unique(sub)) == len(sub)
    capped = subsample_unknown_share(rows, is_unk, 0.5, rng, size=20)
    assert len(capped) == 20 and is_unk[capped].sum() == 10
    with pytest.raises(ValueError, match="share"):
        subsample_unknown_share(rows, is_unk, 1.0, rng)


def test_domains_restrict_support_and_test():
    pool = _pool("any", per_class=20)
    pool.domain = np.tile(np.array(["photo", "sketch"]), len(pool.labels) // 2)
    for ep in intra_episodes(pool, 2, 2, support=3, n_episodes=3, seed=0,
                             support_domain="photo", test_domain="sketch"):
        assert (pool.domain[ep.support] == "photo").all()
        assert (pool.domain[ep.test] == "sketch").all()


def test_list_episodes_keep_the_support_and_draw_tests():
    labels = np.repeat(np.arange(5), 10)
    support = np.flatnonzero((labels < 3) & (np.arange(50) % 10 < 5))
    test = np.setdiff1d(np.arange(50), support)
    eps = list_episodes(support, test, labels, 4, seed=0, test_size=20, share=0.5)
    for ep in eps:
        assert (ep.support == support).all() and set(ep.known) == {0, 1, 2}
        assert set(ep.unknown) == {3, 4}
        assert np.isin(ep.test, test).all() and len(ep.test) <= 20
        assert abs(np.isin(labels[ep.test], ep.unknown).mean() - 0.5) < 0.1
    assert len({tuple(e.test) for e in eps}) > 1  # a fresh draw per episode
    with pytest.raises(ValueError, match="overlap"):
        list_episodes(support, np.r_[test, support[:1]], labels, 1, seed=0)


def test_cap_per_class():
    labels = np.repeat(np.arange(3), 5)
    out = cap_per_class(np.arange(15), labels, 2, np.random.default_rng(0))
    assert (np.bincount(labels[out]) == 2).all()


def test_score_episodes_separates_known_from_unknown():
    pool = _pool("any")
    eps = intra_episodes(pool, 3, 3, support=5, n_episodes=3, seed=0)
    au = score_episodes(lambda: build_detector("cosine", backbone=None, progress=False),
                        pool.features["f"], pool.labels, eps)
    assert len(au) == 3 and min(au) > 0.9  # well separated classes
    # a broken detector (random scores) is near chance: the AUROC depends on the scores
    bad = score_episodes(lambda: _Random(), pool.features["f"], pool.labels, eps)
    assert max(bad) < 0.9


class _Random:
    def fit_features(self, features, labels):
        return self

    def score_features(self, features):
        return np.random.default_rng(len(features)).random(len(features))


def test_pool_checks_sizes():
    with pytest.raises(ValueError, match="labels"):
        FeaturePool("x", {"f": torch.zeros(3, 2)}, np.zeros(2), np.zeros(2), np.zeros(2))
    assert Episode(np.r_[0], np.r_[1], np.r_[0], np.r_[1]).domains is None

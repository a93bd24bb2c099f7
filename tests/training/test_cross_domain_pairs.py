"""Pair sampling across the domains of the reference set."""

from __future__ import annotations

import numpy as np
import pytest

from resend_novelty.training import PairSampler


def test_cross_domain_pairs():
    labels = np.repeat(np.arange(4), 8)
    domains = np.tile(np.repeat([0, 1], 4), 4)  # each class: 4 photos, 4 sketches
    plain = PairSampler(labels, neg_per_pos=2, seed=0, domains=domains).epoch(0)
    cross = PairSampler(labels, neg_per_pos=2, seed=0, domains=domains, cross_domain=1.0).epoch(0)
    for p in (plain, cross):  # labels stay right
        assert (labels[p.i][p.y == 1] == labels[p.j][p.y == 1]).all()
        assert (labels[p.i][p.y == 0] != labels[p.j][p.y == 0]).all()
    def cross_share(p, y):
        return (domains[p.i[p.y == y]] != domains[p.j[p.y == y]]).mean()

    assert cross_share(cross, 1) == 1.0  # every positive crosses domains
    assert cross_share(cross, 0) < 0.1  # negatives (nearly all) within a domain
    assert 0.2 < cross_share(plain, 1) < 0.9
    again = PairSampler(labels, neg_per_pos=2, seed=0, domains=domains, cross_domain=1.0).epoch(0)
    assert np.array_equal(again.j, cross.j)  # seeded
    with pytest.raises(ValueError, match="domains"):
        PairSampler(labels, cross_domain=0.5)

"""The shift gate of the per-domain normalisation (DomainNormalizer(shift_threshold=...)):
shift_gap, pooled(), pooled_statistics(), support_features(), set_statistics() with a support."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resend_novelty.transforms import DomainNormalizer, domain_statistics, normalize
from resend_novelty.transforms.domain_norm import mean_direction, shift_gap

D = 16
CLOSE = 0.1  # a threshold above the gap of the unshifted test batch (~0.02), below the shifted


def _data(seed=0):
    """Positive clustered features: support (3 classes x 8), a test batch from the same domain
    with an unknown class (4 x 6), and a common offset direction."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, D, generator=g) * 2
    sup = torch.cat([(centres[c] + torch.randn(8, D, generator=g)).relu() + 1 for c in range(3)])
    test = torch.cat([(centres[c] + torch.randn(6, D, generator=g)).relu() + 1 for c in range(4)])
    offset = torch.randn(D, generator=g) * 3
    return sup, test, offset


def _fitted(mode="standardize", threshold=CLOSE, **kw):
    sup, test, offset = _data()
    n = DomainNormalizer(mode, min_batch=16, shift_threshold=threshold, **kw)
    n.fit_transform(sup)
    return n, sup, test, offset


# --------------------------------------------------------------------------- shift_gap
def test_shift_gap_is_zero_for_the_same_set_and_grows_with_a_common_offset():
    sup, test, offset = _data()
    direction = mean_direction(sup)
    torch.testing.assert_close(direction, torch.nn.functional.normalize(sup, dim=1).mean(0))
    assert abs(shift_gap(direction, sup)) < 1e-6
    assert abs(shift_gap(direction, sup[torch.randperm(len(sup))])) < 1e-6  # order-free
    gaps = [shift_gap(direction, test + a * offset) for a in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(isinstance(x, float) for x in gaps)
    assert gaps[0] < CLOSE < gaps[2]
    assert all(a < b for a, b in zip(gaps, gaps[1:])), gaps
    assert 0.0 <= gaps[-1] <= 2.0
    # a scale of the features does not move it (directions only)
    assert abs(shift_gap(direction, 3.0 * sup)) < 1e-6


# --------------------------------------------------------------------------- pooled()
def test_pooled_is_true_below_the_threshold_and_false_above():
    n, sup, test, offset = _fitted()
    assert n.support_direction_ is not None
    torch.testing.assert_close(n.support_direction_, mean_direction(sup))
    gap = shift_gap(n.support_direction_, test)
    assert n.pooled(test) is True
    assert n.pooled(test + 2 * offset) is False
    # around the threshold: just above the gap it pools, below it does not
    at = DomainNormalizer("standardize", 16, shift_threshold=gap + 1e-6)
    at.fit_transform(sup)
    below = DomainNormalizer("standardize", 16, shift_threshold=gap * 0.5)
    below.fit_transform(sup)
    assert at.pooled(test) and not below.pooled(test)


@pytest.mark.parametrize("case", ["per_image", "threshold0", "domains", "small", "mode_none"])
def test_pooled_is_false_where_the_gate_does_not_apply(case):
    sup, test, _ = _data()
    kw = dict(mode="standardize", min_batch=16, shift_threshold=CLOSE)
    if case == "per_image":
        kw["per_image"] = True
    if case == "threshold0":
        kw["shift_threshold"] = 0.0
    if case == "mode_none":
        kw["mode"] = "none"
    n = DomainNormalizer(**kw)
    domains = np.tile(["a", "b"], len(sup) // 2) if case == "domains" else None
    n.fit_transform(sup, domains)
    batch = test[:15] if case == "small" else test  # 15 < min_batch
    if case == "domains":
        assert n.support_direction_ is None
    assert n.pooled(batch) is False
    # the control: the same batch pools with the default setting
    ctl = DomainNormalizer("standardize", 16, shift_threshold=CLOSE)
    ctl.fit_transform(sup)
    assert ctl.pooled(test)


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_pooled_statistics_are_those_of_support_and_test_together(mode):
    n, sup, test, _ = _fitted(mode)
    mean, std = n.pooled_statistics(test, sup)
    want_mean, want_std = domain_statistics(torch.cat([sup, test]), mode)
    torch.testing.assert_close(mean, want_mean)
    if mode == "center":
        assert std is None
    else:
        torch.testing.assert_close(std, want_std)
        own_mean, own_std = domain_statistics(test, mode)
        assert not torch.allclose(std, own_std)  # not the test batch's own statistics
    assert not torch.allclose(mean, n.support_mean_)


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_support_features_inverts_fit_transform(mode):
    sup, _, _ = _data()
    n = DomainNormalizer(mode, 16, shift_threshold=CLOSE)
    normed = n.fit_transform(sup)
    assert not torch.allclose(normed, sup)
    torch.testing.assert_close(n.support_features(normed), sup, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- set_statistics
def test_set_statistics_pools_when_the_gate_is_closed():
    n, sup, test, _ = _fitted()
    n.set_statistics(test, sup)
    assert n.test_pooled_ is True
    want_mean, want_std = domain_statistics(torch.cat([sup, test]), "standardize")
    torch.testing.assert_close(n.test_mean_, want_mean)
    torch.testing.assert_close(n.test_std_, want_std)
    # fixed pooled statistics: every later batch (even one image) is pooled, with them
    assert n.pooled(test[:1]) is True
    mean, std = n.pooled_statistics(test[:1], sup)
    assert mean is n.test_mean_ and std is n.test_std_
    # without the support: the statistics of the features alone, not pooled
    n.set_statistics(test)
    assert n.test_pooled_ is False
    torch.testing.assert_close(n.test_mean_, domain_statistics(test, "standardize")[0])
    assert n.pooled(test) is False  # fixed, not pooled: the gate is not re-evaluated


def test_set_statistics_clears_a_previous_pooled_state():
    n, sup, test, offset = _fitted()
    n.set_statistics(test, sup)
    assert n.test_pooled_
    n.set_statistics(None)
    assert n.test_pooled_ is False and n.test_mean_ is None and n.test_std_ is None
    assert n.pooled(test) is True  # back to the gate of each batch

    n.set_statistics(test, sup)
    assert n.test_pooled_
    far = test + 2 * offset
    n.set_statistics(far, sup)  # the gate is open for the far batch: its own statistics
    assert n.test_pooled_ is False
    want_mean, want_std = domain_statistics(far, "standardize")
    torch.testing.assert_close(n.test_mean_, want_mean)
    torch.testing.assert_close(n.test_std_, want_std)
    torch.testing.assert_close(n.transform(far[:3]), normalize(far[:3], want_mean, want_std))


def test_set_statistics_without_the_gate_is_the_old_behaviour():
    n, sup, test, _ = _fitted(threshold=0.0)
    n.set_statistics(test, sup)
    assert n.test_pooled_ is False
    torch.testing.assert_close(n.test_mean_, domain_statistics(test, "standardize")[0])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-0.1, 3, 2.0001, True, False, "a", None, float("nan")])
def test_invalid_shift_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="shift_threshold"):
        DomainNormalizer("center", shift_threshold=bad)


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 1, 2.0])
def test_valid_shift_thresholds(good):
    n = DomainNormalizer("center", shift_threshold=good)
    assert n.shift_threshold == float(good) and isinstance(n.shift_threshold, float)
    assert n.test_pooled_ is False and n.support_direction_ is None

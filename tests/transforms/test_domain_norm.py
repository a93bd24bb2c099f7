"""Per-domain feature normalisation: the functions, DomainNormalizer, domain-aware detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resend_novelty.data import ImageRecord
from resend_novelty.detectors import (CenteredCosineDetector, CosineDetector, ReSeNDDetector,
                                      StandardizedCosineDetector, build_detector)
from resend_novelty.evaluation import get_setting
from resend_novelty.models import RelationalModule
from resend_novelty.transforms import (STD_FLOOR, DomainNormalizer, domain_statistics, normalize,
                                       normalize_by_domain)


def test_normalize_by_domain_center_and_standardize():
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0], [14.0, 4.0]])
    d = np.array(["a", "a", "b", "b"])
    c = normalize_by_domain(f, d, "center")
    torch.testing.assert_close(c, torch.tensor([[-1.0, -2.0], [1.0, 2.0], [-2.0, -2.0], [2.0, 2.0]]))
    s = normalize_by_domain(f, d, "standardize")
    for dom in ("a", "b"):  # every domain: mean 0, std 1 in every dimension
        rows = torch.as_tensor(np.flatnonzero(d == dom))
        torch.testing.assert_close(s[rows].mean(0), torch.zeros(2))
        torch.testing.assert_close(s[rows].std(0), torch.ones(2))
    assert normalize_by_domain(f, d, "none") is f


def test_statistics_come_from_the_fit_rows_only_and_std_is_floored():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [100.0, 0.0]])
    out = normalize_by_domain(f, np.zeros(3), "center", fit_mask=np.array([True, True, False]))
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 1.0, 99.0]))
    g = torch.randn(50, 4)
    g[:, 3] = 1.0  # a constant dimension: its std is floored, not zero
    mean, std = domain_statistics(g, "standardize")
    assert float(std[3]) >= STD_FLOOR * float(std.median()) * 0.999
    assert torch.isfinite(normalize_by_domain(g, np.zeros(50), "standardize")).all()


@pytest.mark.parametrize("bad", [dict(mode="whiten"), dict(domains=np.zeros(2))])
def test_normalize_by_domain_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        normalize_by_domain(torch.randn(3, 2), bad.get("domains", np.zeros(3)), bad.get("mode", "center"))


def test_support_is_normalised_per_source_domain_when_domains_are_given():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 10 + [0] * 10 + [1] * 30)  # unbalanced domains
    domains = np.array(["photo"] * 40 + ["sketch"] * 40)
    f = torch.as_tensor(rng.normal(size=(80, 8)), dtype=torch.float32)
    f[40:] += 5.0  # the sketch domain is shifted
    pooled = CenteredCosineDetector(backbone=None).fit_features(f, labels)
    per_dom = CenteredCosineDetector(backbone=None).fit_features(f, labels, domains=domains)
    expect = normalize_by_domain(f, domains, "center")
    torch.testing.assert_close(per_dom.prototypes_[0], expect[labels == 0].mean(0))
    assert not torch.allclose(pooled.prototypes_, per_dom.prototypes_)
    # without domain normalisation the domains change nothing
    a = CosineDetector(backbone=None).fit_features(f, labels)
    b = CosineDetector(backbone=None).fit_features(f, labels, domains=domains)
    torch.testing.assert_close(a.prototypes_, b.prototypes_)
    with pytest.raises(ValueError, match="domain ids"):
        CenteredCosineDetector(backbone=None).fit_features(f, labels, domains=domains[:5])


def test_standardized_detector_is_registered_and_invariant_to_a_domain_affine_map():
    rng = np.random.default_rng(1)
    fs = torch.as_tensor(rng.normal(size=(40, 6)), dtype=torch.float32)
    labels = np.repeat([0, 1], 20)
    test = torch.as_tensor(rng.normal(size=(30, 6)), dtype=torch.float32)
    det = build_detector("cosine-standardized", backbone=None)
    assert isinstance(det, StandardizedCosineDetector) and det.domain_norm == "standardize"
    det.fit_features(fs, labels)
    scale = torch.linspace(0.5, 3.0, 6)
    # a test domain that scales and shifts every dimension scores exactly like the original
    np.testing.assert_allclose(det.score_features(test * scale + 2.0), det.score_features(test),
                               atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        det.set_test_mean(torch.zeros(6))  # a mean alone cannot standardise
    det.set_test_mean(test)
    np.testing.assert_allclose(det.score_features(test[:3]), det.score_features(test)[:3], atol=1e-5)
    with pytest.raises(ValueError, match="center must be"):
        CosineDetector(backbone=None, center="whiten")


def test_resend_detector_follows_the_checkpoint_standardisation_flag():
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, standardize_features=True)
    assert m.config.domain_norm == "standardize"
    assert ReSeNDDetector(model=m, backbone=None).domain_norm == "standardize"
    assert ReSeNDDetector(model=m, backbone=None, center=False).domain_norm == "none"


def test_multi_source_settings_give_the_support_domains():
    recs = [ImageRecord("/d/PACS/kfold/photo/dog/1.jpg", 0, "x:1"),
            ImageRecord("/d/PACS/kfold/sketch/dog/2.png", 0, "x:2")]
    assert get_setting("pacs-multi").support_domains(recs).tolist() == ["photo", "sketch"]
    assert get_setting("officehome-multi").support_domains(recs) is not None
    assert get_setting("pacs-single").support_domains(recs) is None


# --------------------------------------------------------------------------- proxy benchmark


def test_domain_normalizer_fit_transform_and_stream_statistics():
    g = torch.Generator().manual_seed(3)
    support = torch.randn(20, 5, generator=g) * 2 + 1
    domains = np.repeat(["a", "b"], 10)
    test = torch.randn(30, 5, generator=g) + 4
    norm = DomainNormalizer("standardize", min_batch=16)
    out = norm.fit_transform(support, domains)
    torch.testing.assert_close(out, normalize_by_domain(support, domains, "standardize"))
    mean, std = domain_statistics(support, "standardize")
    torch.testing.assert_close(norm.support_mean_, mean)
    torch.testing.assert_close(norm.support_std_, std)
    # a batch large enough: its own statistics; a small one: the support's, with a warning
    torch.testing.assert_close(norm.transform(test), normalize(test, *domain_statistics(test, "standardize")))
    with pytest.warns(UserWarning, match="support statistics"):
        torch.testing.assert_close(norm.transform(test[:3]), normalize(test[:3], mean, std))
    # fixed statistics for a stream
    norm.set_statistics(test)
    torch.testing.assert_close(norm.transform(test[:3]),
                               normalize(test[:3], *domain_statistics(test, "standardize")))
    with pytest.raises(ValueError, match="std"):
        norm.set_statistics(test.mean(0))
    norm.set_statistics(None)
    assert norm.test_mean_ is None and norm.test_std_ is None
    off = DomainNormalizer("none")
    assert off.fit_transform(support) is support and off.transform(test) is test
    with pytest.raises(ValueError, match="domain normalisation"):
        DomainNormalizer("whiten")


def test_domain_normalizer_takes_its_statistics_estimator():
    f = torch.randn(12, 4)
    calls = []

    def stats(x, mode):
        calls.append(mode)
        return domain_statistics(x, mode)

    out = DomainNormalizer("center", statistics=stats).fit_transform(f, np.repeat([0, 1], 6))
    torch.testing.assert_close(out, normalize_by_domain(f, np.repeat([0, 1], 6), "center"))
    assert calls == ["center"] * 3  # whole support + each of the two domains

"""Test-time prototype refinement (``refine=``): what it moves, streams, and its errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resend_novelty.detectors import CosineDetector, KNNDetector, ReSeNDDetector, build_detector
from resend_novelty.evaluation import auroc
from resend_novelty.models import RelationalModule


def shifted_domain(seed=0, n=60, dim=16, shift=1.2):
    """Support: classes 0/1 around e0/e1. Test: the same classes rotated towards e2/e3 (a
    domain shift the prototypes do not see), plus an unknown class around e4 + e5."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(dim)

    def cloud(center, m):
        return center + 0.25 * torch.randn(m, dim, generator=g)

    support = torch.cat([cloud(e[0], n), cloud(e[1], n)])
    labels = np.repeat([0, 1], n)
    test_known = torch.cat([cloud(e[0] + shift * e[2], n), cloud(e[1] + shift * e[3], n)])
    test_unknown = cloud(0.6 * (e[4] + e[5]) + 0.5 * (e[0] + e[1]), n // 3)
    test = torch.cat([test_known, test_unknown])
    is_known = np.r_[np.ones(2 * n, bool), np.zeros(n // 3, bool)]
    true_means = [F.normalize(test_known[:n].mean(0), dim=0), F.normalize(test_known[n:].mean(0), dim=0)]
    return support, labels, test, is_known, true_means


def test_refinement_moves_prototypes_towards_their_test_class_and_helps_here():
    support, labels, test, is_known, true_means = shifted_domain()
    plain = CosineDetector(backbone=None, progress=False).fit_features(support, labels)
    refined = CosineDetector(backbone=None, progress=False, refine=3).fit_features(support, labels)
    p = refined.refine_prototypes(refined.prepare_features(test))
    p0 = F.normalize(refined.prototypes_, dim=1)
    for c in (0, 1):  # every class prototype is closer to its own test-domain mean
        assert float(p[c] @ true_means[c]) > float(p0[c] @ true_means[c]) + 0.05
        torch.testing.assert_close(p[c].norm(), torch.tensor(1.0))
    assert auroc(refined.score_features(test), is_known) > auroc(plain.score_features(test), is_known)


def test_refine_zero_is_the_plain_detector_and_keep_one_changes_nothing():
    support, labels, test, _, _ = shifted_domain(1)
    plain = CosineDetector(backbone=None, progress=False).fit_features(support, labels)
    keep = CosineDetector(backbone=None, progress=False, refine=2,
                          refine_keep=1.0).fit_features(support, labels)
    np.testing.assert_allclose(keep.score_features(test), plain.score_features(test), atol=1e-6)
    off = CosineDetector(backbone=None, progress=False, refine=0).fit_features(support, labels)
    np.testing.assert_array_equal(off.score_features(test), plain.score_features(test))


def test_set_test_mean_fixes_the_refined_prototypes_for_a_stream():
    support, labels, test, _, _ = shifted_domain(2)
    det = build_detector("cosine-standardized", backbone=None, progress=False, refine=3)
    det.fit_features(support, labels)
    batch = det.score_features(test)
    det.set_test_mean(test)
    assert det.test_prototypes_ is not None
    one_by_one = np.concatenate([det.score_features(test[i:i + 1]) for i in range(len(test))])
    np.testing.assert_allclose(one_by_one, batch, atol=1e-5)
    det.fit_features(support, labels)  # new prototypes: the refined ones are stale
    assert det.test_prototypes_ is None


def test_small_batch_without_fixed_prototypes_warns_and_is_not_refined():
    support, labels, test, _, _ = shifted_domain(3)
    det = CosineDetector(backbone=None, progress=False, refine=3).fit_features(support, labels)
    plain = CosineDetector(backbone=None, progress=False).fit_features(support, labels)
    with pytest.warns(UserWarning, match="unrefined support prototypes"):
        s = det.score_features(test[:3])
    np.testing.assert_allclose(s, plain.score_features(test[:3]), atol=1e-6)


def test_relational_detector_refines_with_its_own_similarities():
    torch.manual_seed(0)
    model = RelationalModule(feature_dim=16, dim=8, depth=1, heads=2, backbone="identity")
    support, labels, test, _, _ = shifted_domain(4)
    det = ReSeNDDetector(model=model, backbone=None, progress=False, refine=2)
    det.fit_features(support, labels)
    p = det.refine_prototypes(det.prepare_features(test))
    assert p.shape == det.prototypes_.shape
    assert not torch.allclose(p, F.normalize(det.prototypes_, dim=1))
    assert det.score_features(test).shape == (len(test),)


def test_refinement_errors_are_clear():
    with pytest.raises(ValueError, match="does not support test-time prototype refinement"):
        KNNDetector(backbone=None, refine=2)
    with pytest.raises(ValueError, match="steps >= 0"):
        CosineDetector(backbone=None, refine=-1)
    with pytest.raises(ValueError, match="refine_fraction"):
        CosineDetector(backbone=None, refine=1, refine_fraction=0.0)
    with pytest.raises(ValueError, match="refine_keep"):
        CosineDetector(backbone=None, refine=1, refine_keep=1.5)
    model = RelationalModule(feature_dim=16, dim=8, depth=1, heads=2, backbone="identity")
    with pytest.raises(ValueError, match="neighbors"):
        ReSeNDDetector(model=model, backbone=None, refine=1, neighbors=3)
    raw = RelationalModule(feature_dim=16, dim=8, depth=1, heads=2, backbone="identity",
                           input_norm="none")
    with pytest.raises(ValueError, match="input_norm='l2'"):
        ReSeNDDetector(model=raw, backbone=None, refine=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ReSeNDDetector(model=raw, backbone=None, refine=0)  # off: any model is fine


def test_prototype_refiner_is_the_detectors_refinement():
    from resend_novelty.transforms import PrototypeRefiner

    support, labels, test, _, _ = shifted_domain(4)
    det = CosineDetector(backbone=None, progress=False, refine=2,
                         refine_fraction=0.5, refine_keep=0.6).fit_features(support, labels)
    x = det.prepare_features(test)
    refiner = PrototypeRefiner(2, 0.5, 0.6)
    p = refiner.refine(det.prototypes_, x,
                       lambda f, protos: F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T)
    torch.testing.assert_close(p, det.refine_prototypes(x))
    np.testing.assert_allclose(det.score_features(test),
                               det.similarities_features(x, prototypes=p).max(1).values, atol=1e-6)
    assert PrototypeRefiner(0).refine(det.prototypes_, x, None).shape == det.prototypes_.shape
    with pytest.raises(ValueError, match="refine must be"):
        PrototypeRefiner(-1)

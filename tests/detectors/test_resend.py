"""ReSeND detector: normality option, k-nearest support images, defaults from the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resend_novelty.detectors import ReSeNDDetector
from resend_novelty.models import RelationalModule


def test_resend_normality_option_and_checkpoint_default():
    torch.manual_seed(0)
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1)
    fs, labels = torch.randn(12, 6), np.repeat([0, 1, 2], 4)
    test = torch.randn(7, 6)
    soft = ReSeNDDetector(model=m, backbone=None).fit_features(fs, labels)
    maxl = ReSeNDDetector(model=m, backbone=None, normality="max-logit").fit_features(fs, labels)
    u = soft.similarities_features(test)
    np.testing.assert_allclose(soft.score_features(test), torch.softmax(u, 1).max(1).values, atol=1e-6)
    np.testing.assert_allclose(maxl.score_features(test), u.max(1).values, atol=1e-6)
    m2 = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, normality="max-logit")
    assert ReSeNDDetector(model=m2, backbone=None).normality == "max-logit"
    with pytest.raises(ValueError, match="normality"):
        ReSeNDDetector(model=m, backbone=None, normality="energy")
    with pytest.raises(ValueError, match="normality"):
        RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, normality="energy")


def test_resend_neighbors_mode():
    torch.manual_seed(0)
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, cosine_skip=True)
    fs, labels = torch.randn(15, 6), np.repeat([0, 1, 2], 5)
    test = torch.randn(9, 6)
    det = ReSeNDDetector(model=m, backbone=None, neighbors=2, chunk_pairs=6).fit_features(fs, labels)
    u = det.similarities_features(test)
    # brute force: mean logit with the 2 support images of each class nearest by cosine
    for n in range(9):
        for c in range(3):
            members = np.flatnonzero(labels == c)
            cos = torch.nn.functional.cosine_similarity(test[n:n + 1], fs[members])
            top = members[cos.topk(2).indices.numpy()]
            want = m(test[n:n + 1].expand(2, -1), fs[top]).mean().detach()
            assert abs(float(u[n, c]) - float(want)) < 1e-4
    # neighbors >= class size: the mean over all the class's images
    big = ReSeNDDetector(model=m, backbone=None, neighbors=50).fit_features(fs, labels)
    assert big.score_features(test).shape == (9,)
    with pytest.raises(ValueError, match="neighbors"):
        ReSeNDDetector(model=m, backbone=None, neighbors=-1)
    with pytest.raises(ValueError, match="needs neighbors"):
        ReSeNDDetector(model=m, backbone=None, neighbor_weight=0.5)
    with pytest.raises(ValueError, match="neighbor_weight"):
        ReSeNDDetector(model=m, backbone=None, neighbors=2, neighbor_weight=1.5)


@torch.no_grad()
def _neighbour_logits(m, x, fs, labels, c, k, leave_out=None):
    """Brute force: mean logit of x with the k support images of class c nearest by cosine."""
    members = [i for i in np.flatnonzero(labels == c) if i != leave_out]
    cos = torch.nn.functional.cosine_similarity(x[None], fs[members])
    top = [members[i] for i in cos.topk(min(k, len(members))).indices.tolist()]
    return float(m(x[None].expand(len(top), -1), fs[top]).mean())


@torch.no_grad()
def test_resend_hybrid_neighbours_and_prototypes():
    torch.manual_seed(1)
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=2, cosine_skip=True).eval()
    fs, labels = torch.randn(15, 6), np.repeat([0, 1, 2], 5)
    test = torch.randn(7, 6)
    det = ReSeNDDetector(model=m, backbone=None, neighbors=2, neighbor_weight=0.25)
    u = det.fit_features(fs, labels).similarities_features(test)
    protos = torch.stack([fs[labels == c].mean(0) for c in range(3)])
    for n in range(7):
        for c in range(3):
            want = (0.75 * float(m(test[n:n + 1], protos[c:c + 1]))
                    + 0.25 * _neighbour_logits(m, test[n], fs, labels, c, 2))
            assert abs(float(u[n, c]) - want) < 1e-4
    # neighbors=0: one prototype per class, whatever the weight default
    u0 = ReSeNDDetector(model=m, backbone=None, neighbors=0).fit_features(fs, labels)
    assert torch.allclose(u0.similarities_features(test), torch.stack(
        [m(test, protos[c:c + 1].expand(7, -1)) for c in range(3)], 1), atol=1e-5)


@pytest.mark.parametrize("k", [2, 5])  # k = 5: the class has only 5 images, one left out
@torch.no_grad()
def test_resend_neighbours_leave_one_out(k):
    torch.manual_seed(2)
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, cosine_skip=True).eval()
    fs, labels = torch.randn(15, 6), np.repeat([0, 1, 2], 5)
    det = ReSeNDDetector(model=m, backbone=None, neighbors=k, neighbor_weight=0.5)
    det.fit_features(fs, labels)
    u, used = det.loo_similarities_features(fs, labels)
    assert used.all()
    for i in (0, 7, 14):
        for c in range(3):
            own = labels[i] == c
            members = np.flatnonzero(labels == c)
            proto = fs[[j for j in members if j != i]].mean(0) if own else fs[members].mean(0)
            want = (0.5 * float(m(fs[i:i + 1], proto[None]))
                    + 0.5 * _neighbour_logits(m, fs[i], fs, labels, c, k,
                                              leave_out=i if own else None))
            assert abs(float(u[i, c]) - want) < 1e-4, (i, c)
    # calibrate works in this mode: at least 95% of the support accepted by its own threshold
    det.calibrate_features(fs, labels)
    assert det.calibration_["achieved_recall"] >= 0.95


def test_resend_neighbours_default_from_checkpoint():
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, neighbors=3, neighbor_weight=0.5)
    det = ReSeNDDetector(model=m, backbone=None)
    assert (det.neighbors, det.neighbor_weight) == (3, 0.5)
    assert ReSeNDDetector(model=m, backbone=None, neighbors=0).neighbors is None
    with pytest.raises(ValueError, match="neighbors=0"):  # the default blocks refinement: say how
        ReSeNDDetector(model=RelationalModule(feature_dim=6, dim=8, heads=2, depth=1,
                                              neighbors=3), backbone=None, refine=1)
    with pytest.raises(ValueError, match="neighbor_weight"):
        RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, neighbor_weight=2.0)

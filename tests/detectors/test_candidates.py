"""ReSeND candidate classes (``candidates=M``) and the chunked per-class neighbour search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resend_novelty.detectors import ReSeNDDetector
from resend_novelty.detectors.neighbors import SupportIndex
from resend_novelty.models import RelationalModule, ScoringConfig, split_config

K, PER, DIM = 7, 5, 12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (faster than several on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(seed=0, n_test=25):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(K, DIM, generator=g)
    fs = centers.repeat_interleave(PER, 0) + torch.randn(K * PER, DIM, generator=g)
    labels = np.repeat(np.arange(K), PER)
    pick = torch.randint(0, K, (n_test,), generator=g)
    test = centers[pick] + torch.randn(n_test, DIM, generator=g)
    test[-5:] = 3 * torch.randn(5, DIM, generator=g)  # a few far from every class
    return fs, labels, test


def _model():
    torch.manual_seed(0)
    return RelationalModule(feature_dim=DIM, dim=8, heads=2, depth=2, cosine_skip=True)


MODES = [dict(neighbors=0), dict(neighbors=3, neighbor_weight=0.5),
         dict(neighbors=3, neighbor_weight=1.0), dict(neighbors=10, neighbor_weight=0.3)]


def _det(m, candidates, normality="max-logit", **kw):
    return ReSeNDDetector(model=m, backbone=None, candidates=candidates, normality=normality,
                          progress=False, device="cpu", **kw)


@pytest.mark.parametrize("mode", MODES)
def test_m_at_least_classes_is_exact_bit_for_bit(mode):
    m, (fs, labels, test) = _model(), _data()
    exact = _det(m, 0, **mode).fit_features(fs, labels)
    u = exact.similarities_features(test)
    loo, used = exact.loo_similarities_features(fs, labels)
    for cand in (K, K + 5):
        det = _det(m, cand, **mode).fit_features(fs, labels)
        assert torch.equal(det.similarities_features(test), u)
        loo2, used2 = det.loo_similarities_features(fs, labels)
        assert torch.equal(loo2, loo) and np.array_equal(used2, used)
        det.calibrate_features(fs, labels)
        exact.calibrate_features(fs, labels)
        assert det.threshold_ == exact.threshold_


def _cheap(fs, labels, x, k, w):
    """Brute force cheap similarity: (1 - w) cos(x, prototype) + w mean of top-k cosines."""
    protos = torch.stack([fs[labels == c].mean(0) for c in range(K)])
    pc = F.normalize(x, dim=1) @ F.normalize(protos, dim=1).T
    if not k:
        return pc
    cos = F.normalize(x, dim=1) @ F.normalize(fs, dim=1).T
    near = torch.stack([cos[:, labels == c].topk(min(k, PER), dim=1).values.mean(1)
                        for c in range(K)], 1)
    return (1 - w) * pc + w * near


@pytest.mark.parametrize("mode", MODES)
def test_candidates_are_the_nearest_classes_with_exact_logits(mode):
    m, (fs, labels, test) = _model(), _data()
    exact = _det(m, 0, **mode).fit_features(fs, labels)
    det = _det(m, 3, **mode).fit_features(fs, labels)
    ue, uc = exact.similarities_features(test), det.similarities_features(test)
    fin = torch.isfinite(uc)
    assert (fin.sum(1) == 3).all()  # exactly M candidates, the others -inf
    assert torch.isneginf(uc[~fin]).all()
    k, w = mode.get("neighbors", 0), mode.get("neighbor_weight", 1.0)
    want = _cheap(fs, labels, test, k, w).topk(3, dim=1).indices.sort(1).values
    got = fin.nonzero()[:, 1].view(-1, 3)
    assert torch.equal(got, want)
    torch.testing.assert_close(uc[fin], ue[fin], rtol=0, atol=1e-5)
    # max-logit: the exact normality wherever the exact argmax is a candidate
    hit = fin.gather(1, ue.argmax(1, keepdim=True)).squeeze(1)
    assert hit.sum() >= len(test) - 5
    np.testing.assert_allclose(det.score_features(test)[hit.numpy()],
                               exact.score_features(test)[hit.numpy()], atol=1e-5)
    assert (det.nearest_class_features(test)[hit.numpy()]
            == exact.nearest_class_features(test)[hit.numpy()]).all()


def test_softmax_denominator_holds_the_candidates_only():
    m, (fs, labels, test) = _model(), _data()
    det = _det(m, 3, normality="softmax", neighbors=3).fit_features(fs, labels)
    exact = _det(m, 0, normality="softmax", neighbors=3).fit_features(fs, labels)
    u = det.similarities_features(test)
    fin = torch.isfinite(u)
    want = torch.softmax(u[fin].view(-1, 3), 1).max(1).values
    np.testing.assert_allclose(det.score_features(test), want.numpy(), atol=1e-6)
    assert (det.score_features(test) >= exact.score_features(test) - 1e-6).all()


def test_default_candidates_apply_to_max_logit_only():
    """The model's default M shortens max-logit scoring; softmax (whose denominator the shortcut
    would change) stays exact unless candidates= is passed."""
    m, (fs, labels, test) = _model(), _data()
    m.scoring = ScoringConfig(normality="softmax", neighbors=3, candidates=2)
    soft = ReSeNDDetector(model=m, backbone=None, progress=False, device="cpu")
    assert soft.candidates is None
    exact = _det(m, 0, normality="softmax", neighbors=3).fit_features(fs, labels)
    np.testing.assert_array_equal(soft.fit_features(fs, labels).score_features(test),
                                  exact.score_features(test))
    hard = ReSeNDDetector(model=m, backbone=None, progress=False, device="cpu",
                          normality="max-logit")
    assert hard.candidates == 2


@pytest.mark.parametrize("mode", MODES)
def test_leave_one_out_with_candidates(mode):
    m, (fs, labels, _) = _model(), _data()
    exact = _det(m, 0, **mode).fit_features(fs, labels)
    det = _det(m, 3, **mode).fit_features(fs, labels)
    le, used_e = exact.loo_similarities_features(fs, labels)
    lc, used = det.loo_similarities_features(fs, labels)
    assert np.array_equal(used, used_e)
    fin = torch.isfinite(lc)
    assert (fin.sum(1) == 3).all()
    # each candidate logit is the exact leave-one-out one (own prototype without the image,
    # the image never among its own neighbours)
    torch.testing.assert_close(lc[fin], le[fin], rtol=0, atol=1e-5)
    # candidates chosen on the leave-one-out cheap similarity: the own class is one of them
    # for these well-separated classes
    assert fin[torch.arange(len(labels)), torch.as_tensor(labels)].all()
    det.calibrate_features(fs, labels, tpr=0.9)
    assert np.isfinite(det.threshold_) and det.calibration_["achieved_recall"] >= 0.9


def test_candidates_validation_and_config_default():
    m = _model()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="candidates"):
            _det(m, bad)
        with pytest.raises(ValueError, match="candidates"):
            ScoringConfig(candidates=bad)
    # checkpoints written before the option existed load with the default
    _, scoring = split_config({"feature_dim": DIM, "normality": "max-logit", "neighbors": 2})
    assert scoring.candidates == ScoringConfig().candidates
    m2 = RelationalModule(feature_dim=DIM, dim=8, heads=2, depth=1, candidates=4,
                          normality="max-logit")  # the default M applies to max-logit
    assert ReSeNDDetector(model=m2, backbone=None).candidates == 4
    assert ReSeNDDetector(model=m2, backbone=None, candidates=0).candidates is None


def test_support_index_chunked_topk_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    support = torch.randn(40, DIM, generator=g)
    cls = torch.randint(0, 6, (40,), generator=g)
    cls[:6] = torch.arange(6)  # every class present; sizes differ (padding)
    index = SupportIndex(support, cls.numpy(), 6, budget=200)
    assert index.rows_per_chunk() * (40 + 1 + 6 * index.members.shape[1]) <= 200
    q = torch.randn(9, DIM, generator=g)
    cos = index.cosines(q, exclude=torch.arange(9))
    vals, rows = index.class_topk(cos, 3)
    brute = F.normalize(q, dim=1) @ F.normalize(support, dim=1).T
    brute[torch.arange(9), torch.arange(9)] = float("-inf")
    for c in range(6):
        members = torch.nonzero(cls == c).squeeze(1)
        kc = min(3, len(members))
        want = brute[:, members].topk(kc, dim=1)
        torch.testing.assert_close(vals[:, c, :kc], want.values)
        fin = torch.isfinite(want.values)
        assert torch.equal(rows[:, c, :kc][fin], members[want.indices][fin])
        assert torch.isneginf(vals[:, c, kc:]).all()  # padding of a small class
    # per-query classes
    sel = torch.tensor([[0, 2]] * 9)
    v2, r2 = index.class_topk(cos, 3, sel)
    assert torch.equal(v2, vals[:, [0, 2]]) and torch.equal(r2, rows[:, [0, 2]])


@pytest.mark.parametrize("candidates", [0, 3])
def test_small_chunks_give_the_same_scores(candidates):
    m, (fs, labels, test) = _model(), _data()
    big = _det(m, candidates, neighbors=3).fit_features(fs, labels)
    small = _det(m, candidates, neighbors=3).fit_features(fs, labels)
    small.neighbor_index_.budget = 100  # one or two test rows per block
    assert small.neighbor_index_.rows_per_chunk() < len(test)
    torch.testing.assert_close(small.similarities_features(test),
                               big.similarities_features(test), rtol=0, atol=1e-5)
    lb, _ = big.loo_similarities_features(fs, labels)
    ls, _ = small.loo_similarities_features(fs, labels)
    torch.testing.assert_close(ls, lb, rtol=0, atol=1e-5)

"""Per-domain feature normalisation, domain-aware detectors, the proxy validation benchmark."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from resend_novelty.evaluation.settings import get_setting
from resend_novelty.data.images import ImageRecord
from resend_novelty.detectors.base import (CenteredCosineDetector, CosineDetector, ReSeNDDetector,
                                      StandardizedCosineDetector, build_detector)
from resend_novelty.transforms.domain_norm import STD_FLOOR, domain_statistics, normalize_by_domain
from resend_novelty.models.relational import RelationalModule
from resend_novelty.training.loop import TrainConfig, proxy_validation_auroc
from resend_novelty.evaluation.proxy import ProxySet, evaluate_proxy, load_proxy_set, proxy_episodes


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
def _synthetic_proxy(n_classes=9, per=8, dim=16, shift=3.0, seed=0) -> ProxySet:
    """Classes = well separated directions; each domain adds its own offset."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * 4
    offsets = rng.normal(size=(4, dim)) * shift
    f, y, d = [], [], []
    for c in range(n_classes):
        for i in range(per * 4):
            f.append(centers[c] + offsets[i % 4] + rng.normal(size=dim))
            y.append(c + 100)
            d.append(i % 4)
    return ProxySet(torch.tensor(np.array(f), dtype=torch.float32), np.array(y), np.array(d),
                    np.arange(n_classes) + 100)


def test_proxy_episodes_are_seeded_and_disjoint():
    classes = np.arange(10)
    a, b = proxy_episodes(classes, 5, 6, 1, seed=3), proxy_episodes(classes, 5, 6, 1, seed=3)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    for known, unknown in a:
        assert len(known) == 6 and len(unknown) == 1 and not set(known) & set(unknown)
    with pytest.raises(ValueError):
        proxy_episodes(classes, 1, 10, 1)


def test_evaluate_proxy_protocol_and_domain_normalisation():
    ps = _synthetic_proxy()
    seen = []

    class Spy(CosineDetector):
        def fit_features(self, features, labels, domains=None):
            seen.append(("fit", set(np.unique(domains).tolist()), len(np.unique(labels))))
            return super().fit_features(features, labels, domains=domains)

    res = evaluate_proxy(lambda: Spy(backbone=None, progress=False), ps, n_episodes=3,
                         n_known=4, n_unknown=2, settings=("multi", "single", "in-domain"))
    assert set(res) == {"multi", "single", "in-domain"}
    assert set(res["multi"]) == {"photo", "sketch", "cartoon", "painting", "avg"}
    assert {frozenset(s) for _, s, _ in seen[:12]} == {frozenset({0, 1, 2, 3} - {t}) for t in range(4)}
    assert all(k == 4 for *_, k in seen)
    # the domain offsets hurt raw cosine; per-domain normalisation removes them
    raw = evaluate_proxy(lambda: CosineDetector(backbone=None), ps, n_episodes=4, n_known=4,
                         n_unknown=2)
    std = evaluate_proxy(lambda: StandardizedCosineDetector(backbone=None), ps, n_episodes=4,
                         n_known=4, n_unknown=2)
    assert std["multi"]["avg"]["auroc"] > raw["multi"]["avg"]["auroc"]
    assert std["single"]["avg"]["auroc"] > 0.9


def test_proxy_validation_of_a_relational_model():
    ps = _synthetic_proxy(dim=12)
    m = RelationalModule(feature_dim=12, dim=8, heads=2, depth=1, cosine_skip=True,
                         standardize_features=True)
    m.train()
    v = proxy_validation_auroc(m, ps, episodes=3, seed=0)
    assert 0.0 <= v <= 1.0 and m.training  # the training mode is restored
    with pytest.raises(ValueError, match="val_protocol"):
        TrainConfig(val_protocol="pacs")


def _reference_images(tmp_path):
    """tmp_path/ref/c<k>/<i>.png: 5 classes x 8 small images."""
    from conftest import make_image

    for c in range(5):
        for i in range(8):
            make_image(tmp_path / "ref" / f"c{c}" / f"{i}.png", (40 * c, 200 - 30 * c, 90),
                       size=(24, 24), noise_seed=c * 10 + i)


def test_load_proxy_set_renders_each_image_in_one_domain(tmp_path, tiny_backbone):
    _reference_images(tmp_path)
    ps = load_proxy_set(str(tmp_path / "ref"), val_classes=3, seed=0, per_class=8,
                        backbone=tiny_backbone, progress=False)
    assert len(ps.classes) == 3 and ps.features.shape == (3 * 8, 16)
    for c in ps.classes:  # 8 images of a class: 2 per domain
        assert np.bincount(ps.domain[ps.labels == c], minlength=4).tolist() == [2, 2, 2, 2]


def test_load_proxy_set_all_renderings_and_disjoint_support(tmp_path, tiny_backbone):
    _reference_images(tmp_path)
    one = load_proxy_set(str(tmp_path / "ref"), val_classes=3, seed=0, per_class=8,
                         backbone=tiny_backbone, progress=False)
    ps = load_proxy_set(str(tmp_path / "ref"), val_classes=3, seed=0, per_class=8,
                        backbone=tiny_backbone, progress=False, renderings="all")
    assert ps.features.shape == (4 * 3 * 8, 16)
    for c in ps.classes:  # every image of a class in every domain
        for d in range(4):
            assert sorted(ps.rank[(ps.labels == c) & (ps.domain == d)].tolist()) == list(range(8))
    # the renderings of "one" are among those of "all", with the same features
    for d in range(4):
        a = one.features[one.domain == d]
        b = ps.features[(ps.domain == d) & (ps.split == d)]
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="renderings"):
        load_proxy_set(str(tmp_path / "ref"), renderings="some", backbone=tiny_backbone)

    seen = []

    class Spy(CosineDetector):
        def fit_features(self, features, labels, domains=None):
            seen.append(features)
            return super().fit_features(features, labels, domains=domains)

        def score_features(self, features):
            seen.append(features)
            return super().score_features(features)

    evaluate_proxy(lambda: Spy(backbone=None, progress=False), ps, n_episodes=2, n_known=2,
                   n_unknown=1, settings=("multi", "single"))
    rows = {tuple(f.tolist()): i for i, f in enumerate(ps.features)}
    for support, test in zip(seen[::2], seen[1::2]):
        s_idx = [rows[tuple(f.tolist())] for f in support]
        t_idx = [rows[tuple(f.tolist())] for f in test]
        # no source image is both in the support and in the test set, whatever its rendering
        s_img = {(ps.labels[i], ps.rank[i]) for i in s_idx}
        assert not s_img & {(ps.labels[i], ps.rank[i]) for i in t_idx}
        assert len(set(ps.domain[t_idx].tolist())) == 1
    # multi-source supports are three times the "one" supports: 6 images x 3 domains per class
    assert len(seen[0]) == 2 * 6 * 3


def test_stylised_views_do_not_depend_on_how_the_path_is_written(tmp_path, tiny_backbone,
                                                                 monkeypatch):
    from conftest import make_image

    from resend_novelty.data.augment import DomainShiftView
    from resend_novelty.features.extract import extract_features

    p = make_image(tmp_path / "a" / "x.png", (200, 100, 50), size=(48, 48))
    aug = DomainShiftView(0, tiny_backbone.transform)
    kw = dict(transform=aug, namespace_suffix=aug.namespace_suffix, progress=False, num_workers=0)
    absolute = extract_features(tiny_backbone, [str(p)], cache=False, **kw)
    monkeypatch.chdir(tmp_path / "a")
    relative = extract_features(tiny_backbone, ["x.png"], cache=False, **kw)
    torch.testing.assert_close(absolute, relative)
    assert os.path.isabs(str(p))


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


def test_cross_domain_pairs():
    from resend_novelty.training.pairs import PairSampler

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


def test_osdg_auto_normalisation_follows_the_normality():
    from resend_novelty.osdg.evaluate import default_normalization

    soft = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1)
    maxl = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, normality="max-logit")
    assert default_normalization("resend", soft) == "none"
    assert default_normalization("resend", maxl) == "zscore"
    assert default_normalization("cosine") == "zscore"


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

"""The proxy validation benchmark: episodes, protocol, domain normalisation, stylised views."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from resend_novelty.detectors import CosineDetector, StandardizedCosineDetector
from resend_novelty.evaluation import ProxySet, evaluate_proxy, load_proxy_set, proxy_episodes
from resend_novelty.models import RelationalModule
from resend_novelty.training import TrainConfig, proxy_validation_auroc


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

    from resend_novelty.data import DomainShiftView
    from resend_novelty.features import extract_features

    p = make_image(tmp_path / "a" / "x.png", (200, 100, 50), size=(48, 48))
    aug = DomainShiftView(0, tiny_backbone.transform)
    kw = dict(transform=aug, namespace_suffix=aug.namespace_suffix, progress=False, num_workers=0)
    absolute = extract_features(tiny_backbone, [str(p)], cache=False, **kw)
    monkeypatch.chdir(tmp_path / "a")
    relative = extract_features(tiny_backbone, ["x.png"], cache=False, **kw)
    torch.testing.assert_close(absolute, relative)
    assert os.path.isabs(str(p))

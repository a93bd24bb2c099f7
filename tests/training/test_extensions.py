"""Extensions beyond the paper: cosine skip, test-time centring, stylised views, prototype partners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from resend_novelty.data import STYLES, DomainShiftView, stylise
from resend_novelty.detectors import CenteredCosineDetector, CosineDetector, ReSeNDDetector
from resend_novelty.models import RelationalModule, load_checkpoint
from resend_novelty.training import TrainConfig, center_by_domain, train


def test_cosine_skip_starts_at_the_cosine_term_and_stays_symmetric():
    m = RelationalModule(feature_dim=12, dim=8, heads=2, depth=2, cosine_skip=True).eval()
    a, b = torch.randn(5, 12), torch.randn(5, 12)
    expected = 10.0 * (F.cosine_similarity(a, b) - 0.5)
    torch.testing.assert_close(m(a, b), expected, atol=1e-5, rtol=0)
    torch.nn.init.normal_(m.head.weight)  # once trained, still symmetric
    torch.testing.assert_close(m(a, b), m(b, a), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.pairwise_logits(a, b[:3]),
                               torch.stack([m(a[i:i + 1].expand(3, -1), b[:3]) for i in range(5)]),
                               atol=1e-5, rtol=0)


def test_centered_cosine_matches_manual_centring():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(20, 6, generator=g) + 3, torch.randn(30, 6, generator=g) - 2
    labels = np.repeat([0, 1], 10)
    det = CenteredCosineDetector(backbone=None).fit_features(fs, labels)
    cs = fs - fs.mean(0)
    protos = torch.stack([cs[:10].mean(0), cs[10:].mean(0)])
    want = (F.normalize(ft - ft.mean(0), dim=1) @ F.normalize(protos, dim=1).T).max(1).values
    np.testing.assert_allclose(det.score_features(ft), want.numpy(), atol=1e-6)
    # a shift common to all test images (a "domain") does not change centred scores
    np.testing.assert_allclose(det.score_features(ft + 5.0), det.score_features(ft), atol=1e-5)
    plain = CosineDetector(backbone=None).fit_features(fs, labels)
    assert not np.allclose(plain.score_features(ft + 5.0), plain.score_features(ft))


def test_small_batches_fall_back_to_support_mean_or_fixed_test_mean():
    fs = torch.randn(20, 6) + 1
    det = CenteredCosineDetector(backbone=None).fit_features(fs, np.repeat([0, 1], 10))
    with pytest.warns(UserWarning, match="support statistics"):
        det.score_features(torch.randn(3, 6))
    ft = torch.randn(40, 6)
    det.set_test_mean(ft)
    np.testing.assert_allclose(det.score_features(ft[:3]), det.score_features(ft)[:3], atol=1e-6)


def test_resend_detector_follows_the_checkpoint_centring_flag():
    m = RelationalModule(feature_dim=6, dim=8, heads=2, depth=1, center_features=True)
    assert ReSeNDDetector(model=m, backbone=None).center
    assert not ReSeNDDetector(model=m, backbone=None, center=False).center


def test_center_by_domain():
    f = torch.tensor([[1.0, 1.0], [3.0, 3.0], [10.0, 0.0], [12.0, 0.0]])
    out = center_by_domain(f, np.array([0, 0, 1, 1]), np.ones(4, bool))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_stylised_views_are_deterministic_images(style):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    a, b = stylise(img, style, 7), stylise(img, style, 7)
    assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a.resize(img.size)), np.asarray(img))


def test_domain_shift_view_namespace_and_seed():
    v = DomainShiftView(1, lambda im: im, ("sketch", "cartoon"))
    assert v.style == "cartoon" and "cartoon" in v.namespace_suffix
    assert v.seed_for("a.jpg") == v.seed_for("a.jpg") != v.seed_for("b.jpg")
    with pytest.raises(ValueError, match="unknown style"):
        DomainShiftView(0, lambda im: im, ("watercolour",))


def test_training_with_partner_sets_cosine_skip_and_centring(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(12)
    feats = (torch.randn(8, 16, generator=g)[labels] + 0.5 * torch.randn(96, 16, generator=g)).relu() + 1
    path = tmp_path / "f.safetensors"
    save_file({"features": feats, "labels": labels}, str(path))
    cfg = TrainConfig(data=str(path), out=str(tmp_path / "r"), steps=20, batch_pairs=64, lr=2e-3,
                      warmup=2, optimizer="adamw", val_classes=4, val_every=5, checkpoint_every=10,
                      partner_set=4,
                      model={"dim": 16, "heads": 2, "depth": 1, "cosine_skip": True,
                             "center_features": True})
    s = train(cfg, progress=False)
    assert s["step"] == 20 and s["best_val_auroc"] is not None
    m = load_checkpoint(tmp_path / "r" / "final.safetensors")
    assert m.config.cosine_skip and m.config.center_features


def test_end_to_end_mode_trains_backbone_validates_and_keeps_best(tmp_path, monkeypatch, tiny_backbone):
    from conftest import make_image

    from resend_novelty import backbones

    monkeypatch.setitem(backbones.BACKBONES, "tiny_test_cnn", lambda **kw: tiny_backbone)
    for c in range(6):
        for i in range(4):
            make_image(tmp_path / "ref" / f"c{c}" / f"{i}.png", (40 * c, 200 - 30 * c, 100),
                       noise_seed=c * 10 + i)
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    cfg = TrainConfig(data=str(tmp_path / "ref"), out=str(tmp_path / "out"), backbone="tiny_test_cnn",
                      frozen_backbone=False, steps=4, batch_pairs=8, optimizer="adamw", lr=1e-2,
                      warmup=1, val_classes=2, val_every=2, checkpoint_every=2, workers=0,
                      model={"dim": 8, "heads": 2, "depth": 1})
    s = train(cfg, progress=False)
    assert s["best_val_auroc"] is not None
    assert (tmp_path / "out" / "best_backbone.safetensors").exists()
    after = tiny_backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "backbone was not trained"

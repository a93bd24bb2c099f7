"""Baselines (paper Tables 2, 3) and relational-module ablations (Table 5): tiny CPU checks."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from resend_novelty.cli.detector_options import baseline_kwargs
from resend_novelty.cli.main import main
from resend_novelty.detectors import (
    BASELINES,
    DETECTORS,
    FT_METHODS,
    GramDetector,
    GramStats,
    KNNDetector,
    ReSeNDDetector,
    build_detector,
    gram_statistics,
    train_head,
)
from resend_novelty.evaluation import auroc
from resend_novelty.models import (ARCHS, RelationalConfig, RelationalModule, build_relational,
                                   load_checkpoint, save_checkpoint)

K, D = 4, 24


@pytest.fixture
def clusters():
    """Support of K Gaussian classes; test = the K known classes + 2 unknown ones."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(K + 2, D, generator=g) * 3
    s_lab = np.repeat(np.arange(K), 30) * 10 + 3  # non-contiguous labels
    support = centers[s_lab // 10] + torch.randn(len(s_lab), D, generator=g)
    t_cls = np.repeat(np.arange(K + 2), 15)
    test = centers[t_cls] + torch.randn(len(t_cls), D, generator=g)
    return support, s_lab, test, t_cls * 10 + 3, t_cls < K


def _quality(det, clusters):
    support, s_lab, test, t_lab, known = clusters
    det.fit_features(support, s_lab)
    scores = det.score_features(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    acc = (det.nearest_class_features(test)[known] == t_lab[known]).mean()
    return auroc(scores, known), acc


# ---------------------------------------------------------------------------- registry / CLI
def test_every_baseline_is_registered_and_buildable(tiny_backbone):
    expected = {"knn", "mahalanobis", "gram", "ft-msp", "ft-maxlogit", "ft-energy", "ft-odin",
                "ft-gradnorm", "ft-mahalanobis", "ft-gram"}
    assert expected == set(BASELINES) and expected <= set(DETECTORS)
    for name in ("knn", "gram"):  # no pytorch-ood needed
        det = build_detector(name, backbone=tiny_backbone, progress=False)
        assert det.name == name
    with pytest.raises(ValueError, match="only used by the resend"):
        build_detector("knn", model=object())


def test_cli_help_lists_baselines_and_options(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    out = capsys.readouterr().out
    for name in ("knn", "ft-odin", "ft-gradnorm", "gram", "--ft-budget", "--knn-k"):
        assert name in out


def test_baseline_kwargs_from_cli_options():
    ns = argparse.Namespace(method="knn", knn_k=3, model=None)
    assert baseline_kwargs(ns) == {"k": 3}
    ns = argparse.Namespace(method="ft-odin", ft_budget="2.5", ft_epochs=None, ft_hidden=None,
                            ft_lr=0.01, model=None, odin_temperature=10.0, odin_eps=0.0)
    kw = baseline_kwargs(ns)
    assert kw["budget"] == 2.5 and kw["temperature"] == 10.0 and kw["odin_eps"] == 0.0
    ns.ft_budget = "0"
    with pytest.raises(ValueError, match="--ft-epochs"):
        baseline_kwargs(ns)
    ns.ft_budget = "soon"
    with pytest.raises(ValueError, match="resend' or seconds"):
        baseline_kwargs(ns)
    assert baseline_kwargs(argparse.Namespace(method="cosine")) == {}


# ---------------------------------------------------------------------------- kNN
def test_knn_separates_unknowns_and_predicts_classes(clusters):
    a, acc = _quality(KNNDetector(k=5, backbone=None, progress=False), clusters)
    assert a > 0.95 and acc > 0.95


def test_knn_similarity_is_mean_of_k_nearest_per_class():
    support = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]])
    det = KNNDetector(k=2, backbone=None, progress=False).fit_features(support, [0, 0, 1, 1])
    u = det.similarities_features(torch.tensor([[1.0, 0.0]]))
    cos = torch.nn.functional.normalize(support, dim=1) @ torch.tensor([1.0, 0.0])
    assert torch.allclose(u[0], torch.stack([cos[:2].mean(), cos[2:].mean()]), atol=1e-6)
    # k larger than a class: all of its images
    det3 = KNNDetector(k=3, backbone=None, progress=False).fit_features(support, [0, 0, 0, 1])
    u3 = det3.similarities_features(torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(u3[0, 0], cos[:3].mean()) and torch.allclose(u3[0, 1], cos[3])


def test_knn_leave_one_out_excludes_the_image_itself(clusters):
    support, s_lab, *_ = clusters
    det = KNNDetector(k=1, backbone=None, progress=False).fit_features(support, s_lab)
    full = det.score_features(support)
    assert np.allclose(full, 1.0, atol=1e-5)  # its own nearest neighbour
    loo, used = det.loo_scores_features(support, s_lab)
    assert used.all() and (loo < 1.0 - 1e-4).all()
    det.calibrate_features(support, s_lab, tpr=0.9)
    assert det.calibration_["achieved_recall"] >= 0.9
    # small classes (<= k images): LOO = mean cosine to the other images of the class
    small = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [-0.6, -0.8]])
    det = KNNDetector(k=5, backbone=None, progress=False).fit_features(small, [0, 0, 0, 1, 1])
    loo, used = det.loo_scores_features(small, [0, 0, 0, 1, 1])
    cos = small @ small.T
    want0 = max((cos[0, 1] + cos[0, 2]) / 2, (cos[0, 3] + cos[0, 4]) / 2)
    assert used.all() and np.isclose(loo[0], float(want0))
    assert np.isclose(loo[3], float(max(cos[3, 4], cos[3, :3].mean())))


def test_knn_and_fine_tuning_centre_support_like_test(clusters):
    support, s_lab, test, *_ = clusters
    shift = torch.full((D,), 7.0)
    a = KNNDetector(k=3, backbone=None, progress=False).fit_features(
        support - support.mean(0), s_lab)
    b = KNNDetector(k=3, backbone=None, progress=False, center=True).fit_features(support, s_lab)
    # support centred on its mean, test on its own: a shift of the whole test domain is removed
    assert np.allclose(b.score_features(test + shift), a.score_features(test - test.mean(0)),
                       atol=1e-5)
    with pytest.raises(ValueError, match="center"):
        GramDetector(backbone=None, center=True)
    pytest.importorskip("pytorch_ood")
    ft = build_detector("ft-msp", backbone=None, progress=False, budget=None, epochs=3,
                        center=True).fit_features(support, s_lab)
    assert np.allclose(ft.score_features(test), ft.score_features(test + shift), atol=1e-5)


def test_knn_on_image_folders(class_folders, tiny_backbone):
    det = KNNDetector(k=2, backbone=tiny_backbone, device="cpu", num_workers=0, progress=False)
    det.fit(class_folders / "support")
    assert det.class_names_ == ["blue", "green", "red"]
    scores = det.score(class_folders / "test")
    assert scores.shape == (12,)


# ---------------------------------------------------------------------------- Mahalanobis
def test_mahalanobis_formula_and_quality(clusters):
    pytest.importorskip("pytorch_ood")
    det = build_detector("mahalanobis", backbone=None, progress=False)
    a, acc = _quality(det, clusters)
    assert a > 0.95 and acc > 0.95
    support, s_lab, test, *_ = clusters
    # tied covariance: pooled within-class scatter (+ ridge), class means = prototypes
    x = support.double()
    mu = det.prototypes_.double()
    idx = np.searchsorted(det.classes_, s_lab)
    centred = x - mu[idx]
    prec = torch.linalg.inv(centred.T @ centred + 1e-6 * torch.eye(D, dtype=torch.float64))
    d = test[:5].double()[:, None, :] - mu[None]
    want = -0.5 * torch.einsum("nkd,de,nke->nk", d, prec, d)
    assert torch.allclose(det.similarities_features(test[:5]).double(), want, rtol=1e-4)


# ---------------------------------------------------------------------------- fine-tuning
def test_train_head_epochs_and_budget(clusters):
    support, s_lab, *_ = clusters
    y = torch.as_tensor(np.searchsorted(np.unique(s_lab), s_lab))
    head, info = train_head(support, y, K, epochs=3, batch_size=32)
    assert info["steps"] == 3 * 4 and info["epochs"] == 3
    assert info["train_accuracy"] > 0.9
    _, info = train_head(support, y, K, seconds=0.2, batch_size=32)
    assert info["seconds"] >= 0.2 and info["steps"] >= 1
    h1, _ = train_head(support, y, K, epochs=2, seed=5, hidden=8)
    h2, _ = train_head(support, y, K, epochs=2, seed=5, hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values()))
    with pytest.raises(ValueError, match="budget"):
        train_head(support, y, K)


@pytest.mark.parametrize("method", [m for m in FT_METHODS if m != "ft-gram"])
def test_fine_tuned_detectors(method, clusters):
    pytest.importorskip("pytorch_ood")
    det = build_detector(method, backbone=None, progress=False, budget=None, epochs=15)
    a, acc = _quality(det, clusters)
    assert acc > 0.9, method
    assert a > (0.8 if method == "ft-gradnorm" else 0.9), method
    assert det.ft_info_["epochs"] == 15
    assert det.ft_info_["hidden"] == (512 if method == "ft-mahalanobis" else 0)
    support, s_lab, test, *_ = clusters
    pred = det.predict_features(test, threshold=np.inf)
    assert (pred == -1).all()
    with pytest.raises(ValueError, match="leave-one-out"):
        det.calibrate_features(support, s_lab)


def test_benchmark_path_uses_each_detectors_own_score(clusters, tmp_path, tiny_backbone):
    """run_benchmark may take score and class from one call: it must equal score_features."""
    from resend_novelty.evaluation import Setting, Target, run_benchmark

    support, s_lab, test, t_lab, _ = clusters
    names = ["knn", "mahalanobis", "ft-msp", "ft-energy", "ft-odin", "ft-gradnorm",
             "ft-mahalanobis"]
    if importlib.util.find_spec("pytorch_ood") is None:
        names = ["knn"]
    for name in names:
        kw = {"budget": None, "epochs": 5} if name.startswith("ft-") else {}
        det = build_detector(name, backbone=None, progress=False, **kw).fit_features(support, s_lab)
        want = det.score_features(test)
        if hasattr(det, "score_and_nearest_features"):
            got, pred = det.score_and_nearest_features(test)
            assert np.allclose(got, want, atol=1e-6), name
            assert np.array_equal(pred, det.nearest_class_features(test)), name
    # and end to end through run_benchmark on a tiny image setting (Gram: its own score too)
    from conftest import make_image

    root = tmp_path / "data"
    lines = {"support.txt": [], "test.txt": []}
    for c, color in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]):
        for i in range(12):
            rel = f"img/{c}_{i}.png"
            make_image(root / rel, color, size=(32, 32), noise_seed=100 * c + i)
            if c < 3 and i < 6:
                lines["support.txt"].append(f"{rel} {c}")
            elif i >= 6:
                lines["test.txt"].append(f"{rel} {c}")
    lists = root / "lists"
    lists.mkdir()
    for f, ls in lines.items():
        (lists / f).write_text("\n".join(ls) + "\n")
    setting = Setting(name="tiny", title="tiny", list_dir="lists",
                      targets=(Target("t", "support.txt", "test.txt"),))
    det_args = dict(backbone=tiny_backbone, layers=["net.0"], poles=(1,), device="cpu",
                    num_workers=0, progress=False)
    made = []

    def make():
        made.append(GramDetector(**det_args))
        return made[-1]

    res = run_benchmark(setting, root, make, progress=False)
    det = made[-1]
    feats = det.features([str(root / f"img/{c}_{i}.png") for c in range(4) for i in range(6, 12)])[0]
    scores = det.score_features(feats)
    assert np.isclose(res["targets"]["t"]["auroc"], auroc(scores, np.repeat([1, 1, 1, 0], 6) == 1))


def test_fine_tuned_scores_match_their_formulas(clusters):
    pytest.importorskip("pytorch_ood")
    support, s_lab, test, *_ = clusters
    scores = {}
    for name in ("ft-msp", "ft-maxlogit", "ft-energy"):
        det = build_detector(name, backbone=None, progress=False, budget=None, epochs=5)
        det.fit_features(support, s_lab)
        scores[name] = (det.score_features(test), det.similarities_features(test))
    logits = scores["ft-msp"][1]  # same seed and data: the same head for all three
    assert torch.allclose(scores["ft-energy"][1], logits)
    assert np.allclose(scores["ft-msp"][0], logits.softmax(1).max(1).values.numpy(), atol=1e-6)
    assert np.allclose(scores["ft-maxlogit"][0], logits.max(1).values.numpy(), atol=1e-5)
    assert np.allclose(scores["ft-energy"][0], torch.logsumexp(logits, 1).numpy(), atol=1e-5)


def test_fine_tuning_budget_is_the_resend_evaluation_time(clusters, tmp_path):
    pytest.importorskip("pytorch_ood")
    support, s_lab, test, *_ = clusters
    model = RelationalModule(RelationalConfig(feature_dim=D, dim=16, depth=1, heads=2))
    det = build_detector("ft-energy", backbone=None, progress=False, budget_model=model)
    det.fit_features(support, s_lab)
    assert det.head_ is None  # trained when the test set is first scored
    det.score_features(test)
    info = det.ft_info_
    assert info["budget_rule"].startswith("ReSeND evaluation time")
    assert 0 < info["budget_s"] <= info["seconds"] + 1e-9 and info["steps"] >= 1
    # a checkpoint path works as the budget model too
    save_checkpoint(model, tmp_path / "m.safetensors")
    det = build_detector("ft-msp", backbone=None, progress=False,
                         budget_model=str(tmp_path / "m.safetensors"))
    det.fit_features(support, s_lab)
    det.nearest_class_features(test)
    assert det.ft_info_["budget_s"] > 0
    # a budget model of another feature size (the shipped Lite0+Lite1 one next to a Lite0 head)
    # is timed on stand-in features of its own size, and says so
    wide = RelationalModule(RelationalConfig(feature_dim=2 * D, dim=16, depth=1, heads=2))
    det = build_detector("ft-msp", backbone=None, progress=False, budget_model=wide)
    det.fit_features(support, s_lab)
    det.score_features(test)
    assert det.ft_info_["budget_s"] > 0 and "stand-in features" in det.ft_info_["budget_rule"]


def test_fixed_budget_in_seconds(clusters):
    pytest.importorskip("pytorch_ood")
    support, s_lab, test, *_ = clusters
    det = build_detector("ft-gradnorm", backbone=None, progress=False, budget=0.1)
    det.fit_features(support, s_lab)
    assert det.ft_info_["budget_s"] == 0.1 and det.ft_info_["seconds"] >= 0.1
    with pytest.raises(ValueError, match="positive"):
        build_detector("ft-msp", backbone=None, budget=-1.0)


# ---------------------------------------------------------------------------- Gram
def test_gram_statistics_match_the_definition():
    f = torch.randn(2, 3, 4, 5)
    for p in (1, 2, 3):
        got = gram_statistics(f, p)
        fp = f.double().flatten(2) ** p
        g = (fp @ fp.transpose(1, 2)).sum(dim=2)
        assert torch.allclose(got, g.sign() * g.abs() ** (1 / p))


def test_gram_stats_backbone_hooks_and_cache_namespace(tiny_backbone):
    gs = GramStats(tiny_backbone, layers=["net.0", "net.1"], poles=(1, 2))
    assert gs.channels == [16, 16] and gs.feature_dim == 64
    assert gs.cache_namespace.startswith(tiny_backbone.cache_namespace) and "gram" in gs.cache_namespace
    out = gs(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 64)
    tiny_backbone(torch.rand(2, 3, 32, 32))  # the base alone records nothing
    assert gs._outputs == []
    with pytest.raises(ValueError, match="no module"):
        GramStats(tiny_backbone, layers=["nope"])


def test_gram_detector_on_images(class_folders, tiny_backbone):
    det = GramDetector(backbone=tiny_backbone, layers=["net.0", "net.1"], poles=(1, 2),
                       device="cpu", num_workers=0, progress=False)
    det.fit(class_folders / "support")
    support = det.features(class_folders / "support")[0]
    assert support.shape[1] == 16 + 64
    # every support image lies within its own class's bounds (no hold-out under 10 images)
    assert np.allclose(det.score_features(support), 0.0)
    test = det.score(class_folders / "test")
    assert test.shape == (12,) and (test <= 0).all()
    # an image far from everything deviates
    odd = det.score(torch.full((1, 3, 32, 32), 5.0))
    assert odd[0] < 0
    with pytest.raises(ValueError, match="Gram features"):
        det.fit_features(torch.randn(4, 16), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="leave-one-out"):
        det.calibrate(class_folders / "support")


def test_gram_normalises_by_held_out_deviation(tiny_backbone):
    pytest.importorskip("pytorch_ood")  # ft-gram fine-tunes a head with pytorch-ood scoring
    torch.manual_seed(0)
    images = torch.rand(40, 3, 32, 32)
    labels = np.repeat([0, 1], 20)
    images[20:] *= 0.3
    for fine_tune in (False, True):
        det = GramDetector(backbone=tiny_backbone, layers=["net.0"], poles=(1,), device="cpu",
                           progress=False, fine_tune=fine_tune, budget=None, epochs=5)
        det.fit(images, labels)
        assert det._norm.shape == (1,) and det._norm[0] > 0
        s = det.score(torch.rand(5, 3, 32, 32) * 3)
        assert (s < 0).all()
        if fine_tune:
            assert det.ft_info_["epochs"] == 5


# ---------------------------------------------------------------------------- ablation models
@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_models_interface_and_checkpoints(arch, tmp_path):
    cfg = RelationalConfig(feature_dim=D, dim=32, depth=2, heads=2, arch=arch)
    model = build_relational(cfg).eval()
    assert isinstance(model, RelationalModule) and model.config.arch == arch
    ref = build_relational(RelationalConfig(feature_dim=D, dim=32, depth=2, heads=2))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(n(model) - n(ref)) / n(ref) < 0.02  # similar parameter count
    f, g = torch.randn(5, D), torch.randn(3, D)
    u = model.pairwise_logits(f, g, chunk_pairs=4)
    assert u.shape == (5, 3)
    assert torch.allclose(u[2, 1], model(f[2:3], g[1:2])[0], atol=1e-5)
    if arch in ("max", "sum", "transformer"):
        assert torch.allclose(model(f[:3], g), model(g, f[:3]), atol=1e-5)  # symmetric
    save_checkpoint(model, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert type(back) is type(model) and back.config == model.config
    assert torch.allclose(back(f[:3], g), model(f[:3], g))
    det = ReSeNDDetector(model=back, backbone=None, progress=False)
    det.fit_features(torch.randn(6, D), [0, 0, 1, 1, 2, 2])
    assert det.score_features(f).shape == (5,)


@pytest.mark.parametrize("arch", ("max", "concat"))
def test_ablation_supports_the_cosine_skip(arch):
    cfg = RelationalConfig(feature_dim=D, dim=16, depth=2, heads=2, arch=arch, cosine_skip=True)
    model = build_relational(cfg).eval()
    f, g = torch.randn(4, D), torch.randn(3, D)
    cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(g, dim=1).T
    # head initialised at zero: the model starts as the cosine detector (up to the head bias)
    assert torch.allclose(model.pairwise_logits(f, g), 10.0 * (cos - 0.5), atol=1e-5)
    assert torch.allclose(model(f[:3], g), torch.diagonal(model.pairwise_logits(f[:3], g)), atol=1e-5)


def test_config_arch_default_and_validation():
    assert RelationalConfig.from_dict({"feature_dim": 8, "dim": 8, "heads": 2}).arch == "transformer"
    with pytest.raises(ValueError, match="arch"):
        RelationalConfig(arch="mean")
    with pytest.raises(ValueError, match="build_relational"):
        RelationalModule(RelationalConfig(arch="max"))


@pytest.mark.parametrize("arch,loss", [("concat", "mse"), ("max", "bce")])
def test_ablation_trains_with_the_same_pipeline(arch, loss, tmp_path):
    from resend_novelty.training import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, D, generator=g) * 2
    labels = torch.arange(8).repeat_interleave(10)
    feats = (centers[labels] + torch.randn(len(labels), D, generator=g)).relu()
    save_file({"features": feats, "labels": labels}, str(tmp_path / "f.safetensors"))
    cfg = TrainConfig(data=str(tmp_path / "f.safetensors"), out=str(tmp_path / "r"), steps=6,
                      batch_pairs=32, lr=2e-3, warmup=2, optimizer="adamw", loss=loss,
                      val_classes=2, val_every=3, checkpoint_every=3,
                      model={"dim": 16, "heads": 2, "depth": 2, "arch": arch})
    summary = train(cfg, progress=False)
    assert summary["step"] == 6
    model = load_checkpoint(tmp_path / "r" / "final.safetensors")
    assert model.config.arch == arch and type(model).__name__ == "AggregationModule"
    json.dumps(summary)


def test_reports_use_the_baselines_own_normality():
    """`resend score --method ft-*` reports the method's score (e.g. MSP), not max(u) of its
    logits: score_similarities_features gives the same normality as score_features."""
    import warnings

    from resend_novelty.detectors import FT_DETECTORS, PrototypeDetector, SupportDetector

    torch.manual_seed(0)
    f, y, q = torch.randn(30, 16), np.repeat(np.arange(3), 10), torch.randn(8, 16)
    det = FT_DETECTORS["ft-msp"](backbone=None, budget=None, epochs=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det.fit_features(f, y)
        normality, u = det.score_similarities_features(q)
    np.testing.assert_allclose(normality, det.score_features(q), rtol=1e-6)
    assert u.shape == (8, 3)
    assert isinstance(det, SupportDetector) and not isinstance(det, PrototypeDetector)

"""One decision on every route: `resend score --support`, `resend fit` + `resend score --detector`
(with `--per-image`, `--watch`, or neither) and Python save / load give the same predictions,
and the threshold is the one of the scoring policy in use."""

from __future__ import annotations

import csv
import io
import json
import zlib

import numpy as np
import pytest
import torch
from conftest import COLORS, make_image

from resend_novelty.cli import main
from resend_novelty.detectors import (CosineDetector, ReSeNDDetector, clone, load_detector,
                                      save_detector)
from resend_novelty.models import RelationalConfig, RelationalModule

# the gate and the raw view are on, so that every part of the policy is exercised
OPTS = ["--method", "cosine-standardized", "--backbone", "tiny_test_cnn",
        "--shift-threshold", "0.5", "--raw-weight", "0.5"]


@pytest.fixture
def folders(tmp_path):
    """support/<red|green|blue> (6 images each), test/<red|green|blue|yellow> (5 each: a batch
    of 20 >= 16 brings its own statistics)."""
    for split, classes, n in (("support", ["red", "green", "blue"], 6),
                              ("test", list(COLORS), 5)):
        for c in classes:
            for i in range(n):
                make_image(tmp_path / split / c / f"{i}.png", COLORS[c],
                           noise_seed=zlib.crc32(f"{split}{c}{i}".encode()))
    return tmp_path / "support", tmp_path / "test"


def _cli(capsys, *argv):
    rc = main([*map(str, argv), "--quiet", "--workers", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


def _predictions(path) -> dict:
    with open(path, newline="") as fh:
        return {r["path"]: (r["prediction"], float(r["normality"])) for r in csv.DictReader(fh)}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert {p: v[0] for p, v in a.items()} == {p: v[0] for p, v in b.items()}
    np.testing.assert_allclose([a[p][1] for p in sorted(a)], [b[p][1] for p in sorted(a)],
                               rtol=1e-4, atol=1e-5)


def test_per_image_decision_is_the_same_on_every_route(folders, tiny_registered, tmp_path,
                                                       capsys, monkeypatch):
    sup, test = folders
    rc, _, err = _cli(capsys, "score", "--support", sup, "--test", test, "--per-image",
                      "--out", tmp_path / "a", "--no-plots", "--no-html", *OPTS)
    assert rc == 0, err
    a = _predictions(tmp_path / "a" / "scores.csv")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["scoring"]["policy"]["mode"] == "per-image"
    assert summary["threshold_rule"]["policy"]["mode"] == "per-image"
    assert summary["scoring"]["package_version"]
    assert any(p == "unknown" for p, _ in a.values())  # the decision flags something

    # fit transductive, score per image: the threshold is re-calibrated for per image
    rc, _, err = _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "t.safetensors", *OPTS)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "t.safetensors", "--test", test,
                      "--per-image", "--out", tmp_path / "b", "--no-plots", "--no-html")
    assert rc == 0, err
    assert "re-calibrated for per-image scoring" in err
    _same(a, _predictions(tmp_path / "b" / "scores.csv"))

    # fit per image: the file keeps its policy
    rc, out, err = _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "p.safetensors",
                        "--per-image", *OPTS)
    assert rc == 0, err and "per-image scoring" in out
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "p.safetensors", "--test", test,
                      "--out", tmp_path / "c", "--no-plots", "--no-html")
    assert rc == 0, err
    _same(a, _predictions(tmp_path / "c" / "scores.csv"))

    # the watch scores per image with the transductive file: the same decisions
    paths = sorted(a)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(p + "\n" for p in paths)))
    rc, out, err = _cli(capsys, "score", "--detector", tmp_path / "t.safetensors", "--watch", "-",
                        "--out", tmp_path / "d")
    assert rc == 0, err
    _same(a, _predictions(tmp_path / "d" / "scores.csv"))

    # Python: load, switch the policy, predict class names
    det = load_detector(tmp_path / "t.safetensors", progress=False)
    det.set_policy(True)
    names = det.predict(paths, names=True)
    assert list(names) == [a[p][0] for p in paths]
    p_det = load_detector(tmp_path / "p.safetensors", progress=False)
    assert p_det.per_image and p_det.threshold_ == pytest.approx(det.threshold_)


def test_transductive_decision_is_the_same_on_every_route(folders, tiny_registered, tmp_path,
                                                          capsys):
    sup, test = folders
    rc, out, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out",
                        tmp_path / "a", "--no-plots", "--no-html", *OPTS)
    assert rc == 0, err
    assert "scoring: transductive" in out
    a = _predictions(tmp_path / "a" / "scores.csv")
    rc, _, err = _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "t.safetensors", *OPTS)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "t.safetensors", "--test", test,
                      "--out", tmp_path / "b", "--no-plots", "--no-html")
    assert rc == 0, err
    _same(a, _predictions(tmp_path / "b" / "scores.csv"))
    det = load_detector(tmp_path / "t.safetensors", progress=False)
    paths = sorted(a)
    assert list(det.predict(paths, names=True)) == [a[p][0] for p in paths]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["scoring"]["statistics"] in ("pooled", "test batch")
    assert "shift_gap" in summary["scoring"]


def test_small_batch_says_support_statistics(folders, tiny_registered, tmp_path, capsys):
    sup, _ = folders
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        make_image(small / f"{i}.png", COLORS["red"], noise_seed=i)
    rc, out, err = _cli(capsys, "score", "--support", sup, "--test", small, "--out",
                        tmp_path / "o", "--no-plots", "--no-html", *OPTS)
    assert rc == 0, err
    assert "batch of 3 images (< 16)" in out and "support statistics used" in out


@pytest.mark.parametrize("flag", [["--neighbors", "3"], ["--shift-threshold", "0.1"],
                                  ["--method", "cosine"], ["--raw-weight", "0"]])
def test_options_a_detector_file_fixes_are_refused(flag, folders, tiny_registered, tmp_path,
                                                   capsys):
    sup, test = folders
    assert _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "t.safetensors", *OPTS)[0] == 0
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "t.safetensors", "--test", test,
                      "--out", tmp_path / "o", *flag)
    assert rc == 2 and "fixed by the detector file" in err and flag[0] in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_given_threshold_does_not_cross_policies(folders, tiny_registered, tmp_path, capsys):
    sup, test = folders
    assert _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "g.safetensors",
                "--threshold", "0.3", *OPTS)[0] == 0
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "g.safetensors", "--test", test,
                      "--per-image", "--out", tmp_path / "o")
    assert rc == 2 and "set for transductive scoring" in err
    # a new threshold for the new policy is fine
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "g.safetensors", "--test", test,
                      "--per-image", "--threshold", "0.2", "--out", tmp_path / "o2",
                      "--no-plots", "--no-html")
    assert rc == 0, err


# ------------------------------------------------------------------ estimator conventions
def _features():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 3
    sup = torch.repeat_interleave(centers, 6, 0) + torch.randn(18, 16)
    test = torch.cat([centers + torch.randn(3, 16), torch.randn(2, 16) * 3])
    return sup, np.repeat(np.arange(3), 6), test


def test_get_params_clone_and_decision_function():
    sup, labels, test = _features()
    det = CosineDetector(backbone=None, center="standardize", per_image=True, raw_weight=0.3,
                         progress=False)
    params = det.get_params()
    assert params["center"] == "standardize" and params["per_image"] is True
    assert params["raw_weight"] == 0.3 and params["backbone"] is None
    det.calibrate_features(sup, labels, tpr=0.9)
    twin = clone(det).calibrate_features(sup, labels, tpr=0.9)
    assert not hasattr(clone(det), "prototypes_")
    np.testing.assert_allclose(twin.score_features(test), det.score_features(test))
    assert twin.threshold_ == det.threshold_
    d = det.decision_function_features(test)
    np.testing.assert_allclose(d, det.score_features(test) - det.threshold_)
    assert ((d >= 0) == (det.predict_features(test) != -1)).all()
    det.set_params(raw_weight=0.0)
    assert det.raw_weight == 0.0 and not hasattr(det, "prototypes_")
    with pytest.raises(ValueError, match="invalid parameter"):
        det.set_params(nope=1)


def test_sklearn_clone_works():
    from sklearn.base import clone as sk_clone

    torch.manual_seed(1)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2))
    det = ReSeNDDetector(model=model, backbone=None, neighbors=0, progress=False)
    twin = sk_clone(det)
    assert type(twin) is ReSeNDDetector and twin.neighbors is None
    assert twin.get_params()["neighbors"] == 0


def test_set_policy_recalibrates_and_save_load_keeps_it(tmp_path, tiny_backbone):
    sup, labels, test = _features()
    kw = dict(backbone=tiny_backbone, center="standardize", raw_weight=0.5, progress=False)
    t_det = CosineDetector(**kw).calibrate_features(sup, labels, tpr=0.9)
    p_det = CosineDetector(per_image=True, **kw).calibrate_features(sup, labels, tpr=0.9)
    assert t_det.calibration_["policy"]["mode"] == "transductive"
    t_det.set_policy(True)
    assert t_det.threshold_ == pytest.approx(p_det.threshold_)
    assert t_det.threshold_rule_["policy"]["mode"] == "per-image"
    path = save_detector(p_det, tmp_path / "p.safetensors")
    loaded = load_detector(path, backbone=tiny_backbone, progress=False)
    assert loaded.per_image and loaded.threshold_ == pytest.approx(p_det.threshold_)
    np.testing.assert_array_equal(loaded.predict_features(test), p_det.predict_features(test))


def test_leave_one_out_refits_without_the_image():
    """Each calibration score is the score of a copy fitted without that image (exact)."""
    sup, labels, _ = _features()
    det = CosineDetector(backbone=None, center="standardize", per_image=True, progress=False)
    det.calibrate_features(sup, labels, tpr=0.9)
    i = 4
    keep = np.arange(len(labels)) != i
    alone = CosineDetector(backbone=None, center="standardize", per_image=True, progress=False)
    alone.fit_features(sup[keep], labels[keep])
    expected = float(alone.score_features(sup[i:i + 1])[0])
    # 18 eligible images <= MAX_REFITS: one image left out at a time, in class order
    assert expected in [pytest.approx(float(s)) for s in det.loo_scores_]


def test_threshold_from_a_validation_folder(folders, tiny_registered, tmp_path, capsys):
    sup, test = folders
    val = tmp_path / "val"
    for c in COLORS:  # known classes and one unknown class
        for i in range(4):
            make_image(val / c / f"{i}.png", COLORS[c], noise_seed=100 + i)
    rc, out, err = _cli(capsys, "score", "--support", sup, "--test", test, "--validation", val,
                        "--tpr", "0.75", "--out", tmp_path / "a", "--no-plots", "--no-html", *OPTS)
    assert rc == 0, err
    assert "validation folder, recall 75% of 12 images" in out and "of its 4 unknowns" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    rule = summary["threshold_rule"]
    assert rule["source"] == "validation folder" and rule["achieved_recall"] >= 0.75
    rc, _, err = _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "v.safetensors",
                      "--validation", val, "--tpr", "0.75", *OPTS)
    assert rc == 0, err
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "v.safetensors", "--test", test,
                      "--out", tmp_path / "b", "--no-plots", "--no-html")
    assert rc == 0, err
    _same(_predictions(tmp_path / "a" / "scores.csv"), _predictions(tmp_path / "b" / "scores.csv"))
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["threshold"] == \
        pytest.approx(summary["threshold"])
    rc, _, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out", tmp_path / "c",
                      "--threshold-from", "validation", *OPTS)
    assert rc == 2 and "needs --validation DIR" in err


def test_multi_source_support_is_calibrated_with_its_domains():
    sup, labels, test = _features()
    domains = np.tile(["photo", "sketch"], 9)
    det = CosineDetector(backbone=None, center="standardize", progress=False)
    det.fit_features(sup, labels, domains=domains)
    det._calibrate_fitted(sup, labels, 0.9, domains=domains)
    assert np.isfinite(det.threshold_) and len(det.loo_scores_) == 18
    assert det.calibration_["achieved_recall"] >= 0.9
    with pytest.raises(ValueError, match="multi-source support"):
        det.set_policy(True)  # its support cannot be given back unnormalised


def test_leave_class_out_estimate_and_pvalues():
    sup, labels, test = _features()
    det = CosineDetector(backbone=None, center="standardize", per_image=True, progress=False)
    det.calibrate_features(sup, labels, tpr=0.9)
    est = det.estimate_unknown_rejection()
    assert 0.0 <= est["estimated_unknown_rejected"] <= 1.0 and est["n_classes"] == 3
    assert det.threshold_rule_["unknown_rejection_estimate"] is est
    p = det.known_pvalues_features(test)
    assert ((p > 0) & (p <= 1)).all()
    # the threshold is the k-th largest of m left-out scores: accepted <=> at least m - k + 1 of
    # them score at or below the image <=> p_known >= (m - k + 2) / (m + 1)
    m = len(det.loo_scores_)
    k = int(np.ceil(0.9 * m - 1e-9))
    accepted = det.score_features(test) >= det.threshold_
    assert (accepted == (p >= (m - k + 2) / (m + 1) - 1e-12)).all()


def test_failed_set_params_and_set_policy_change_nothing():
    sup, labels, test = _features()
    domains = np.tile(["photo", "sketch"], 9)
    det = CosineDetector(backbone=None, center="standardize", per_image=True, raw_weight=0.3,
                         progress=False)
    with pytest.raises(ValueError):
        det.set_params(refine=2)  # refinement is refused per image
    assert det.get_params()["center"] == "standardize" and det.get_params()["per_image"]
    t = CosineDetector(backbone=None, center="standardize", progress=False)
    t.fit_features(sup, labels, domains=domains)
    t._calibrate_fitted(sup, labels, 0.9, domains=domains)
    before = t.threshold_
    with pytest.raises(ValueError, match="multi-source"):
        t.set_policy(True)
    assert not t.per_image and t.threshold_ == before
    assert t.threshold_rule_["policy"]["mode"] == "transductive"


def test_fixed_pooled_statistics_read_the_threshold_with_them():
    sup, labels, _ = _features()
    torch.manual_seed(3)
    batch = sup[torch.randint(0, 18, (24,))] + 0.1 * torch.randn(24, 16)
    det = CosineDetector(backbone=None, center="standardize", shift_threshold=2.0,
                         progress=False).calibrate_features(sup, labels, tpr=0.9)
    from resend_novelty.detectors.calibration import policy_loo_scores, threshold_at_recall

    per_batch = det.threshold_for_features(batch)  # re-read on the pooled batch
    det.set_test_mean(batch)  # the same statistics, fixed for a stream
    n = det.normalizer
    assert n.test_pooled_
    fixed = det.threshold_for_features(batch[:1])  # one image of the stream
    expected = threshold_at_recall(policy_loo_scores(
        det, *det.support_set(), fixed=(n.test_mean_, n.test_std_))[0], 0.9)
    assert fixed == pytest.approx(expected)
    # the same statistics up to the left-out image: close to the batch's re-read threshold
    assert fixed == pytest.approx(per_batch, abs=0.05)


def test_validation_replaces_a_given_threshold_across_policies(folders, tiny_registered, tmp_path,
                                                               capsys):
    sup, test = folders
    val = tmp_path / "val"
    for c in ("red", "green", "blue"):
        for i in range(3):
            make_image(val / c / f"{i}.png", COLORS[c], noise_seed=200 + i)
    assert _cli(capsys, "fit", "--support", sup, "--out", tmp_path / "v.safetensors",
                "--validation", val, *OPTS)[0] == 0
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "v.safetensors", "--test", test,
                      "--per-image", "--validation", val, "--out", tmp_path / "o",
                      "--no-plots", "--no-html")
    assert rc == 0, err
    rc, _, err = _cli(capsys, "score", "--detector", tmp_path / "v.safetensors", "--test", test,
                      "--per-image", "--threshold-from", "test", "--out", tmp_path / "o2",
                      "--no-plots", "--no-html")
    assert rc == 0, err

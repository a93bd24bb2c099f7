"""`resend score` and its library side: folders in, CSV/JSON/PNG out; support-set calibration."""

from __future__ import annotations

import csv
import json
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import COLORS, make_image
from PIL import Image

from resend_novelty.cli import main
from resend_novelty.data import DataError
from resend_novelty.detectors import UNKNOWN, CosineDetector, EuclideanDetector, ReSeNDDetector
from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint
from resend_novelty.report import scan_support, scan_test, score_folders, write_report


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _cosine(bb):
    return CosineDetector(backbone=bb, num_workers=0, progress=False)


def _random_checkpoint(path, backbone_name="tiny_test_cnn"):
    torch.manual_seed(1)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                              backbone=backbone_name))
    save_checkpoint(model, path)
    return model


# --------------------------------------------------------------------------- inputs
def test_all_formats_and_modes_are_scored(tmp_path, tiny_backbone):
    """JPEG/PNG/WebP/BMP, grayscale, palette and RGBA inputs all load and score."""
    sup = tmp_path / "support"
    specs = [("jpg", "RGB", "JPEG"), ("png", "L", "PNG"), ("webp", "RGB", "WEBP"),
             ("bmp", "RGB", "BMP"), ("png", "RGBA", "PNG"), ("png", "P", "PNG")]
    for c in ("red", "blue"):
        for i, (ext, mode, fmt) in enumerate(specs):
            make_image(sup / c / f"{i}.{ext}", COLORS[c], mode=mode, fmt=fmt,
                       noise_seed=_seed(c, i))
    test = tmp_path / "test"
    for i, (ext, mode, fmt) in enumerate(specs):
        make_image(test / f"t{i}.{ext}", COLORS["yellow"], mode=mode, fmt=fmt, noise_seed=i)
    assert Image.open(test / "t4.png").mode == "RGBA"
    assert Image.open(test / "t1.png").mode == "L"
    det = _cosine(tiny_backbone)
    res = score_folders(det, sup, test)
    assert len(res.paths) == len(specs)
    assert {p.rsplit(".", 1)[1] for p in res.paths} == {"jpg", "png", "webp", "bmp"}
    assert np.isfinite(res.normality).all()
    assert res.similarities.shape == (len(specs), 2)
    assert res.test_labels is None  # flat folder: no labels
    assert sum(det.class_counts_) == 2 * len(specs)


def test_test_folder_layouts(tmp_path):
    """Flat and nested folders are searched recursively; labels only for exact class folders."""
    flat = tmp_path / "flat"
    make_image(flat / "a.png", COLORS["red"])
    make_image(flat / "b.jpg", COLORS["blue"])
    t = scan_test(flat)
    assert (t.layout, t.labels, len(t.paths)) == ("flat", None, 2)

    nested = tmp_path / "nested"
    make_image(nested / "x.png", COLORS["red"])  # loose image next to a sub-folder
    make_image(nested / "cat" / "y.png", COLORS["red"])
    make_image(nested / "cat" / "deeper" / "z.webp", COLORS["red"], fmt="WEBP")
    t = scan_test(nested)
    assert t.layout == "nested" and t.labels is None
    assert sorted(p.rsplit("/", 1)[1] for p in t.paths) == ["x.png", "y.png", "z.webp"]

    deep = tmp_path / "deep"  # only sub-folders, but images two levels down: not class folders
    make_image(deep / "a" / "b" / "y.png", COLORS["red"])
    assert scan_test(deep).labels is None

    labelled = tmp_path / "labelled"
    make_image(labelled / "dog" / "1.png", COLORS["red"])
    make_image(labelled / "cat" / "2.bmp", COLORS["blue"], fmt="BMP")
    (labelled / "empty").mkdir()
    with pytest.warns(UserWarning, match="empty"):
        t = scan_test(labelled)
    assert t.layout == "class folders"
    assert sorted(t.labels) == ["cat", "dog"]

    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        scan_test(tmp_path / "none")


def test_test_folder_follows_symlinked_class_folders(tmp_path):
    real = tmp_path / "real"
    make_image(real / "dog" / "1.png", COLORS["red"])
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "dog").symlink_to(real / "dog")
    (linked / "dog" / "loop").symlink_to(linked)  # a link loop must not hang the scan
    t = scan_test(linked)
    assert t.labels == ["dog"] and len(t.paths) == 1


def test_empty_support_class_is_an_error(class_folders, tiny_backbone):
    (class_folders / "support" / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        score_folders(_cosine(tiny_backbone), class_folders / "support", class_folders / "test")


def test_loose_images_in_support_are_an_error(class_folders):
    make_image(class_folders / "support" / "stray.png", COLORS["red"])
    with pytest.raises(DataError, match="stray.png"):
        scan_support(class_folders / "support")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_file_is_named(class_folders, tiny_backbone, workers):
    bad = class_folders / "test" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    det = CosineDetector(backbone=tiny_backbone, num_workers=workers, progress=False)
    with pytest.raises(DataError) as err:
        score_folders(det, class_folders / "support", class_folders / "test")
    msg = str(err.value)
    assert "broken.jpg" in msg and "cannot decode" in msg
    assert "Traceback" not in msg  # worker traceback stripped


def test_zero_byte_file_is_named(class_folders, tiny_backbone):
    (class_folders / "support" / "green" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty \(0 bytes\).*empty\.png"):
        score_folders(_cosine(tiny_backbone), class_folders / "support", class_folders / "test")


def test_single_class_support(class_folders, tiny_backbone):
    sup = class_folders / "support_one"
    for i in range(3):
        make_image(sup / "red" / f"{i}.png", COLORS["red"], noise_seed=i)
    model = _random_checkpoint(class_folders / "m.safetensors")
    det = ReSeNDDetector(model=model, backbone=tiny_backbone, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="single class.*always 1"):
        score_folders(det, sup, class_folders / "test")
    with pytest.raises(ValueError, match="single known class"):  # the detector refuses as well
        det.fit_features(torch.randn(3, 16), [0, 0, 0])
    with pytest.warns(UserWarning, match="single known class"):
        res = score_folders(_cosine(tiny_backbone), sup, class_folders / "test")
    assert res.class_names == ["red"]
    assert len(res.paths) == 12


# --------------------------------------------------------------------------- calibration
def _brute_force_loo(make, feats, labels):
    """Reference: refit without image i (empty class impossible: classes have >= 2 images)."""
    out = []
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        det = make().fit_features(feats[keep], labels[keep])
        u = det.similarities_features(feats[i : i + 1])
        out.append(float(det.normality_from_similarities(u)[0]))
    return np.array(out)


@pytest.mark.parametrize("method", ["cosine", "euclidean", "resend"])
def test_loo_scores_match_refitting(method):
    torch.manual_seed(0)
    feats = torch.randn(13, 16)
    labels = np.array([0] * 5 + [1] * 4 + [2] * 4)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2))
    make = {
        "cosine": lambda: CosineDetector(backbone=None, device="cpu"),
        "euclidean": lambda: EuclideanDetector(backbone=None, device="cpu"),
        "resend": lambda: ReSeNDDetector(model=model, backbone=None, device="cpu"),
    }[method]
    det = make().fit_features(feats, labels)
    protos = det.prototypes_.clone()
    scores, used = det.loo_scores_features(feats, labels, block=3)  # blocks smaller than classes
    assert used.all()
    np.testing.assert_allclose(scores, _brute_force_loo(make, feats, labels), rtol=1e-4,
                               atol=1e-5)
    assert torch.equal(det.prototypes_, protos)  # prototypes restored after swapping


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.95, 1.0])
def test_calibration_reaches_target_recall(tpr):
    torch.manual_seed(0)
    feats = torch.randn(40, 16) + torch.repeat_interleave(torch.randn(4, 16) * 2, 10, dim=0)
    labels = np.repeat(np.arange(4), 10)
    det = CosineDetector(backbone=None).calibrate_features(feats, labels, tpr=tpr)
    scores = det.loo_scores_  # each support image scored by a copy fitted without it
    assert len(scores) == 40
    recall = float((scores >= det.threshold_).mean())
    assert recall >= tpr
    assert det.calibration_["achieved_recall"] == pytest.approx(recall)
    # the tightest such threshold: any higher one loses recall
    assert float((scores > det.threshold_).mean()) < tpr
    # predict() uses threshold_; an image below it is UNKNOWN
    pred = det.predict_features(feats)
    assert ((pred != UNKNOWN) == (det.score_features(feats) >= det.threshold_)).all()


def test_predict_without_threshold_is_an_error():
    det = CosineDetector(backbone=None).fit_features(torch.randn(4, 8), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="no threshold"):
        det.predict_features(torch.randn(2, 8))
    assert len(det.predict_features(torch.randn(2, 8), threshold=0.0)) == 2
    det.calibrate_features(torch.randn(4, 8), [0, 0, 1, 1])
    assert det.predict_features(torch.randn(2, 8)).shape == (2,)
    det.fit_features(torch.randn(4, 8), [0, 0, 1, 1])  # refitting drops the stale threshold
    with pytest.raises(ValueError, match="no threshold"):
        det.predict_features(torch.randn(2, 8))


def test_single_image_classes_are_skipped_in_calibration():
    torch.manual_seed(0)
    feats = torch.randn(6, 8)
    det = CosineDetector(backbone=None)
    with pytest.warns(UserWarning, match=r"single support image.*\b2\b"):
        det.calibrate_features(feats, [0, 0, 1, 1, 1, 2], tpr=0.9)
    assert det.calibration_["n_images"] == 5
    assert det.calibration_["skipped_classes"] == ["2"]
    with pytest.raises(ValueError, match="every support class has a single image"):
        det.calibrate_features(feats[:3], [0, 1, 2])


def test_calibrate_on_folder_api(class_folders, tiny_backbone):
    """Python API: calibrate(folder) fits + sets threshold_; predict/score take paths/PIL/tensors."""
    det = _cosine(tiny_backbone).calibrate(class_folders / "support", tpr=0.9)
    assert det.class_names_ == ["blue", "green", "red"]
    paths = sorted(str(p) for p in (class_folders / "test").rglob("*.png"))
    pred = det.predict(paths)
    assert pred.shape == (len(paths),)
    by_path = det.score(paths)
    by_pil = det.score([Image.open(p) for p in paths])
    by_tensor = det.score(torch.stack([tiny_backbone.transform(Image.open(p).convert("RGB"))
                                       for p in paths]))
    np.testing.assert_allclose(by_pil, by_path, rtol=1e-5)
    np.testing.assert_allclose(by_tensor, by_path, rtol=1e-5)


# --------------------------------------------------------------------------- report + CLI
def test_report_metrics_and_files(class_folders, tiny_backbone, tmp_path):
    res = score_folders(_cosine(tiny_backbone), class_folders / "support", class_folders / "test",
                        threshold=0.999)
    assert res.threshold_rule["source"] == "given"
    assert res.threshold_rule["policy"]["mode"] == "transductive"
    assert res.test_labels is not None and res.is_known.sum() == 9
    m = res.metrics()
    assert m["n_unknown"] == 3 and 0.0 <= m["auroc"] <= 1.0
    assert set(m["per_class"]) == {"red", "green", "blue", "yellow"}
    assert m["per_class"]["yellow"]["known"] is False
    flagged = res.flagged_unknown
    assert res.prediction == ["unknown" if f else c for f, c in zip(flagged, res.nearest)]
    files = write_report(res, tmp_path / "out")
    assert set(files) == {"scores", "summary", "histogram", "roc", "detection_rates"}


def _run_cli(capsys, *argv):
    rc = main(["score", *map(str, argv), "--quiet", "--workers", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_cosine_end_to_end(class_folders, tiny_registered, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc, out, err = _run_cli(capsys, "--support", class_folders / "support", "--test",
                            class_folders / "test", "--method", "cosine", "--backbone",
                            "tiny_test_cnn", "--out", out_dir, "--tpr", "0.9")
    assert rc == 0, err
    assert "AUROC" in out and "FPR95" in out
    with open(out_dir / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert list(rows[0])[:7] == ["path", "normality", "p_known", "nearest_class", "sim_blue",
                                 "sim_green", "sim_red"]
    p = np.array([float(r["p_known"]) for r in rows])
    assert ((p > 0) & (p <= 1)).all()
    # higher normality, higher p-value (the same order)
    norm = np.array([float(r["normality"]) for r in rows])
    assert (np.diff(p[np.argsort(norm)]) >= 0).all()
    assert {r["prediction"] for r in rows} <= {"red", "green", "blue", "unknown"}
    for r in rows:
        sims = {c: float(r[f"sim_{c}"]) for c in ("red", "green", "blue")}
        assert r["nearest_class"] == max(sims, key=sims.get)
        assert float(r["normality"]) == pytest.approx(max(sims.values()), rel=1e-4)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["class_names"] == ["blue", "green", "red"]
    assert summary["threshold_rule"]["source"] == "support leave-one-out"
    assert summary["threshold_rule"]["tpr"] == 0.9
    assert summary["threshold_rule"]["achieved_recall"] >= 0.9
    assert summary["counts"]["images"] == 12
    auroc = summary["metrics"]["auroc"]
    assert f"AUROC {auroc:.4f}" in out
    for name in ("histogram", "roc", "detection_rates"):
        with Image.open(out_dir / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_cli_resend_checkpoint_and_explicit_threshold(class_folders, tiny_registered, tmp_path,
                                                      capsys):
    ckpt = tmp_path / "rel.safetensors"
    _random_checkpoint(ckpt)
    test = tmp_path / "flat"  # unlabelled test folder: histogram only, no metrics
    for i in range(4):
        make_image(test / "sub" / f"{i}.webp", COLORS["yellow"], fmt="WEBP", noise_seed=i)
    make_image(test / "x.bmp", COLORS["red"], fmt="BMP")
    rc, out, err = _run_cli(capsys, "--support", class_folders / "support", "--test", test,
                            "--method", "resend", "--model", ckpt, "--out", tmp_path / "o",
                            "--threshold", "0.5")
    assert rc == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["method"] == "resend" and summary["threshold"] == 0.5
    assert summary["metrics"] is None and summary["test_layout"] == "nested"
    assert sorted(summary["files"]) == ["histogram", "report", "scores", "summary"]
    with open(tmp_path / "o" / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5
    for r in rows:  # resend normality = max softmax of the relational logits
        u = np.array([float(r[f"sim_{c}"]) for c in ("blue", "green", "red")])
        p = np.exp(u - u.max())
        assert float(r["normality"]) == pytest.approx((p / p.sum()).max(), rel=1e-3)
        assert (r["prediction"] == "unknown") == (float(r["normality"]) < 0.5)


def test_cli_errors_are_clear(class_folders, tiny_registered, tmp_path, capsys):
    ckpt = tmp_path / "rel.safetensors"
    _random_checkpoint(ckpt)
    one = tmp_path / "one"
    for i in range(2):
        make_image(one / "red" / f"{i}.png", COLORS["red"], noise_seed=i)
    rc, _, err = _run_cli(capsys, "--support", one, "--test", class_folders / "test",
                          "--method", "resend", "--model", ckpt, "--out", tmp_path / "o")
    assert rc == 2 and "single class (red)" in err and "--method cosine" in err
    rc, _, err = _run_cli(capsys, "--support", one, "--test", class_folders / "test",
                          "--method", "cosine", "--backbone", "tiny_test_cnn",
                          "--out", tmp_path / "o2")
    assert rc == 0 and "warning: the support set has a single known class" in err
    (class_folders / "test" / "blue" / "zero.jpg").write_bytes(b"")
    rc, _, err = _run_cli(capsys, "--support", class_folders / "support", "--test",
                          class_folders / "test", "--method", "cosine", "--backbone",
                          "tiny_test_cnn", "--out", tmp_path / "o3")
    assert rc == 2 and "zero.jpg" in err
    with pytest.raises(SystemExit):  # --threshold and --tpr exclude each other
        main(["score", "--support", "s", "--test", "t", "--threshold", "0.1", "--tpr", "0.9"])
    with pytest.raises(SystemExit):
        main(["score", "--support", "s", "--test", "t", "--tpr", "1.5"])
    capsys.readouterr()


def test_rescoring_uses_the_feature_cache(class_folders, tiny_registered, tmp_path, capsys,
                                          monkeypatch):
    calls = []
    forward = tiny_registered.forward
    monkeypatch.setattr(tiny_registered, "forward",
                        lambda self, x: calls.append(len(x)) or forward(self, x))
    argv = ["--support", class_folders / "support", "--test", class_folders / "test",
            "--method", "cosine", "--backbone", "tiny_test_cnn", "--no-plots",
            "--engine", "torch"]  # the counter wraps torch's forward
    rc, out1, _ = _run_cli(capsys, *argv, "--out", tmp_path / "a")
    assert rc == 0 and sum(calls) == 24  # 12 support + 12 test images
    rc, out2, _ = _run_cli(capsys, *argv, "--out", tmp_path / "b")
    assert rc == 0 and sum(calls) == 24  # second run: every feature from the cache
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()


def test_pacs_folders_smoke(tmp_path, tiny_backbone):
    """Real PACS images through symlinked folders (skipped when the shared data is absent)."""
    from conftest import DATA_ROOT

    pacs = DATA_ROOT / "pacs"
    if not (pacs / "photo" / "dog").is_dir():
        pytest.skip("PACS not available")
    sup, test = tmp_path / "support", tmp_path / "test"
    for c in ("dog", "horse"):
        (sup / c).mkdir(parents=True)
        for f in sorted((pacs / "photo" / c).iterdir())[:3]:
            (sup / c / f.name).symlink_to(f)
    for c in ("dog", "guitar"):
        (test / c).mkdir(parents=True)
        for f in sorted((pacs / "art_painting" / c).iterdir())[:2]:
            (test / c / f.name).symlink_to(f)
    res = score_folders(_cosine(tiny_backbone), sup, test)
    assert res.test_labels.count("guitar") == 2
    assert not math.isnan(res.metrics()["auroc"])

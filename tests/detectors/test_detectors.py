"""Detectors: fit/score/predict for cosine, euclidean and resend on generated class folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resend_novelty.data import DataError, ImageDataset, scan_class_folders
from resend_novelty.detectors import (
    UNKNOWN,
    CosineDetector,
    EuclideanDetector,
    ReSeNDDetector,
    build_detector,
)
from resend_novelty.features import extract_features
from resend_novelty.models import RelationalConfig, RelationalModule

METHODS = ["cosine", "euclidean", "resend"]


def _relational(seed=1, backbone="tiny_test_cnn"):
    torch.manual_seed(seed)
    m = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2, backbone=backbone))
    with torch.no_grad():  # spread the weights: outputs that actually depend on the inputs
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _make(method, backbone, **kw):
    kw = dict(backbone=backbone, num_workers=0, progress=False, device="cpu", **kw)
    if method == "resend":
        return ReSeNDDetector(model=_relational(), **kw)
    return build_detector(method, **kw)


def _features(bb, paths):
    return extract_features(bb, paths, num_workers=0, progress=False, device="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_fit_score_predict_on_class_folders(class_folders, tiny_backbone, method):
    det = _make(method, tiny_backbone).fit(class_folders / "support")
    assert det.classes_.tolist() == [0, 1, 2]
    assert det.class_names_ == ["blue", "green", "red"]
    assert det.prototypes_.shape == (3, 16)
    assert det.class_counts_.tolist() == [4, 4, 4]
    test_paths = sorted(str(p) for p in (class_folders / "test").rglob("*.png"))
    s = det.score(test_paths)
    assert s.shape == (12,) and np.isfinite(s).all() and s.std() > 0
    if method == "resend":
        assert ((s >= 1 / 3 - 1e-6) & (s <= 1 + 1e-6)).all()  # max softmax over 3 classes
    if method == "cosine":
        assert (s <= 1 + 1e-6).all()
    if method == "euclidean":
        assert (s <= 0).all()
    # thresholds: -inf accepts everything (nearest class), +inf rejects everything
    nearest = det.predict(test_paths, threshold=-np.inf)
    assert set(nearest.tolist()) <= {0, 1, 2}
    assert (det.predict(test_paths, threshold=np.inf) == UNKNOWN).all()
    thr = float(np.median(s))
    pred = det.predict(test_paths, threshold=thr)
    assert np.array_equal(pred == UNKNOWN, s < thr)
    assert np.array_equal(pred[s >= thr], nearest[s >= thr])
    if method != "resend":  # (a random relational module has no notion of "own class")
        # support images of these colour classes are nearest to their own class prototype
        recs, _ = scan_class_folders(class_folders / "support")
        own = det.predict([r.path for r in recs], threshold=-np.inf)
        assert (own == np.array([r.label for r in recs])).mean() >= 0.75


@pytest.mark.parametrize("method", METHODS)
def test_fit_features_matches_fit(class_folders, tiny_backbone, method):
    recs, _ = scan_class_folders(class_folders / "support")
    paths, labels = [r.path for r in recs], np.array([r.label for r in recs])
    test_paths = sorted(str(p) for p in (class_folders / "test").rglob("*.png"))
    a = _make(method, tiny_backbone).fit(paths, labels=labels)
    feats = _features(tiny_backbone, paths)
    b = _make(method, None if method != "resend" else "identity").fit_features(feats, labels)
    torch.testing.assert_close(a.prototypes_, b.prototypes_)
    tf = _features(tiny_backbone, test_paths)
    np.testing.assert_allclose(a.score(test_paths), b.score_features(tf), atol=1e-6)
    np.testing.assert_array_equal(a.predict(test_paths, 0.0), b.predict_features(tf, 0.0))
    np.testing.assert_array_equal(b.nearest_class_features(tf), b.predict_features(tf, -np.inf))


def test_prototypes_are_class_means_and_scores_by_hand():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 5, generator=g)
    labels = np.array([7, 2, 7, 2, 2, 9, 9, 9, 9])
    det = CosineDetector(backbone=None).fit_features(feats, labels)
    assert det.classes_.tolist() == [2, 7, 9]
    for k, c in enumerate([2, 7, 9]):
        torch.testing.assert_close(det.prototypes_[k], feats[labels == c].mean(0))
    q = torch.randn(4, 5, generator=g)
    cos = F.normalize(q, dim=1) @ F.normalize(det.prototypes_, dim=1).T
    np.testing.assert_allclose(det.score_features(q), cos.max(1).values.numpy(), atol=1e-6)
    np.testing.assert_array_equal(det.nearest_class_features(q),
                                  np.array([2, 7, 9])[cos.argmax(1).numpy()])
    eu = EuclideanDetector(backbone=None).fit_features(feats, labels)
    d = torch.cdist(q, eu.prototypes_)
    np.testing.assert_allclose(eu.score_features(q), -d.min(1).values.numpy(), atol=1e-5)
    # predictions carry the original labels, UNKNOWN below the threshold
    s = det.score_features(q)
    pred = det.predict_features(q, threshold=float(np.sort(s)[1]))
    assert (pred == UNKNOWN).sum() == 1 and pred[np.argmin(s)] == UNKNOWN
    assert set(pred[pred != UNKNOWN].tolist()) <= {2, 7, 9}


def test_resend_score_is_max_softmax_of_relational_logits():
    model = _relational()
    feats = torch.randn(6, 16)
    det = ReSeNDDetector(model=model, backbone=None, device="cpu").fit_features(feats, [0, 0, 1, 1, 2, 2])
    q = torch.randn(5, 16)
    with torch.no_grad():
        u = model.pairwise_logits(q, det.prototypes_)
    torch.testing.assert_close(det.similarities_features(q), u)
    np.testing.assert_allclose(det.score_features(q), torch.softmax(u, 1).max(1).values.numpy(), atol=1e-6)


def test_single_class_support_warns_or_refuses():
    feats = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="single known class"):
        CosineDetector(backbone=None).fit_features(feats, [3, 3, 3, 3])
    with pytest.warns(UserWarning, match="single known class"):
        EuclideanDetector(backbone=None).fit_features(feats, [3, 3, 3, 3])
    with pytest.raises(ValueError, match="single known class.*always 1"):
        ReSeNDDetector(model=_relational(), backbone=None).fit_features(feats, [3, 3, 3, 3])


@pytest.mark.parametrize("method", METHODS)
def test_unfitted_and_bad_inputs(method, tiny_backbone):
    det = _make(method, tiny_backbone)
    with pytest.raises(RuntimeError, match="not fitted: call fit"):
        det.score_features(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="not fitted"):
        det.predict_features(torch.randn(2, 16), 0.5)
    with pytest.raises(ValueError, match="no threshold"):
        det.predict_features(torch.randn(2, 16))
    feats = torch.randn(6, 16)
    with pytest.raises(ValueError, match="6 support features but 5 labels"):
        det.fit_features(feats, [0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="labels must be integers"):
        det.fit_features(feats, [0.5] * 6)
    bad = feats.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"support features contain NaN or inf.*index 4"):
        det.fit_features(bad, [0, 0, 1, 1, 2, 2])
    det.fit_features(feats, [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"test features contain NaN or inf.*index 1"):
        det.score_features(torch.tensor([[0.0] * 16, [float("inf")] * 16]))
    with pytest.raises(ValueError, match=r"\(3, 8\) do not match the prototypes' dimension 16"):
        det.score_features(torch.randn(3, 8))
    with pytest.raises(TypeError, match="unsupported input type"):
        det.score(42)
    with pytest.raises(ValueError, match=r"image tensors must be \(N, 3, H, W\)"):
        det.score(torch.randn(3, 16))


def test_fit_without_labels_and_missing_inputs(class_folders, tiny_backbone):
    det = _make("cosine", tiny_backbone)
    paths = sorted(str(p) for p in (class_folders / "support").rglob("*.png"))
    with pytest.raises(ValueError, match="no labels"):
        det.fit(paths)
    with pytest.raises(DataError, match="image not found"):
        det.fit([paths[0], str(class_folders / "gone.png")], labels=[0, 1])
    (class_folders / "support" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class holds no image"):
        det.fit(class_folders / "support")


def test_build_detector_and_model_backbone_checks(tiny_backbone):
    assert isinstance(build_detector("cosine", backbone=None), CosineDetector)
    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        build_detector("no_such_method")
    with pytest.raises(ValueError, match="only used by the resend method"):
        build_detector("cosine", model=_relational())
    # a relational model trained on other features refuses another backbone
    with pytest.raises(ValueError, match="trained on 'efficientnet_lite0' features, not 'tiny_test_cnn'"):
        ReSeNDDetector(model=_relational(backbone="efficientnet_lite0"), backbone=tiny_backbone)
    # and rejects features of the wrong dimension with the model's message
    det = ReSeNDDetector(model=_relational(), backbone=None)
    with pytest.raises(ValueError, match="dimension 12, the relational module expects 16"):
        det.fit_features(torch.randn(4, 12), [0, 0, 1, 1])
    assert not hasattr(det, "prototypes_")  # not left half-fitted
    det.fit_features(torch.randn(4, 16), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="do not match the prototypes' dimension 16"):
        det.score_features(torch.randn(2, 12))


@pytest.mark.parametrize("method", ["cosine", "resend"])
def test_input_types_give_the_same_scores(class_folders, tiny_backbone, method):
    det = _make(method, tiny_backbone).fit(class_folders / "support")
    test_dir = class_folders / "test"
    recs, _ = scan_class_folders(test_dir)
    paths = [r.path for r in recs]
    ref = det.score(paths)
    ds = ImageDataset(recs, transform=tiny_backbone.transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    pil = [Image.open(p) for p in paths]
    variants = {
        "tuple of paths": det.score(tuple(paths)),
        "numpy paths": det.score(np.array(paths)),
        "class folders": det.score(test_dir),
        "ImageDataset": det.score(ds),
        "DataLoader": det.score(loader),
        "tensor": det.score(images),
        "PIL list": det.score(pil),
    }
    for name, s in variants.items():
        np.testing.assert_allclose(s, ref, atol=1e-5, err_msg=name)
    # a flat folder of images (no class sub-folders)
    flat = class_folders / "flat"
    flat.mkdir()
    for r in recs[:3]:
        (flat / f"{r.label}_{r.path.rsplit('/', 1)[1]}").write_bytes(open(r.path, "rb").read())
    np.testing.assert_allclose(det.score(flat), det.score(sorted(str(p) for p in flat.iterdir())), atol=1e-6)
    # DataLoader labels fit a detector
    sup = ImageDataset(scan_class_folders(class_folders / "support")[0], tiny_backbone.transform)
    det2 = _make(method, tiny_backbone).fit(torch.utils.data.DataLoader(sup, batch_size=4))
    torch.testing.assert_close(det2.prototypes_, det.prototypes_, atol=1e-5, rtol=1e-5)
    det3 = _make(method, tiny_backbone).fit(sup)
    torch.testing.assert_close(det3.prototypes_, det.prototypes_)

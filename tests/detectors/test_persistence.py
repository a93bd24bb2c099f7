"""A fitted detector in one safetensors file: save, load, same scores; clear refusals."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from resend_novelty import load_detector as top_level_load_detector
from resend_novelty.detectors import (FT_DETECTORS, DetectorFileError, build_detector,
                                      load_detector, read_detector_metadata, save_detector)
from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint
from resend_novelty.report import score_fitted, score_folders


def _checkpoint(path):
    torch.manual_seed(1)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                              backbone="tiny_test_cnn"))
    save_checkpoint(model, path)
    return path


def _detector(method, tmp_path, **kw):
    common = dict(backbone="tiny_test_cnn", num_workers=0, progress=False)
    if method == "resend":
        return build_detector("resend", model=str(_checkpoint(tmp_path / "ckpt.safetensors")),
                              **common, **kw)
    return build_detector(method, **common, **kw)


CASES = [("cosine", {}), ("cosine-standardized", {"min_center_batch": 4}), ("euclidean", {}),
         ("knn", {"k": 2}), ("mahalanobis", {}), ("resend", {}),
         ("resend", {"neighbors": 2, "neighbor_weight": 0.5}),
         ("cosine-centered", {"refine": 1, "min_center_batch": 4})]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}{'-' + str(k) if k else ''}"
                                                   for m, k in CASES])
def test_saved_detector_gives_the_same_scores(method, kw, class_folders, tiny_registered,
                                              tmp_path):
    if method == "mahalanobis":
        pytest.importorskip("pytorch_ood")
    det = _detector(method, tmp_path, **kw)
    ref = score_folders(det, class_folders / "support", class_folders / "test", tpr=0.9)
    path = save_detector(det, tmp_path / "det.safetensors",
                         checkpoint=tmp_path / "ckpt.safetensors" if method == "resend" else None)
    model = str(tmp_path / "ckpt.safetensors") if method == "resend" else None
    loaded = load_detector(path, model=model, num_workers=0, progress=False)
    assert type(loaded) is type(det) and loaded.threshold_ == det.threshold_
    got = score_fitted(loaded, class_folders / "test")
    assert got.paths == ref.paths and got.class_names == ref.class_names
    np.testing.assert_allclose(got.similarities, ref.similarities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.normality, ref.normality, rtol=0, atol=1e-6)
    assert got.prediction == ref.prediction
    assert got.threshold_rule["source"] == "support leave-one-out"
    assert got.threshold_rule["tpr"] == 0.9
    assert got.support_counts == ref.support_counts


def test_file_records_what_scoring_needs(class_folders, tiny_registered, tmp_path):
    det = _detector("resend", tmp_path)
    score_folders(det, class_folders / "support", class_folders / "test")
    path = save_detector(det, tmp_path / "d.safetensors", checkpoint=tmp_path / "ckpt.safetensors")
    meta = read_detector_metadata(path)
    assert meta["method"] == "resend" and meta["package_version"] == "0.1.0"
    assert meta["class_names"] == ["blue", "green", "red"]
    assert meta["backbone"]["name"] == "tiny_test_cnn" and len(meta["backbone"]["sha256"]) == 64
    ck = meta["checkpoint"]
    assert ck["name"] == "ckpt.safetensors" and len(ck["sha256"]) == 64 and not ck["shipped"]
    assert meta["threshold_rule"]["source"] == "support leave-one-out"
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
    assert {"fitted.prototypes_", "fitted.support_features_", "fitted.classes_",
            "fitted.support_index_", "fitted.loo_scores_"} <= keys
    assert top_level_load_detector is load_detector


def _rewrite(path, **changes):
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def test_refusals(class_folders, tiny_registered, tmp_path):
    det = _detector("cosine", tmp_path)
    score_folders(det, class_folders / "support", class_folders / "test")
    path = tmp_path / "d.safetensors"
    save_detector(det, path)
    with pytest.raises(DetectorFileError, match="exists"):
        save_detector(det, path)
    save_detector(det, path, overwrite=True)

    other = type(tiny_registered())()
    with torch.no_grad():
        other.net[0].weight.add_(0.01)
    with pytest.raises(DetectorFileError, match="other tiny_test_cnn backbone weights"):
        load_detector(path, backbone=other)

    _rewrite(path, package_version="0.0.9")
    with pytest.raises(DetectorFileError, match="written by resend-novelty 0.0.9"):
        load_detector(path)

    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(DetectorFileError, match="not a safetensors"):
        load_detector(bogus)
    with pytest.raises(DetectorFileError, match="not found"):
        load_detector(tmp_path / "missing.safetensors")

    ft = FT_DETECTORS["ft-msp"](backbone="tiny_test_cnn", budget=None, epochs=1)
    with pytest.raises(DetectorFileError, match="'ft-msp' cannot be saved"):
        save_detector(ft, tmp_path / "ft.safetensors")


def test_resend_checkpoint_is_checked(class_folders, tiny_registered, tmp_path):
    det = _detector("resend", tmp_path)
    score_folders(det, class_folders / "support", class_folders / "test")
    path = save_detector(det, tmp_path / "d.safetensors", checkpoint=tmp_path / "ckpt.safetensors")
    with pytest.raises(DetectorFileError, match="pass it"):
        load_detector(path)  # not the shipped checkpoint: which one?
    torch.manual_seed(7)
    other = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                              backbone="tiny_test_cnn"))
    with pytest.raises(DetectorFileError, match="another relational checkpoint"):
        load_detector(path, model=other)
    meta = read_detector_metadata(path)
    # options as given to the constructor (None: the checkpoint's own, bound by its SHA-256)
    assert "neighbors" in meta["options"] and meta["options"]["neighbors"] is None
    assert meta["policy"]["mode"] == "transductive"

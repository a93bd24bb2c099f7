"""The raw weight of per-image scoring (raw_weight=..., --raw-weight): with one support domain,
a test image scored alone gets (1 - w) x its normality on the support-normalised features +
w x its normality on the unnormalised features. The CLI option (--raw-weight) is tested with
--shift-threshold in test_shift_gate_detectors.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from resend_novelty.detectors import (CosineDetector, KNNDetector, MahalanobisDetector,
                                      ReSeNDDetector, load_detector, read_detector_metadata,
                                      save_detector)
from resend_novelty.models import ScoringConfig, save_checkpoint

D = 24  # the feature dimension of the spread_model fixture
W = 0.4
TOL = dict(rtol=1e-5, atol=1e-5)


def _data(seed=0):
    """Positive clustered support (3 classes x 8) and a shifted test batch with an unknown
    class (4 x 6): the support statistics do not fit it."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, D, generator=g) * 2
    sup = torch.cat([(centres[c] + torch.randn(8, D, generator=g)).relu() + 1 for c in range(3)])
    test = torch.cat([(centres[c] + torch.randn(6, D, generator=g)).relu() + 1 for c in range(4)])
    return sup, np.repeat(np.arange(3), 8), test + torch.rand(D, generator=g) * 3


@pytest.fixture
def make(make_case):
    """``make(**kw)``: an unfitted per-image detector of the case, standardising
    (tests/conftest.py)."""
    return lambda **kw: make_case(**{"center": "standardize", "per_image": True, **kw})


def test_scores_are_the_mix_of_the_normalised_and_the_raw_detector(make):
    sup, labels, test = _data()
    det = make(raw_weight=W).fit_features(sup, labels)
    assert det.hedged
    normed = make().fit_features(sup, labels).score_features(test)
    raw = make(center="none").fit_features(sup, labels).score_features(test)
    assert np.abs(normed - raw).max() > 1e-3  # the two views differ: the mix is a real change
    np.testing.assert_allclose(det.score_features(test), (1 - W) * normed + W * raw, **TOL)
    # one image at a time gives the batch's scores (per image: nothing shared)
    alone = np.concatenate([det.score_features(test[i:i + 1]) for i in range(len(test))])
    np.testing.assert_allclose(alone, det.score_features(test), **TOL)


def test_u_and_the_nearest_class_are_those_of_the_normalised_features(make):
    sup, labels, test = _data()
    det = make(raw_weight=W).fit_features(sup, labels)
    ref = make().fit_features(sup, labels)
    normality, u = det.score_similarities_features(test)
    torch.testing.assert_close(u, ref.test_similarities_features(test))
    np.testing.assert_allclose(normality, det.score_features(test), **TOL)
    scores, nearest = det.score_and_nearest_features(test)
    np.testing.assert_array_equal(nearest, ref.nearest_class_features(test))
    np.testing.assert_allclose(scores, normality, **TOL)


def test_calibration_mixes_the_leave_one_out_scores(make):
    sup, labels, _ = _data()
    det = make(raw_weight=W).calibrate_features(sup, labels)
    normed = make().calibrate_features(sup, labels).loo_scores_
    raw = make(center="none").calibrate_features(sup, labels).loo_scores_
    np.testing.assert_allclose(det.loo_scores_, (1 - W) * normed + W * raw, **TOL)


@pytest.mark.parametrize("how", ["transductive", "domains", "no normalisation", "zero"])
def test_no_effect_where_it_does_not_apply(make, how):
    sup, labels, test = _data()
    domains = np.tile(["a", "b"], len(labels) // 2) if how == "domains" else None
    kw = {"transductive": dict(per_image=False), "no normalisation": dict(center="none"),
          "domains": {}, "zero": {}}[how]
    w = 0.0 if how == "zero" else W
    det = make(raw_weight=w, **kw)
    ref = make(**kw)
    for d in (det, ref):
        d.fit_features(sup, labels) if domains is None else d.fit_features(sup, labels, domains)
    assert not det.hedged
    np.testing.assert_array_equal(det.score_features(test), ref.score_features(test))


def test_refitting_rebuilds_the_raw_view(make):
    sup, labels, test = _data()
    det = make(raw_weight=W).fit_features(sup, labels)
    det.score_features(test)  # builds the raw view of the first support
    other, other_labels, _ = _data(seed=1)
    det.fit_features(other, other_labels)
    want = make(raw_weight=W).fit_features(other, other_labels).score_features(test)
    np.testing.assert_allclose(det.score_features(test), want, **TOL)


# --------------------------------------------------------------------------- persistence
def test_save_and_load_keep_the_raw_weight(spread_model, tiny_backbone, tmp_path):
    sup, labels, test = _data()
    model = spread_model(backbone="tiny_test_cnn", input_norm="l2")
    save_checkpoint(model, tmp_path / "c.safetensors")
    det = ReSeNDDetector(model=model, backbone=tiny_backbone, progress=False, neighbors=0,
                         center="standardize", per_image=True, raw_weight=W)
    path = save_detector(det.fit_features(sup, labels), tmp_path / "d.safetensors",
                         checkpoint=tmp_path / "c.safetensors")
    assert read_detector_metadata(path)["options"]["raw_weight"] == W
    loaded = load_detector(path, model=model, backbone=tiny_backbone, progress=False)
    # the scoring policy is saved with the detector: per image, hedged, as fitted
    assert loaded.raw_weight == W and loaded.per_image and loaded.hedged
    np.testing.assert_allclose(loaded.score_features(test), det.score_features(test), **TOL)


def test_a_file_without_the_raw_weight_loads_without_it(tiny_backbone, tmp_path, monkeypatch):
    from resend_novelty.detectors import persistence

    sup, labels, test = _data()
    det = CosineDetector(backbone=tiny_backbone, progress=False, center="standardize",
                         per_image=True).fit_features(sup, labels)
    options = persistence._options
    monkeypatch.setattr(persistence, "_options",
                        lambda d: {k: v for k, v in options(d).items() if k != "raw_weight"})
    path = save_detector(det, tmp_path / "old.safetensors")
    assert "raw_weight" not in read_detector_metadata(path)["options"]
    loaded = load_detector(path, backbone=tiny_backbone, progress=False)
    loaded.normalizer.per_image = True
    assert loaded.raw_weight == 0.0
    np.testing.assert_array_equal(loaded.score_features(test), det.score_features(test))


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("cls,name", [(KNNDetector, "knn"), (MahalanobisDetector, "mahalanobis")])
def test_detectors_without_a_rebuilt_state_refuse_it(cls, name):
    with pytest.raises(ValueError, match=f"the {name} detector does not support raw_weight"):
        cls(backbone=None, center="standardize", raw_weight=0.5)
    assert cls(backbone=None, raw_weight=0.0).raw_weight == 0.0  # off is fine


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "a", float("nan")])
def test_the_weight_is_checked(bad):
    with pytest.raises(ValueError, match="raw_weight must be a number in"):
        ScoringConfig(raw_weight=bad)
    with pytest.raises(ValueError, match="raw_weight must be a number in"):
        CosineDetector(backbone=None, raw_weight=bad)


def test_resend_takes_the_checkpoints_weight_unless_given(spread_model):
    model = spread_model(input_norm="l2")
    assert ReSeNDDetector(model=model, backbone=None).raw_weight == 0.0  # the config's default
    model.scoring = dataclasses.replace(model.scoring, raw_weight=0.5)
    assert ReSeNDDetector(model=model, backbone=None).raw_weight == 0.5
    assert ReSeNDDetector(model=model, backbone=None, raw_weight=0).raw_weight == 0.0

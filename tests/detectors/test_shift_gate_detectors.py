"""The shift gate in the detectors (shift_threshold=..., --shift-threshold): a test batch close
to the support is normalised, with the support, by the statistics of both together."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from conftest import eval_cli_error
from resend_novelty.cli.main import build_parser
from resend_novelty.detectors import (CosineDetector, EuclideanDetector, KNNDetector,
                                      MahalanobisDetector, ReSeNDDetector, load_detector,
                                      read_detector_metadata, save_detector)
from resend_novelty.models import ScoringConfig, save_checkpoint
from resend_novelty.transforms import domain_statistics, normalize

D = 24  # the feature dimension of the spread_model fixture
CLOSE = 0.1  # above the gap of the unshifted test batch (~0.02), below that of the shifted one
TOL = dict(rtol=1e-5, atol=1e-5)


def _data(seed=0):
    """Positive clustered support (3 classes x 8), a same-domain test batch with an unknown
    class (4 x 6), and that batch moved far by a common offset (the gate opens)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, D, generator=g) * 2
    sup = torch.cat([(centres[c] + torch.randn(8, D, generator=g)).relu() + 1 for c in range(3)])
    test = torch.cat([(centres[c] + torch.randn(6, D, generator=g)).relu() + 1 for c in range(4)])
    far = test + 2 * torch.randn(D, generator=g) * 3
    return sup, np.repeat(np.arange(3), 8), test, far


@pytest.fixture
def make(make_case):
    """``make(**kw)``: an unfitted detector of the case (tests/conftest.py)."""
    return make_case


def test_closed_gate_equals_a_detector_fitted_on_pooled_statistics(make):
    sup, labels, test, _ = _data()
    det = make(center="standardize", shift_threshold=CLOSE).fit_features(sup, labels)
    assert det.normalizer.pooled(test)
    mean, std = domain_statistics(torch.cat([sup, test]), "standardize")
    ref = make(center="none").fit_features(normalize(sup, mean, std), labels)
    want = ref.score_features(normalize(test, mean, std))
    np.testing.assert_allclose(det.score_features(test), want, **TOL)
    u = det.test_similarities_features(test)
    np.testing.assert_allclose(u.numpy(), ref.similarities_features(normalize(test, mean, std))
                               .numpy(), **TOL)
    # the gate changed something (without it: each its own statistics)
    off = make(center="standardize").fit_features(sup, labels).score_features(test)
    assert np.abs(off - want).max() > 1e-3
    # the detector itself is not re-fitted by scoring a pooled batch
    torch.testing.assert_close(det.prototypes_, make(center="standardize").fit_features(
        sup, labels).prototypes_)


def test_open_gate_and_threshold_zero_are_the_old_behaviour(make):
    sup, labels, test, far = _data()
    gated = make(center="standardize", shift_threshold=CLOSE).fit_features(sup, labels)
    zero = make(center="standardize", shift_threshold=0.0).fit_features(sup, labels)
    plain = make(center="standardize").fit_features(sup, labels)
    assert plain.shift_threshold == 0.0 and not gated.normalizer.pooled(far)
    np.testing.assert_array_equal(gated.score_features(far), zero.score_features(far))
    np.testing.assert_array_equal(zero.score_features(test), plain.score_features(test))
    np.testing.assert_array_equal(zero.score_features(far), plain.score_features(far))


@pytest.mark.parametrize("how", ["per_image", "domains", "small_batch"])
def test_gate_has_no_effect_where_it_does_not_apply(make, how):
    sup, labels, test, _ = _data()
    kw = dict(center="standardize", per_image=how == "per_image")
    domains = np.tile(["a", "b"], 12) if how == "domains" else None
    batch = test[:10] if how == "small_batch" else test  # 10 < min_center_batch
    gated = make(shift_threshold=CLOSE, **kw).fit_features(sup, labels, domains=domains)
    zero = make(**kw).fit_features(sup, labels, domains=domains)
    with pytest.warns(UserWarning) if how == "small_batch" else contextlib.nullcontext():
        got = gated.score_features(batch)
    assert not gated.normalizer.pooled(batch)
    np.testing.assert_array_equal(got, zero.score_features(batch))


def test_fixed_pooled_statistics_score_a_stream_like_the_batch(make):
    sup, labels, test, _ = _data()
    det = make(center="standardize", shift_threshold=CLOSE).fit_features(sup, labels)
    together = det.score_features(test)
    det.set_test_mean(test)
    assert det.normalizer.test_pooled_
    alone = np.concatenate([det.score_features(test[i:i + 1]) for i in range(len(test))])
    np.testing.assert_allclose(alone, together, **TOL)
    det.set_test_mean(None)
    assert not det.normalizer.test_pooled_
    np.testing.assert_allclose(det.score_features(test), together, **TOL)


def test_calibration_is_unchanged_by_the_gate(make):
    sup, labels, _, _ = _data()
    gated = make(center="standardize", shift_threshold=CLOSE).calibrate_features(sup, labels, 0.9)
    plain = make(center="standardize").calibrate_features(sup, labels, 0.9)
    assert gated.normalizer.pooled(sup)  # the support itself would pool: LOO must not
    assert gated.threshold_ == plain.threshold_
    np.testing.assert_array_equal(gated.loo_scores_, plain.loo_scores_)
    kw = dict(backbone=None, progress=False, center="standardize")  # distances: scale matters
    e = EuclideanDetector(shift_threshold=CLOSE, **kw).calibrate_features(sup, labels, 0.9)
    assert e.threshold_ == EuclideanDetector(**kw).calibrate_features(sup, labels, 0.9).threshold_


def test_loo_after_fixing_pooled_statistics_uses_the_support_statistics():
    sup, labels, test, _ = _data()
    det = CosineDetector(backbone=None, progress=False, center="standardize",
                         shift_threshold=CLOSE).fit_features(sup, labels)
    before = det.loo_scores_features(sup, labels)[0]
    det.set_test_mean(test)
    np.testing.assert_allclose(det.loo_scores_features(sup, labels)[0], before, **TOL)


# --------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("method", ["cosine", "resend"])
def test_save_and_load_keep_the_gate(method, spread_model, tiny_backbone, tmp_path):
    sup, labels, test, _ = _data()
    kw = dict(backbone=tiny_backbone, progress=False, center="standardize",
              shift_threshold=CLOSE)
    ckpt, model = None, None
    if method == "resend":
        model = spread_model(backbone="tiny_test_cnn", input_norm="l2")
        ckpt = tmp_path / "ckpt.safetensors"
        save_checkpoint(model, ckpt)
        det = ReSeNDDetector(model=model, neighbors=0, **kw)
    else:
        det = CosineDetector(**kw)
    det.fit_features(sup, labels)
    want = det.score_features(test)

    def reload(name):
        path = save_detector(det, tmp_path / name, checkpoint=ckpt)
        assert read_detector_metadata(path)["options"]["shift_threshold"] == CLOSE
        return load_detector(path, model=model, backbone=tiny_backbone, progress=False)

    loaded = reload("gate.safetensors")
    assert loaded.shift_threshold == CLOSE and not loaded.normalizer.test_pooled_
    torch.testing.assert_close(loaded.normalizer.support_direction_,
                               det.normalizer.support_direction_)
    np.testing.assert_allclose(loaded.score_features(test), want, **TOL)
    # fixed pooled statistics survive the round trip: one image is scored as in the batch
    det.set_test_mean(test)
    loaded = reload("fixed.safetensors")
    assert loaded.normalizer.test_pooled_ is True
    torch.testing.assert_close(loaded.test_mean_, det.test_mean_)
    np.testing.assert_allclose(loaded.score_features(test[:1]), want[:1], **TOL)
    np.testing.assert_allclose(loaded.score_features(test[5:9]), want[5:9], **TOL)


def test_without_the_gate_a_reloaded_cosine_detector_has_none(tiny_backbone, tmp_path):
    sup, labels, test, _ = _data()
    det = CosineDetector(backbone=tiny_backbone, progress=False, center="standardize")
    path = save_detector(det.fit_features(sup, labels), tmp_path / "d.safetensors")
    loaded = load_detector(path, backbone=tiny_backbone, progress=False)
    assert loaded.shift_threshold == 0.0 and loaded.normalizer.support_direction_ is not None
    np.testing.assert_array_equal(loaded.score_features(test), det.score_features(test))


def test_an_explicit_zero_survives_save_and_load(spread_model, tiny_backbone, tmp_path):
    sup, labels, test, _ = _data()
    model = spread_model(backbone="tiny_test_cnn", input_norm="l2")
    model.scoring = dataclasses.replace(model.scoring, shift_threshold=0.3)
    save_checkpoint(model, tmp_path / "c.safetensors")
    det = ReSeNDDetector(model=model, backbone=tiny_backbone, progress=False, neighbors=0,
                         center="standardize", shift_threshold=0).fit_features(sup, labels)
    path = save_detector(det, tmp_path / "d.safetensors", checkpoint=tmp_path / "c.safetensors")
    loaded = load_detector(path, model=model, backbone=tiny_backbone, progress=False)
    assert loaded.shift_threshold == 0.0
    np.testing.assert_allclose(loaded.score_features(test), det.score_features(test), **TOL)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("cls,name", [(KNNDetector, "knn"), (MahalanobisDetector, "mahalanobis")])
def test_detectors_without_the_gate_refuse_it(cls, name):
    with pytest.raises(ValueError, match=f"the {name} detector does not support the shift gate"):
        cls(backbone=None, center="standardize", shift_threshold=0.2)
    assert cls(backbone=None, shift_threshold=0.0).shift_threshold == 0.0  # off is fine
    assert EuclideanDetector(backbone=None, center=True, shift_threshold=0.2).shift_threshold == 0.2


@pytest.mark.parametrize("bad", [-1, 2.5, True, "a"])
def test_scoring_config_checks_the_threshold(bad):
    with pytest.raises(ValueError, match="shift_threshold"):
        ScoringConfig(shift_threshold=bad)
    assert ScoringConfig().shift_threshold == 0.0
    assert ScoringConfig.from_dict({"shift_threshold": 0.3}).shift_threshold == 0.3


def test_resend_takes_the_checkpoints_threshold_unless_given(spread_model):
    sup, labels, test, _ = _data()
    model = spread_model(input_norm="l2")
    model.scoring = dataclasses.replace(model.scoring, shift_threshold=0.3)
    kw = dict(model=model, backbone=None, progress=False, center="standardize", neighbors=0)
    default = ReSeNDDetector(**kw)
    assert default.shift_threshold == 0.3
    assert ReSeNDDetector(shift_threshold=0, **kw).shift_threshold == 0.0
    explicit = ReSeNDDetector(shift_threshold=0.3, **kw).fit_features(sup, labels)
    off = ReSeNDDetector(shift_threshold=0.0, **kw).fit_features(sup, labels)
    got = default.fit_features(sup, labels).score_features(test)
    np.testing.assert_array_equal(got, explicit.score_features(test))
    assert np.abs(got - off.score_features(test)).max() > 1e-4


# --------------------------------------------------------------------------- CLI
def _args(*extra):
    return build_parser().parse_args(["eval", "--root", "r", "--support", "s", "--test", "t",
                                      "--quiet", "--no-cache", "--device", "cpu", *extra])


@pytest.mark.parametrize("option,extra", [("shift_threshold", ()),
                                           ("raw_weight", ("--per-image",))])
def test_cli_scoring_option_reaches_the_detector(option, extra, tiny_registered, spread_model,
                                                 tmp_path):
    """--shift-threshold and --raw-weight (tests/detectors/test_raw_weight.py): given, or the
    checkpoint's for resend, 0 for the other methods."""
    from resend_novelty.cli.common import detector_factory

    flag, bb = "--" + option.replace("_", "-"), ["--backbone", "tiny_test_cnn"]
    made = detector_factory(_args("--method", "cosine-standardized", *bb, *extra, flag, "0.2"))()
    assert type(made).__name__ == "StandardizedCosineDetector" and getattr(made, option) == 0.2
    assert getattr(detector_factory(_args("--method", "euclidean", *bb))(), option) == 0.0
    model = spread_model(backbone="tiny_test_cnn", input_norm="l2")
    model.scoring = dataclasses.replace(model.scoring, **{option: 0.3})
    save_checkpoint(model, tmp_path / "c.safetensors")
    resend = ["--method", "resend", "--model", str(tmp_path / "c.safetensors"), *extra]
    assert getattr(detector_factory(_args(*resend))(), option) == 0.3  # the checkpoint's
    assert getattr(detector_factory(_args(*resend, flag, "0"))(), option) == 0.0
    assert getattr(detector_factory(_args(*resend, flag, "0.05"))(), option) == 0.05


@pytest.mark.parametrize("extra,match", [
    (["--method", "knn", "--shift-threshold", "0.2"], "knn detector does not support the shift"),
    (["--method", "cosine", "--shift-threshold", "3"], "shift_threshold must be a number"),
    (["--method", "knn", "--raw-weight", "0.2"], "knn detector does not support raw_weight"),
    (["--method", "cosine", "--raw-weight", "2"], "raw_weight must be a number")])
def test_cli_misuse_exits_2_without_traceback(extra, match, tiny_registered, tmp_path, capsys):
    assert match in eval_cli_error(tmp_path, capsys, *extra)

"""Per-image scoring (``per_image=True``, ``--per-image``): each test image is scored alone."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from conftest import COLORS, make_image
from resend_novelty.cli.main import main
from resend_novelty.detectors import ReSeNDDetector, build_detector
from resend_novelty.transforms import DomainNormalizer, normalize

# scores of a batch and of its images one by one are the same computation; BLAS kernels pick a
# different blocking for a 1-row and an N-row product, so they agree to float32 rounding only
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def one_thread():
    """Many tiny products: one intra-op thread avoids the thread start-up cost of each (on a
    busy 2-core machine 2 threads made them ~15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(d=24, seed=0):
    """Support (3 classes x 8, two source domains) and a shifted test batch with an unknown."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g) * 2
    sup = torch.cat([centres[c] + torch.randn(8, d, generator=g) for c in range(3)])
    labels = np.repeat(np.arange(3), 8)
    domains = np.tile(np.array(["a", "b"]), 12)
    sup[domains == "b"] += 1.5
    test = torch.cat([centres[c] + torch.randn(6, d, generator=g) for c in range(4)])
    test = test * 1.7 + 3.0  # a test domain with another mean and spread
    return sup, labels, domains, test


def _detectors(spread_model):
    kw = dict(backbone=None, progress=False, per_image=True)
    yield "cosine", build_detector("cosine", **kw)
    yield "cosine-centered", build_detector("cosine-centered", **kw)
    yield "cosine-standardized", build_detector("cosine-standardized", **kw)
    yield "euclidean", build_detector("euclidean", center="standardize", **kw)
    yield "knn", build_detector("knn", k=3, center="standardize", **kw)
    model = spread_model(cosine_skip=True, input_norm="l2")
    yield "resend", ReSeNDDetector(model=model, center="standardize", **kw)
    yield "resend-neighbours", ReSeNDDetector(model=model, center="standardize", neighbors=3,
                                             neighbor_weight=0.5, **kw)


def test_per_image_scores_do_not_depend_on_the_batch(spread_model, one_thread):
    sup, labels, domains, test = _data()
    for name, det in _detectors(spread_model):
        det.fit_features(sup, labels, domains=domains)
        together, nearest = det.score_and_nearest_features(test)
        alone = np.concatenate([det.score_features(test[i:i + 1]) for i in range(len(test))])
        np.testing.assert_allclose(together, alone, **TOL, err_msg=name)
        # any other subset: each image keeps its score
        perm = np.random.default_rng(0).permutation(len(test))[:7]
        np.testing.assert_allclose(det.score_features(test[perm]), together[perm], **TOL,
                                   err_msg=name)
        single = np.concatenate([det.nearest_class_features(test[i:i + 1])
                                 for i in range(len(test))])
        assert (single == nearest).all(), name


def test_transductive_scores_do_depend_on_the_batch():
    """The control: by default the test statistics come from the images scored together."""
    sup, labels, domains, test = _data()
    det = build_detector("cosine-standardized", backbone=None, progress=False)
    assert det.per_image is False
    det.fit_features(sup, labels, domains=domains)
    together = det.score_features(test)
    half = det.score_features(test[:16])  # >= min_center_batch: its own statistics
    assert np.abs(half - together[:16]).max() > 1e-3


def test_per_image_uses_the_support_statistics():
    sup, labels, domains, test = _data()
    det = build_detector("cosine-standardized", backbone=None, progress=False, per_image=True)
    det.fit_features(sup, labels, domains=domains)
    x = normalize(test, det.support_mean_, det.support_std_)
    want = (torch.nn.functional.normalize(x, dim=1)
            @ torch.nn.functional.normalize(det.prototypes_, dim=1).T).max(dim=1).values
    np.testing.assert_allclose(det.score_features(test), want.numpy(), **TOL)
    assert det.test_mean_ is None  # nothing estimated from the test images


def test_per_image_refuses_refinement_and_fixed_test_statistics(spread_model):
    with pytest.raises(ValueError, match="cannot be combined with per_image"):
        build_detector("cosine", backbone=None, refine=2, per_image=True)
    with pytest.raises(ValueError, match="cannot be combined with per_image"):
        ReSeNDDetector(model=spread_model(input_norm="l2"), backbone=None, refine=1,
                       neighbors=0, per_image=True)
    sup, labels, domains, test = _data()
    det = build_detector("cosine-standardized", backbone=None, progress=False, per_image=True)
    det.fit_features(sup, labels)
    with pytest.raises(ValueError, match="would use other test images"):
        det.set_test_mean(test)
    det.set_test_mean(None)  # going back to the default is fine
    with pytest.raises(ValueError, match="per_image must be True or False"):
        DomainNormalizer("center", per_image="yes")


def test_small_batches_need_no_warning_per_image(recwarn):
    sup, labels, domains, test = _data()
    det = build_detector("cosine-centered", backbone=None, progress=False, per_image=True)
    det.fit_features(sup, labels)
    det.score_features(test[:3])
    assert not [w for w in recwarn if "support statistics" in str(w.message)]


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def lists(tmp_path):
    root = tmp_path / "data"
    sup, test = [], []
    for label, c in enumerate(COLORS):
        for i in range(6):
            rel = f"img/{c}/{i}.png"
            make_image(root / rel, COLORS[c], noise_seed=zlib.crc32(rel.encode()))
            if c != "yellow" and i < 3:
                sup.append(f"{rel} {label}\n")
            else:
                test.append(f"{rel} {label}\n")
    (tmp_path / "support.txt").write_text("".join(sup))
    (tmp_path / "test.txt").write_text("".join(test))
    return tmp_path, root


def _eval(tmp, root, *extra):
    return ["eval", "--root", str(root), "--support", str(tmp / "support.txt"), "--test",
            str(tmp / "test.txt"), "--workers", "0", "--quiet", "--device", "cpu",
            "--method", "cosine-standardized", "--backbone", "tiny_test_cnn", "--engine", "torch",
            *extra]


def test_cli_per_image_reaches_the_detector(lists, tiny_registered, capsys, monkeypatch,
                                            one_thread):
    import resend_novelty.cli.common as common

    made = []
    real = common.build_detector

    def spy(method, model=None, **kw):
        det = real(method, model=model, **kw)
        made.append(det)
        return det

    monkeypatch.setattr(common, "build_detector", spy)
    tmp, root = lists
    assert main(_eval(tmp, root, "--per-image", "--json", str(tmp / "p.json"))) == 0
    assert made and all(d.per_image for d in made)
    rep = json.loads((tmp / "p.json").read_text())
    assert rep["per_image"] is True
    assert "per image" in capsys.readouterr().out
    made.clear()
    assert main(_eval(tmp, root, "--json", str(tmp / "t.json"))) == 0
    assert made and not any(d.per_image for d in made)
    assert json.loads((tmp / "t.json").read_text())["per_image"] is False
    assert "transductive" in capsys.readouterr().out


def test_cli_per_image_with_refine_exits_2(lists, tiny_registered, capsys):
    tmp, root = lists
    assert main(_eval(tmp, root, "--per-image", "--refine", "2")) == 2
    assert "cannot be combined with per_image" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "benchmark", "score"])
def test_cli_help_explains_per_image(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--per-image" in out and "no statistic of any other test image" in out

"""Open-set domain generalisation: MSP + novelty fusion, threshold, H-score, inputs, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from resend_novelty import osdg
from resend_novelty.cli import main
from resend_novelty.data import read_list_file
from resend_novelty.evaluation import SETTINGS, Setting, Target, h_score
from resend_novelty.features import extract_features

# four test images, known classes [2, 5, 7]; labels 9 are unknown
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
NOVELTY = np.array([0.9, 0.2, 0.1, 0.9])
LABELS = np.array([2, 5, 9, 9])
CLASSES = np.array([2, 5, 7])


def test_fusion_is_the_weighted_mean_of_msp_and_novelty():
    f = osdg.OpenSetFusion(threshold=0.6)
    np.testing.assert_allclose(f.score(PROBS, NOVELTY), [0.8, 0.5, 0.3, 0.75])
    f = osdg.OpenSetFusion(weights=(3, 1), threshold=0.6)  # normalised to 0.75 / 0.25
    np.testing.assert_allclose(f.score(PROBS, NOVELTY), [0.75, 0.65, 0.4, 0.675])
    np.testing.assert_array_equal(
        osdg.OpenSetFusion(threshold=0.6).predict(PROBS, NOVELTY, CLASSES), [2, -1, -1, 7]
    )


def test_evaluate_hand_computed_auroc_acc_h_score():
    m, arrays = osdg.evaluate_osdg(PROBS, NOVELTY, LABELS, CLASSES, threshold=0.6)
    # MSP alone: msp [.7 .8 .5 .6] -> [2, 5, -1, 7]: known acc 1, unknown acc 1/2
    assert m["msp"]["acc"] == 1.0
    assert m["msp"]["auroc"] == 1.0
    assert m["msp"]["h_score"] == pytest.approx(2 / 3)
    # fused [.8 .5 .3 .75] -> [2, -1, -1, 7]: known acc 1/2, unknown acc 1/2; AUROC 3/4
    assert m["fused"]["acc"] == 1.0  # the closed-set prediction is the classifier's
    assert m["fused"]["auroc"] == pytest.approx(0.75)
    assert m["fused"]["h_score"] == pytest.approx(0.5)
    assert (m["fused"]["known_acc"], m["fused"]["unknown_acc"]) == (0.5, 0.5)
    np.testing.assert_array_equal(arrays["prediction"], [2, -1, -1, 7])
    np.testing.assert_array_equal(arrays["closed_prediction"], [2, 5, 2, 7])
    assert h_score(arrays["prediction"], LABELS, np.isin(LABELS, CLASSES)) == pytest.approx(0.5)


def test_source_threshold_accepts_the_requested_fraction():
    src = np.linspace(0.01, 1.0, 100)
    t = osdg.source_threshold(src, 0.95)
    assert t == pytest.approx(0.06)
    assert (src >= t).sum() == 95
    f = osdg.OpenSetFusion(weights=(1, 0)).fit(source_msp=src)
    assert f.threshold_ == pytest.approx(0.06) and f.source_acceptance_ == pytest.approx(0.95)
    with pytest.raises(ValueError, match="source_msp is needed"):
        osdg.OpenSetFusion().fit(source_novelty=src)


def test_zscore_normalisation_uses_source_statistics():
    f = osdg.OpenSetFusion(normalize="zscore").fit(
        source_msp=np.array([0.5, 1.0]), source_novelty=np.array([0.0, 0.2])
    )
    # msp: mean .75 std .25; novelty: mean .1 std .1
    np.testing.assert_allclose(f.fuse(np.array([1.0]), np.array([0.0])), [0.5 * 1 + 0.5 * -1])
    with pytest.raises(RuntimeError, match="fit"):
        osdg.OpenSetFusion(normalize="zscore", threshold=0).fuse(np.array([1.0]), np.array([0.0]))


@pytest.mark.parametrize(
    "probs, kw, match",
    [
        (np.array([0.2, 0.8]), {}, "2-D"),
        (np.array([[0.2, 0.7], [0.5, 0.5]]), {}, "do not sum to 1.*row 1"),
        (PROBS, {"n_classes": 4}, "3 columns but there are 4 known classes"),
        (PROBS, {"n_samples": 5}, "4 rows but the test list has 5"),
        (np.array([[0.5, np.nan], [0.5, 0.5]]), {}, "NaN.*row 1, column 2"),
        (np.array([[1.2, -0.2], [0.5, 0.5]]), {}, "negative"),
        (np.array([["a", "b"]]), {}, "numeric"),
    ],
)
def test_bad_probabilities_are_rejected_with_clear_errors(probs, kw, match):
    with pytest.raises(ValueError, match=match):
        osdg.validate_probabilities(probs, **kw)


def test_probability_files(tmp_path):
    csv = tmp_path / "p.csv"
    osdg.save_probabilities(csv, PROBS, CLASSES)
    assert csv.read_text().splitlines()[0] == "class_2,class_5,class_7"
    np.testing.assert_allclose(osdg.load_probabilities(csv, 4, 3), PROBS)
    npy = tmp_path / "p.npy"
    osdg.save_probabilities(npy, PROBS)
    np.testing.assert_allclose(osdg.load_probabilities(npy, 4, 3), PROBS)
    bad = tmp_path / "bad.csv"
    bad.write_text("0.5,0.5\n0.2,0.3\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*row 2 \(b\.png\) sums to 0\.5"):
        osdg.load_probabilities(bad, paths=["a.png", "b.png"])
    bad.write_text("0.5,0.5\n0.5,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: non-numeric"):
        osdg.load_probabilities(bad)
    with pytest.raises(ValueError, match="unsupported"):
        osdg.load_probabilities(_touch(tmp_path / "p.txt"))
    with pytest.raises(ValueError, match="not found"):
        osdg.load_probabilities(tmp_path / "missing.npy")


def _touch(p):
    p.write_text("1\n")
    return p


def test_probabilities_from_a_torch_module():
    lin = torch.nn.Linear(4, 3)
    p = osdg.classifier_probabilities(lin, torch.randn(10, 4), batch_size=3)
    assert p.shape == (10, 3)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-6)
    sm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1))
    p2 = osdg.classifier_probabilities(sm, np.random.randn(5, 4), outputs="probs")
    assert p2.shape == (5, 3)
    with pytest.raises(ValueError, match="are these logits"):  # logits mistaken for probabilities
        osdg.classifier_probabilities(lin, torch.randn(5, 4) * 10, outputs="probs")


def test_linear_classifier_is_reproducible_and_learns():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (3, 8))
    y = np.repeat([1, 4, 6], 20)
    x = centers[np.searchsorted([1, 4, 6], y)] + rng.normal(0, 0.5, (60, 8))
    a = osdg.train_linear_classifier(x, y, seed=3, max_iter=30)
    b = osdg.train_linear_classifier(x, y, seed=3, max_iter=30)
    torch.testing.assert_close(a.linear.weight, b.linear.weight)
    assert (a.predict(x) == y).mean() == 1.0
    np.testing.assert_array_equal(a.classes_, [1, 4, 6])
    probs, nov = osdg.crossfit_source_scores(y, x, folds=2, seed=0, max_iter=30)
    assert probs.shape == (60, 3) and nov is None
    assert (np.array([1, 4, 6])[probs.argmax(1)] == y).mean() > 0.9
    with pytest.raises(ValueError, match="cannot make 30 stratified folds"):
        osdg.crossfit_source_scores(y, x, folds=30)


# --------------------------------------------------------------------------- end to end
@pytest.fixture
def tiny_name(tiny_registered):
    """The registered tiny backbone's name (``--backbone`` argument)."""
    return tiny_registered.name


def _lists(root):
    """support: red/green/blue (labels 0-2); test: + yellow (label 3, unknown)."""
    names = ["red", "green", "blue", "yellow"]
    for split in ("support", "test"):
        lines = [
            f"{split}/{c}/{p.name} {names.index(c)}"
            for c in names
            for p in sorted((root / split / c).glob("*.png")) if (root / split / c).is_dir()
        ]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root / "support.txt", root / "test.txt"


def test_end_to_end_user_mode_cli(class_folders, tiny_backbone, tiny_name, tmp_path, capsys):
    sup_list, test_list = _lists(class_folders)
    sup = read_list_file(sup_list, class_folders)
    test = read_list_file(test_list, class_folders)
    fs = extract_features(tiny_backbone, [r.path for r in sup], progress=False)
    fq = extract_features(tiny_backbone, [r.path for r in test], progress=False)
    ys = np.array([r.label for r in sup])
    clf = osdg.train_linear_classifier(fs, ys, seed=0)
    osdg.save_probabilities(tmp_path / "test_probs.csv", clf.predict_proba(fq), clf.classes_)
    src, _ = osdg.crossfit_source_scores(ys, fs, folds=2)
    np.save(tmp_path / "sup_probs.npy", src)
    out_json, out_csv = tmp_path / "m.json", tmp_path / "pred.csv"
    rc = main([
        "osdg", "--probs", str(tmp_path / "test_probs.csv"), "--support-probs",
        str(tmp_path / "sup_probs.npy"), "--support", str(sup_list), "--test", str(test_list),
        "--root", str(class_folders), "--method", "cosine", "--backbone", tiny_name,
        "--folds", "2", "--quiet", "--json", str(out_json), "--out-csv", str(out_csv),
    ])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out_json.read_text())
    assert m["fused"]["n_known"] == 9 and m["fused"]["n_unknown"] == 3
    assert m["msp"]["acc"] == m["fused"]["acc"] == 1.0  # colours are trivially separable
    assert m["fused"]["normalize"] == "zscore"  # auto for cosine
    assert 0.0 <= m["fused"]["h_score"] <= 1.0 and m["fused"]["auroc"] is not None
    rows = out_csv.read_text().splitlines()
    assert rows[0].split(",")[-1] == "prediction" and len(rows) == 13
    assert "MSP + cosine" in capsys.readouterr().out

    # class-count mismatch in the probability file: clear error, exit code 2
    osdg.save_probabilities(tmp_path / "bad.csv", np.full((12, 4), 0.25))
    rc = main(["osdg", "--probs", str(tmp_path / "bad.csv"), "--support", str(sup_list),
               "--test", str(test_list), "--root", str(class_folders), "--method", "cosine",
               "--backbone", tiny_name, "--threshold", "0.5", "--normalize", "none", "--quiet"])
    assert rc == 2
    assert "4 columns but there are 3 known classes" in capsys.readouterr().err
    # no source probabilities and no fixed threshold
    rc = main(["osdg", "--probs", str(tmp_path / "test_probs.csv"), "--support", str(sup_list),
               "--test", str(test_list), "--root", str(class_folders), "--method", "cosine",
               "--backbone", tiny_name, "--quiet"])
    assert rc == 2 and "--support-probs" in capsys.readouterr().err
    # a fixed threshold needs no source probabilities
    rc = main(["osdg", "--probs", str(tmp_path / "test_probs.csv"), "--support", str(sup_list),
               "--test", str(test_list), "--root", str(class_folders), "--method", "cosine",
               "--backbone", tiny_name, "--threshold", "2", "--normalize", "none",
               "--quiet", "--json", str(out_json), "--overwrite"])  # replaces the first run's
    assert rc == 0
    m = json.loads(out_json.read_text())
    assert m["fused"]["rejected"] == 1.0 and m["fused"]["threshold"] == 2.0


def test_end_to_end_benchmark_mode(class_folders, tiny_name, tmp_path, monkeypatch, capsys):
    _lists(class_folders)
    lists = class_folders / "lists"
    lists.mkdir()
    for f in ("support.txt", "test.txt"):
        (lists / f).write_text((class_folders / f).read_text())
    monkeypatch.setitem(SETTINGS, "tiny-osdg", Setting(
        "tiny-osdg", "tiny", "lists", (Target("A", "support.txt", "test.txt"),
                                       Target("B", "support.txt", "test.txt")),
    ))
    out = tmp_path / "r.json"
    rc = main(["osdg", "tiny-osdg", "--data-root", str(class_folders), "--method", "cosine",
               "--backbone", tiny_name, "--classifier-backbone", tiny_name,
               "--folds", "2", "--quiet", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert set(r["targets"]) == {"A", "B"}
    assert r["avg"]["msp"]["acc"] == r["avg"]["fused"]["acc"] == 1.0
    assert r["targets"]["A"]["fused"]["h_score"] == r["targets"]["B"]["fused"]["h_score"]
    assert math.isfinite(r["avg"]["fused"]["auroc"])
    table = capsys.readouterr().out
    assert "| avg |" in table and "H-score MSP+cosine" in table
    # benchmark mode rejects user-mode options
    assert main(["osdg", "tiny-osdg", "--probs", "x.csv", "--data-root", str(class_folders)]) == 2
    assert "does not take --probs" in capsys.readouterr().err

"""OSCR (Dhamija et al. 2018): hand-computed curves, ties, and its place in the OSDG metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resend_novelty.evaluation import auroc, oscr
from resend_novelty.osdg import evaluate_osdg, oscr_metrics


def test_oscr_hand_computed():
    # knowns at 4 and 3 (the one at 3 misclassified), unknowns at 2 and 1: CCR stops at 0.5
    assert oscr([4, 3, 2, 1], [True, False, True, True], [True, True, False, False]) == 0.5
    # interleaved, all correct: OSCR = AUROC = 0.75
    s, k = [4, 3, 2, 1], [True, False, True, False]
    assert oscr(s, [True] * 4, k) == pytest.approx(0.75) == pytest.approx(auroc(s, k))
    # a tie between a known and an unknown enters together: the diagonal, 0.5
    assert oscr([1, 1], [True, True], [True, False]) == 0.5
    # no unknown: undefined
    assert math.isnan(oscr([1, 2], [True, True], [True, True]))
    with pytest.raises(ValueError, match="differ in length"):
        oscr([1, 2], [True], [True, False])


def test_oscr_is_at_most_acc_and_auroc():
    rng = np.random.default_rng(0)
    s = rng.normal(size=400)
    k = rng.random(400) < 0.5
    s[k] += 1.0
    c = rng.random(400) < 0.7
    o = oscr(s, c, k)
    assert o <= min(auroc(s, k), c[k].mean()) + 1e-9
    assert o == pytest.approx(c[k].mean() * auroc(s, k), abs=0.05)  # independent: ~ product


def test_osdg_metrics_report_oscr():
    classes = np.array([0, 1])
    labels = np.array([0, 1, 0, 1, 5, 5])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.5, 0.5], [0.6, 0.4]])
    nov = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    m, arrays = evaluate_osdg(probs, nov, labels, classes, threshold=0.5)
    o = oscr_metrics(arrays, labels, classes)
    # fused score: knowns above unknowns; 3 of 4 knowns correct -> OSCR 0.75
    assert o["fused"] == pytest.approx(0.75)
    assert 0.0 <= o["msp"] <= 0.75

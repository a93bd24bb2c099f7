"""Metrics: hand-computed cases, undefined cases, and properties (hypothesis).

Convention: known samples are the positive class, higher score = more normal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from resend_novelty.evaluation import (
    aupr_in,
    aupr_out,
    auroc,
    closed_set_accuracy,
    fpr95,
    fpr_at_tpr,
    h_score,
    novelty_report,
)

# knowns 0.9 0.8 0.7 0.6 / unknowns 0.75 0.5 0.4 0.3
KNOWN = [0.9, 0.8, 0.7, 0.6]
UNKNOWN = [0.75, 0.5, 0.4, 0.3]
SCORES = np.array(KNOWN + UNKNOWN)
IS_KNOWN = np.array([True] * 4 + [False] * 4)


def test_auroc_hand_computed():
    # pairs (k, u) with k > u: 0.9 -> 4, 0.8 -> 4, 0.7 -> 3, 0.6 -> 3  =>  14 / 16
    assert auroc(SCORES, IS_KNOWN) == pytest.approx(14 / 16)


def test_auroc_ties_count_half():
    # one tie between a known and an unknown: (1 + 0.5 + 1 + 1) / 4
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(3.5 / 4)


def test_fpr95_hand_computed():
    # 95% of 4 knowns needs all 4 -> threshold 0.6; unknowns >= 0.6: only 0.75 -> 1/4
    assert fpr95(SCORES, IS_KNOWN) == pytest.approx(0.25)
    # with 20 knowns, 95% = 19 knowns -> threshold is the 19th largest known score
    known = np.linspace(1.0, 0.05, 20)  # 1.0, 0.95, ..., 0.05; the 19th is 0.10
    unknown = np.array([0.12, 0.11, 0.07, 0.02])  # two of them >= 0.10
    s = np.r_[known, unknown]
    k = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    assert fpr95(s, k) == pytest.approx(0.5)
    # TPR 100% reaches the lowest known (0.05): three unknowns are accepted
    assert fpr_at_tpr(s, k, 1.0) == pytest.approx(0.75)
    # TPR 50% = 10 knowns -> threshold 0.55: no unknown accepted
    assert fpr_at_tpr(s, k, 0.5) == pytest.approx(0.0)


def test_fpr95_perfect_and_worst():
    assert fpr95([3, 2, 1, 0], [True, True, False, False]) == 0.0
    assert fpr95([0, 1, 2, 3], [True, True, False, False]) == 1.0


def test_aupr_hand_computed():
    # ranking (desc): K K U K K U U U -> precision at each known: 1, 1, 3/4, 4/5
    assert aupr_in(SCORES, IS_KNOWN) == pytest.approx((1 + 1 + 0.75 + 0.8) / 4)
    # unknowns positive, negated score (asc): U U U K K U K K -> 1, 1, 1, 4/6
    assert aupr_out(SCORES, IS_KNOWN) == pytest.approx((1 + 1 + 1 + 4 / 6) / 4)


def test_closed_set_accuracy_hand_computed():
    pred = [0, 1, 2, 0, -1]
    labels = [0, 1, 1, 5, 5]
    known = [True, True, True, False, False]
    assert closed_set_accuracy(pred, labels, known) == pytest.approx(2 / 3)
    assert closed_set_accuracy(pred, labels) == pytest.approx(2 / 5)
    assert math.isnan(closed_set_accuracy(pred, labels, [False] * 5))
    with pytest.raises(ValueError, match="differ in length"):
        closed_set_accuracy([0, 1], [0])


def test_h_score_hand_computed():
    pred = [0, 1, -1, 2, -1, 0]
    labels = [0, 1, 2, 9, 9, 9]
    known = [True, True, True, False, False, False]
    acc_k, acc_u = 2 / 3, 1 / 3
    assert h_score(pred, labels, known) == pytest.approx(2 * acc_k * acc_u / (acc_k + acc_u))
    # no unknown rejected -> 0; no known group -> nan
    assert h_score([0, 1, 0], [0, 1, 9], [True, True, False]) == 0.0
    assert math.isnan(h_score([0, 1], [0, 1], [True, True]))
    # a custom unknown label
    assert h_score([0, 7], [0, 9], [True, False], unknown_label=7) == 1.0


@pytest.mark.parametrize("fn", [auroc, fpr95, aupr_in, aupr_out])
@pytest.mark.parametrize("known", [True, False])
def test_single_group_is_undefined(fn, known):
    assert math.isnan(fn([0.1, 0.5, 0.9], [known] * 3))


@pytest.mark.parametrize("known,missing", [(True, "unknown"), (False, "known")])
def test_report_undefined_gives_none_and_note(known, missing):
    rep = novelty_report([0.1, 0.5, 0.9], [known] * 3)
    assert rep["auroc"] is None and rep["fpr95"] is None
    assert rep["aupr_in"] is None and rep["aupr_out"] is None
    assert rep["n_known"] == (3 if known else 0) and rep["n_unknown"] == (0 if known else 3)
    assert f"no {missing} sample" in rep["note"] and "undefined" in rep["note"]


def test_report_defined_values():
    rep = novelty_report(SCORES, IS_KNOWN)
    assert rep["auroc"] == pytest.approx(14 / 16) and rep["fpr95"] == pytest.approx(0.25)
    assert rep["n_known"] == 4 and rep["n_unknown"] == 4 and "note" not in rep


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc([0.1, bad, 0.3], [True, False, True])
    with pytest.raises(ValueError, match="NaN or inf"):
        novelty_report([0.1, bad], [True, False])


def test_input_validation():
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="no samples"):
        auroc([], [])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([0.1, 0.2], [True, False], 0.0)


# --------------------------------------------------------------------------- properties
def _scored_sets(min_size=2, max_size=40):
    """(integer scores, is_known) with both groups present; integers so that transforms are exact."""
    return st.lists(
        st.tuples(st.integers(-1000, 1000), st.booleans()), min_size=min_size, max_size=max_size
    ).filter(lambda xs: any(k for _, k in xs) and not all(k for _, k in xs)).map(
        lambda xs: (np.array([s for s, _ in xs], float), np.array([k for _, k in xs]))
    )


TRANSFORMS = {
    "affine": lambda s: 3.0 * s + 7.0,
    "cube": lambda s: s**3,
    "exp": lambda s: np.exp(s / 500.0),
    "tanh": lambda s: np.tanh(s / 2000.0),
    "arctan_shift": lambda s: np.arctan(s / 100.0) - 5.0,
}

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@PROPS
@given(data=_scored_sets(), name=st.sampled_from(sorted(TRANSFORMS)))
def test_metrics_invariant_to_increasing_transform(data, name):
    s, k = data
    t = TRANSFORMS[name](s)
    assert np.array_equal(np.argsort(s, kind="stable"), np.argsort(t, kind="stable"))
    assert auroc(t, k) == pytest.approx(auroc(s, k), abs=1e-12)
    assert fpr95(t, k) == pytest.approx(fpr95(s, k), abs=1e-12)
    assert aupr_in(t, k) == pytest.approx(aupr_in(s, k), abs=1e-12)
    assert aupr_out(t, k) == pytest.approx(aupr_out(s, k), abs=1e-12)


@PROPS
@given(data=_scored_sets())
def test_swapping_known_and_unknown_flips_auroc(data):
    s, k = data
    assert auroc(s, ~k) == pytest.approx(1.0 - auroc(s, k), abs=1e-12)
    assert auroc(-s, k) == pytest.approx(1.0 - auroc(s, k), abs=1e-12)
    # AUPR-Out is AUPR-In of the swapped problem with negated scores
    assert aupr_out(s, k) == pytest.approx(aupr_in(-s, ~k), abs=1e-12)


@PROPS
@given(data=_scored_sets(), tpr=st.floats(0.01, 1.0))
def test_fpr_at_tpr_in_unit_interval_and_matches_brute_force(data, tpr):
    s, k = data
    v = fpr_at_tpr(s, k, tpr)
    assert 0.0 <= v <= 1.0
    # brute force: the highest threshold that accepts >= tpr of the knowns
    known_scores = np.sort(s[k])[::-1]
    thr = max(t for t in known_scores if (known_scores >= t).mean() >= tpr - 1e-12)
    assert v == pytest.approx((s[~k] >= thr).mean(), abs=1e-12)
    assert 0.0 <= auroc(s, k) <= 1.0
    assert 0.0 <= aupr_in(s, k) <= 1.0 and 0.0 <= aupr_out(s, k) <= 1.0


@PROPS
@given(data=_scored_sets())
def test_auroc_matches_pair_counting(data):
    s, k = data
    diff = s[k][:, None] - s[~k][None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auroc(s, k) == pytest.approx(expected, abs=1e-12)


@PROPS
@given(data=_scored_sets(), a=st.floats(0.01, 0.99), b=st.floats(0.01, 0.99))
def test_fpr_at_tpr_monotone_in_tpr(data, a, b):
    s, k = data
    assume(a != b)
    lo, hi = sorted((a, b))
    assert fpr_at_tpr(s, k, lo) <= fpr_at_tpr(s, k, hi)


def test_aupr_perfect_separation_is_exactly_one():
    # sklearn's average precision gives 1.0000000000000002 here (9 knowns, 2 unknowns)
    s = np.arange(11, 0, -1, dtype=float)
    k = np.r_[np.ones(9, bool), np.zeros(2, bool)]
    assert aupr_in(s, k) == 1.0 and aupr_out(-s, ~k) == 1.0
    assert novelty_report(s, k)["aupr_in"] == 1.0

"""Threshold from the unlabelled test scores: the known mode of a 2-component mixture."""

from __future__ import annotations

import numpy as np
import pytest

from resend_novelty.detectors import test_mode_threshold as mode_threshold


def test_recall_of_the_known_mode_is_the_asked_one():
    rng = np.random.default_rng(0)
    known = rng.normal(1.0, 0.1, 800)
    unknown = rng.normal(0.2, 0.1, 400)
    scores = rng.permutation(np.r_[known, unknown])
    for tpr in (0.95, 0.8):
        t, rule = mode_threshold(scores, tpr=tpr)
        assert (known >= t).mean() == pytest.approx(tpr, abs=0.02)
        assert (unknown < t).mean() > 0.99
        assert rule["tpr"] == tpr and rule["n_images"] == 1200
        assert rule["means"][rule["known_component"]] == pytest.approx(1.0, abs=0.02)
        assert rule["known_share"] == pytest.approx(2 / 3, abs=0.02)
    # deterministic (seeded mixture)
    assert mode_threshold(scores)[0] == mode_threshold(scores)[0]


def test_refusals():
    with pytest.raises(ValueError, match="at least 20"):
        mode_threshold(np.arange(5.0))
    with pytest.raises(ValueError, match="NaN"):
        mode_threshold(np.r_[np.arange(30.0), np.nan])
    with pytest.raises(ValueError, match="tpr"):
        mode_threshold(np.arange(30.0), tpr=0)

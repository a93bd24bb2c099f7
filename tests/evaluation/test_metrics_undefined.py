"""Benchmark metrics without one of the two groups (only knowns or only unknowns)."""

from __future__ import annotations

import json

import numpy as np

from resend_novelty.evaluation import novelty_report


def test_only_knowns_or_only_unknowns_in_benchmark_metrics():
    """AUROC is undefined without one of the two groups: reported as None with a note, while the
    counts (and the closed-set accuracy where computed) are still given."""
    only_unknown = novelty_report(np.array([0.2, 0.4]), np.array([False, False]))
    assert only_unknown["auroc"] is None and only_unknown["n_unknown"] == 2
    assert "no known sample" in only_unknown["note"]
    json.dumps(only_unknown)  # JSON-ready (no nan)

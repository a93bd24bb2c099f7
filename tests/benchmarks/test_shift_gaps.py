"""benchmarks/shift_gaps.py: the gap matrix and its table on made-up features."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def S(monkeypatch):
    """The script as a module (benchmark scripts import their siblings by name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("shift_gaps")


def test_domain_gaps_are_zero_on_the_diagonal_and_grow_with_the_shift(S):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(30, 8, generator=g) + 1
    far = torch.rand(30, 8, generator=g) + torch.tensor([6.0] + [0.0] * 7)
    feats = torch.cat([base, base + 0.1, far])
    domain = np.repeat(["a", "b", "c"], 30)
    gaps = S.domain_gaps(feats, domain, ["a", "b", "c"])
    assert [gaps[i][i] for i in range(3)] == pytest.approx([0, 0, 0], abs=1e-6)
    assert gaps[0][1] == pytest.approx(gaps[1][0], abs=1e-6)  # the gap is symmetric
    assert gaps[0][1] < 0.01 < gaps[0][2]


def test_the_table_marks_the_gaps_above_the_threshold(S):
    pacs = [[0.0, 0.1, 0.3, 0.5]] * 4
    md = S.section(pacs, [("sketch", 0.25)], [("cell", "10", 0.05, 0.21)], 0.2, 10, 0)
    assert "| photo | 0.000 | 0.100 | **0.300** | **0.500** |" in md
    assert "sketch **0.250**" in md and "| cell | 10 | 0.050 | **0.210** |" in md
    assert S.section([[-1e-7] * 4] * 4, [], [], 0.2, 1, 0).count("-0.000") == 0

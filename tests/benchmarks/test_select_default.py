"""benchmarks/select_default.py: the rules' verdicts and choices on made-up suite results."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(autouse=True)
def S(monkeypatch):
    """The script as a module (benchmark scripts import their siblings by name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("select_default")


def _results(sel, intra: dict, cross: dict, cosine=0.80):
    """Two intra-domain and one cross-domain cell; ``intra`` / ``cross``: candidate -> AUROC
    (two episodes, spread 0.01)."""
    cells = [dict(kind="intra", label="a", support=10, share=None),
             dict(kind="intra", label="b", support=5, share=None),
             dict(kind="cross", label="c", support="all", share=None),
             dict(kind="cross BIASED", label="d", support="all", share=None)]
    out = []
    for cell in cells:
        values = cross if cell["kind"].startswith("cross") else intra
        res = {"cosine|-": [cosine, cosine]}
        for name in sel.names:
            v = values[name] if cell["kind"] != "cross BIASED" else 0.0  # never counted
            res[f"{name}|{sel.mode}"] = [v - 0.01, v + 0.01]
        out.append((cell, res))
    return out


def test_per_image_ties_go_to_the_best_cross_domain_margin(S):
    sel = S.SELECTIONS["per-image"]
    assert sel.names == ["w0", "w3", "w4", "w5", "w6"] and sel.mode == "P"
    intra = dict(w0=0.820, w3=0.826, w4=0.825, w5=0.822, w6=0.700)
    cross = dict(w0=0.81, w3=0.82, w4=0.83, w5=0.84, w6=0.90)
    verdicts = S.judge(_results(sel, intra, cross), sel)
    assert not verdicts["w6"]["eligible"] and verdicts["w6"]["losses"]  # 0.70 < 0.80 - 0.01
    assert verdicts["w3"]["intra"] == pytest.approx(0.026)
    # w3, w4, w5 are within 0.005 of the best intra margin; w5 has the best cross margin
    assert S.choose(verdicts, sel.tie_break) == "w5"
    md = S.section(_results(sel, intra, cross), 2, 2, 1, 1.0, sel=sel)
    assert md.startswith("## Selection of the per-image scoring")
    assert "--which per-image" in md and "**Choice by the rule: w5**" in md
    assert "| cell | kind | support / class | unknown share | cosine | w0 (P) | w3 (P) |" in md


def test_transductive_ties_go_to_the_trained_normalisation(S):
    sel = S.SELECTIONS["transductive"]
    assert sel.names == ["A", "B", "C"] and sel.section == "selection"
    verdicts = S.judge(_results(sel, dict(A=0.85, B=0.862, C=0.864),
                                dict(A=0.9, B=0.9, C=0.95)), sel)
    assert S.choose(verdicts, sel.tie_break) == "B"  # C is best but tied: B was trained so
    md = S.section(_results(sel, dict(A=0.85, B=0.86, C=0.86), dict(A=0.9, B=0.9, C=0.9)),
                   2, 2, 1, 1.0, sel=sel)
    assert "| cell | kind | support / class | unknown share | cosine | A (T) | B (T) | C (T) |\n" \
           "|---|---|---|---|---|---|---|---|" in md
    assert "select_default.py --data-root ../shared/data`." in md


def test_no_eligible_candidate_chooses_none(S):
    sel = S.SELECTIONS["per-image"]
    verdicts = S.judge(_results(sel, {k: 0.7 for k in sel.names},
                                {k: 0.9 for k in sel.names}), sel)
    assert S.choose(verdicts, sel.tie_break) is None

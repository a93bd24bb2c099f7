"""PNG plots of a :class:`~resend_novelty.report.result.ScoreResult`.

Histogram of the normality scores with the threshold, and (with labelled test images) the ROC of
known vs unknown test classes and the fraction of each test class flagged unknown. Figures are
drawn on an Agg canvas (no GUI, no pyplot global state). matplotlib (heavy) is imported when a
plot is drawn, not with the package.
"""

from __future__ import annotations

import os

import numpy as np
from sklearn.metrics import roc_curve

from ..evaluation import auroc, fpr95
from .result import ScoreResult

__all__ = ["plot_histogram", "plot_roc", "plot_detection_rates"]


def _figure(width=6.4, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # Agg canvas: no GUI, no pyplot global state
    return fig


def _threshold_label(result: ScoreResult) -> str:
    rule = result.threshold_rule
    if rule.get("source") == "given":
        how = "given"
    else:
        how = f"support LOO, recall {rule.get('tpr', 0):.0%}"
    return f"threshold {result.threshold:.4g} ({how})"


def plot_histogram(result: ScoreResult, path: str | os.PathLike) -> None:
    """Histogram of normality scores (known/unknown test classes apart when labelled)."""
    fig = _figure()
    ax = fig.add_subplot()
    s = result.normality
    lo, hi = float(min(s.min(), result.threshold)), float(max(s.max(), result.threshold))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    is_known = result.is_known
    if is_known is None:
        ax.hist(s, bins=bins, color="tab:gray", alpha=0.85, label=f"test images ({len(s)})")
    else:
        if is_known.any():
            ax.hist(s[is_known], bins=bins, color="tab:blue", alpha=0.6,
                    label=f"known classes ({int(is_known.sum())})")
        if (~is_known).any():
            ax.hist(s[~is_known], bins=bins, color="tab:orange", alpha=0.6,
                    label=f"unknown classes ({int((~is_known).sum())})")
    ax.axvline(result.threshold, color="tab:red", linestyle="--", linewidth=1.5,
               label=_threshold_label(result))
    ax.set_xlabel("normality score (higher = more likely a known class)")
    ax.set_ylabel("images")
    ax.set_title(f"{result.method}: {int(result.flagged_unknown.sum())} of {len(s)} "
                 "images flagged unknown")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_roc(result: ScoreResult, path: str | os.PathLike) -> bool:
    """ROC of knowns (positive) vs unknowns; False (nothing written) without both groups."""
    is_known = result.is_known
    if is_known is None or is_known.all() or not is_known.any():
        return False
    fpr, tpr, _ = roc_curve(is_known, result.normality)
    a, f95 = auroc(result.normality, is_known), fpr95(result.normality, is_known)
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUROC {a:.4f}, FPR95 {f95:.4f}")
    ax.plot([0, 1], [0, 1], color="tab:gray", linestyle=":", linewidth=1)
    flagged = result.flagged_unknown
    op_tpr = float((~flagged[is_known]).mean())
    op_fpr = float((~flagged[~is_known]).mean())
    ax.plot([op_fpr], [op_tpr], "o", color="tab:red", label=_threshold_label(result))
    ax.set_xlabel("unknown images accepted as known (FPR)")
    ax.set_ylabel("known images accepted (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"{result.method}: known vs unknown test classes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_detection_rates(result: ScoreResult, path: str | os.PathLike) -> bool:
    """Bar chart: fraction of each test class flagged unknown (False without labels)."""
    if result.test_labels is None:
        return False
    from matplotlib.patches import Patch

    labels = np.array(result.test_labels, dtype=object)
    flagged = result.flagged_unknown
    names = sorted(set(result.test_labels), key=lambda n: (n not in result.class_names, n))
    rates = [float(flagged[labels == n].mean()) for n in names]
    colors = ["tab:blue" if n in result.class_names else "tab:orange" for n in names]
    fig = _figure(max(5.0, 0.8 * len(names) + 2.0), 4.4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, rates, color=colors)
    for xi, r, n in zip(x, rates, names):
        ax.text(xi, r + 0.01, f"{r:.0%}\n(n={int((labels == n).sum())})", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(x)
    # names are text, not mathtext: "x$^$" must not be parsed as a formula
    ax.set_xticklabels([n.replace("$", r"\$") for n in names], rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("fraction flagged unknown")
    ax.set_title(f"{result.method}: detection rate per test class")
    ax.legend(handles=[Patch(color="tab:blue", label="known class (want low)"),
                       Patch(color="tab:orange", label="unknown class (want high)")],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return True

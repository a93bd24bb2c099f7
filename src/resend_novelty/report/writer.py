"""The report folder of a scoring run: ``scores.csv``, ``summary.json``, the PNG plots and
(``html=True``) the self-contained page ``report.html``."""

from __future__ import annotations

import os
from pathlib import Path

from .files import write_json
from .html import write_html_report
from .plots import plot_detection_rates, plot_histogram, plot_roc
from .result import ScoreResult

__all__ = ["write_report"]


def write_report(result: ScoreResult, out_dir: str | os.PathLike, plots: bool = True,
                 html: bool = False) -> dict:
    """Write scores.csv, summary.json, the PNG plots and (``html``) report.html to
    ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"scores": str(out / "scores.csv"), "summary": str(out / "summary.json")}
    result.write_csv(files["scores"])
    if plots:
        files["histogram"] = str(out / "histogram.png")
        plot_histogram(result, files["histogram"])
        if plot_roc(result, out / "roc.png"):
            files["roc"] = str(out / "roc.png")
        if plot_detection_rates(result, out / "detection_rates.png"):
            files["detection_rates"] = str(out / "detection_rates.png")
    if html:
        pngs = {k: v for k, v in files.items() if v.endswith(".png")}
        files["report"] = write_html_report(result, out / "report.html", plots=pngs)
    summary = result.summary()
    summary["files"] = {k: os.path.basename(v) for k, v in files.items()}
    write_json(files["summary"], summary)
    return files

"""The report folder of a scoring run: ``scores.csv``, ``summary.json``, the PNG plots and
(``html=True``) the self-contained page ``report.html``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .files import write_json
from .html import write_html_report
from .plots import plot_detection_rates, plot_histogram, plot_roc
from .result import ScoreResult

__all__ = ["write_report", "REPORT_FILES"]

#: the files a report folder holds (an earlier run's are replaced, nothing else is touched)
REPORT_FILES = ("scores.csv", "summary.json", "histogram.png", "roc.png", "detection_rates.png",
                "report.html")


def write_report(result: ScoreResult, out_dir: str | os.PathLike, plots: bool = True,
                 html: bool = False) -> dict:
    """Write scores.csv, summary.json, the PNG plots and (``html``) report.html to
    ``out_dir``; returns name -> path.

    Everything is written into a hidden folder inside ``out_dir`` first and moved into ``out_dir`` only
    when complete: an interrupted or failed run leaves an earlier report in ``out_dir`` as it
    was; after a complete one, files of :data:`REPORT_FILES` the new report does not have
    (e.g. an old ``roc.png``) are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # hidden, inside out_dir: same file system (os.replace), writable as out_dir is checked
    tmp = out / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = _write(result, tmp, plots, html)
        for name in written.values():
            os.replace(tmp / name, out / name)
        for name in REPORT_FILES:
            if name not in written.values() and (out / name).is_file():
                (out / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(out / v) for k, v in written.items()}


def _write(result: ScoreResult, out: Path, plots: bool, html: bool) -> dict:
    """The report files in ``out``; returns name -> file name."""
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
    return {k: os.path.basename(v) for k, v in files.items()}

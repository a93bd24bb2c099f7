"""``report.html``: one self-contained page to look at a scoring run (:func:`write_html_report`).

The page needs no network and no JavaScript: thumbnails are small JPEGs and the plots PNGs,
both embedded as base64 ``data:`` URIs. It shows the run (method, classes, threshold and how it
was chosen, counts, metrics with labelled test images), the images flagged unknown first (lowest
normality first, with their score and nearest known class), one panel per known class (the
images predicted as that class, least confident first) and the plots. Every name on the page
(class names, file names, paths) comes from the user's folders and is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..data import DataError, load_image
from .result import ScoreResult

__all__ = ["write_html_report", "thumbnail_data_uri"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table.info td{padding:2px 10px 2px 0;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:128px;background:#fff;border:1px solid #ddd;padding:4px;font-size:11px}
figure.unknown{border-color:#c0392b;background:#fdf0ee}
figure img{display:block;margin:auto;max-width:120px;max-height:120px}
figcaption{overflow-wrap:anywhere}.name{color:#555}.score{font-weight:bold}
.plots img{max-width:560px;margin:4px;border:1px solid #ddd;background:#fff}
.note{color:#666;font-size:12px}
"""


def thumbnail_data_uri(path: str | os.PathLike, size: int = 120, quality: int = 70) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of the image at ``path`` (None if unreadable)."""
    try:  # the package's decoder: the same format whitelist and pixel limits as scoring
        im = load_image(path, draft=(size, size))
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    except (DataError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _card(result: ScoreResult, i: int, thumb: str | None) -> str:
    e = html.escape
    p = result.paths[i]
    unknown = bool(result.flagged_unknown[i])
    img = (f'<img src="{thumb}" alt="{e(os.path.basename(p))}">' if thumb
           else '<div class="note">(unreadable)</div>')
    label = ""
    if result.test_labels is not None:
        label = f"<br>label: {e(result.test_labels[i])}"
    return (f'<figure class="{"unknown" if unknown else "known"}" title="{e(p)}">{img}'
            f'<figcaption><span class="name">{e(os.path.basename(p))}</span><br>'
            f'<span class="score">{result.normality[i]:.4g}</span> nearest '
            f'{e(result.nearest[i])}{label}</figcaption></figure>')


def _grid(result, rows, thumbs, limit: int) -> str:
    shown = rows[:limit]
    cards = "".join(_card(result, i, thumbs.get(i)) for i in shown)
    more = (f'<p class="note">{len(rows) - len(shown)} more in scores.csv (the page shows '
            f"{limit} per panel)</p>" if len(rows) > len(shown) else "")
    return f'<div class="grid">{cards}</div>{more}' if rows else '<p class="note">none</p>'


def write_html_report(result: ScoreResult, path: str | os.PathLike,
                      plots: dict[str, str] | None = None, per_panel: int = 60,
                      thumb_size: int = 120, progress: bool = False) -> str:
    """Write the page to ``path`` (see module doc); ``plots``: name -> PNG file to embed;
    ``per_panel``: at most this many thumbnails per panel (the rest are counted)."""
    e = html.escape
    order = np.argsort(result.normality, kind="stable")  # least normal first
    flagged = [int(i) for i in order if result.flagged_unknown[i]]
    pred = result.prediction
    panels = {c: [int(i) for i in order if pred[i] == c and not result.flagged_unknown[i]]
              for c in result.class_names}
    wanted = set(flagged[:per_panel])
    for rows in panels.values():
        wanted.update(rows[:per_panel])
    thumbs = {i: thumbnail_data_uri(result.paths[i], thumb_size)
              for i in tqdm(sorted(wanted), desc="report.html thumbnails", unit="img",
                            disable=not progress)}
    rule = result.threshold_rule
    info = [("method", result.method), ("known classes", ", ".join(result.class_names)),
            ("test images", f"{len(result.paths)} ({result.test})"),
            ("flagged unknown", str(len(flagged))),
            ("threshold", f"{result.threshold:.4g} ("
             + ", ".join(f"{k}: {v}" for k, v in rule.items()) + ")")]
    m = result.metrics()
    if m is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        info.append(("metrics (labels from class folders)",
                     f"AUROC {fmt(m['auroc'])}, FPR95 {fmt(m['fpr95'])}, known accepted "
                     f"{fmt(m['known_accepted'])}, unknown rejected {fmt(m['unknown_rejected'])}"))
    rows = "".join(f"<tr><td><b>{e(k)}</b></td><td>{e(str(v))}</td></tr>" for k, v in info)
    body = [f"<h1>Novelty report: {e(result.method)}</h1><table class=\"info\">{rows}</table>",
            f"<h2>Flagged unknown ({len(flagged)})</h2>", _grid(result, flagged, thumbs, per_panel)]
    for c, members in panels.items():
        body += [f"<h2>Predicted {e(c)} ({len(members)})</h2>",
                 _grid(result, members, thumbs, per_panel)]
    if plots:
        imgs = "".join(f'<img src="{_png_uri(p)}" alt="{e(name)}">' for name, p in plots.items())
        body += [f'<h2>Plots</h2><div class="plots">{imgs}</div>']
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Novelty report: {e(result.method)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return str(path)

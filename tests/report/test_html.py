"""report.html: self-contained, escaped, flagged images first; a headless-browser check."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import COLORS, make_image
from PIL import Image

from resend_novelty.detectors import CosineDetector
from resend_novelty.report import ScoreResult, score_folders, write_report

EVIL = '<script>alert("x")</script>'
EVIL_FILE = '<b onmouseover="x">&'  # a file name cannot hold "/"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.h2, self.captions, self._in = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag in ("h2", "figcaption"):
            self._in, self._buf = tag, ""

    def handle_data(self, data):
        if self._in:
            self._buf += data

    def handle_endtag(self, tag):
        if tag == self._in:
            (self.h2 if tag == "h2" else self.captions).append(self._buf)
            self._in = None


def _result(tmp_path) -> ScoreResult:
    paths = []
    for i, c in enumerate(["red", "blue", "yellow", "green"]):
        paths.append(str(make_image(tmp_path / "imgs" / f"{c}{i}.png", COLORS[c], size=(300, 200))))
    bad = tmp_path / "imgs" / f"{EVIL_FILE}.png"  # an untrusted file name; not a readable image
    bad.write_bytes(b"nope")
    paths.append(str(bad))
    sims = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.2], [0.1, 0.35], [0.25, 0.05]])
    return ScoreResult(paths=paths, normality=sims.max(1), similarities=sims,
                       class_names=["red", EVIL], threshold=0.5,
                       threshold_rule={"source": "given"}, method="cosine", test="t")


def test_page_is_self_contained_escaped_and_flagged_first(tmp_path):
    res = _result(tmp_path)
    files = write_report(res, tmp_path / "out", html=True)
    page = (tmp_path / "out" / "report.html").read_text()
    assert files["report"].endswith("report.html")
    assert EVIL not in page and "&lt;script&gt;" in page  # class and file names escaped
    assert EVIL_FILE not in page and "&lt;b onmouseover=&quot;x&quot;&gt;&amp;" in page
    parser = _Page()
    parser.feed(page)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert all(s.startswith("data:image/") for s in parser.srcs)  # nothing fetched
    assert "href=" not in page and "url(" not in page
    assert parser.h2[0] == "Flagged unknown (3)" and parser.h2[-1] == "Plots"
    assert parser.h2[1:3] == ["Predicted red (1)", f"Predicted {EVIL} (1)"]
    # flagged: lowest normality first, with score and nearest class
    assert parser.captions[0].startswith(EVIL_FILE) and parser.captions[1].startswith("yellow2.png")
    assert "0.25" in parser.captions[0] and "0.3" in parser.captions[1]
    assert "nearest red" in parser.captions[0]
    assert "(unreadable)" in page
    thumbs = [s for s in parser.srcs if s.startswith("data:image/jpeg")]
    assert len(thumbs) == 4  # the unreadable file has none
    assert max(len(s) for s in thumbs) < 8000  # small thumbnails, not the images
    assert sum(s.startswith("data:image/png") for s in parser.srcs) == 1  # histogram


def test_cli_writes_report_html(class_folders, tiny_backbone, tmp_path):
    det = CosineDetector(backbone=tiny_backbone, num_workers=0, progress=False)
    res = score_folders(det, class_folders / "support", class_folders / "test")
    write_report(res, tmp_path / "o", html=True)
    parser = _Page()
    parser.feed((tmp_path / "o" / "report.html").read_text())
    assert sum(s.startswith("data:image/png") for s in parser.srcs) == 3  # hist, roc, rates
    assert len([c for c in parser.captions if "label:" in c]) >= 12


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None, reason="no headless chromium installed")
def test_headless_browser_renders_the_page(tmp_path):
    write_report(_result(tmp_path), tmp_path / "out", html=True)
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
           f"--screenshot={shot}", (tmp_path / "out" / "report.html").as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    assert arr.shape[:2] == (1400, 1000)
    # the thumbnails were drawn: the red, blue and yellow images' colours are on the page
    for color in (COLORS["red"], COLORS["blue"], COLORS["yellow"]):
        near = (np.abs(arr - np.array(color)).sum(axis=2) < 60).sum()
        assert near > 200, color

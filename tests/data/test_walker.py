"""One walker for support and test folders: one rule for hidden files, links, formats; it reports
what it skips."""

from __future__ import annotations

import os
import warnings

import pytest
from conftest import make_image

from resend_novelty.data import (DataError, SkippedFilesWarning, list_images, scan_class_folders,
                                 walk_images)
from resend_novelty.report import scan_support, scan_test


def _tree(root):
    make_image(root / "a" / "1.png", (1, 2, 3))
    make_image(root / "a" / "2.JPG", (1, 2, 3), fmt="JPEG")
    make_image(root / "a" / ".hidden" / "h.png", (1, 2, 3))
    (root / "a" / ".x.png").write_bytes(b"x")
    make_image(root / "a" / "scan.tif", (1, 2, 3), fmt="TIFF")
    make_image(root / "a" / "anim.gif", (1, 2, 3), fmt="GIF")
    os.mkfifo(root / "a" / "pipe.jpg")
    make_image(root / "elsewhere" / "e.png", (1, 2, 3))
    os.symlink(root / "elsewhere", root / "a" / "linked")
    os.symlink(root / "nowhere.png", root / "a" / "broken.png")
    os.symlink(root / "a", root / "a" / "loop")
    return root / "a"


def test_walk_rule_and_skip_reasons(tmp_path):
    files, skipped = walk_images(_tree(tmp_path))
    assert [p.name for p in files] == ["1.png", "2.JPG", "e.png"]  # links followed
    reasons = {os.path.basename(s.path): s.reason for s in skipped}
    assert reasons[".hidden"] == reasons[".x.png"] == "hidden"
    assert reasons["scan.tif"].startswith("not a JPEG/PNG/WebP/BMP")
    assert reasons["anim.gif"].startswith("not a JPEG/PNG/WebP/BMP")
    assert reasons["pipe.jpg"].startswith("not a regular file")
    assert reasons["broken.png"] == "broken link"
    assert reasons["loop"].startswith("folder already searched")


def test_support_and_test_walkers_agree(tmp_path):
    a = _tree(tmp_path / "t")
    for root in (tmp_path / "sup", tmp_path / "tst"):
        root.mkdir()
        os.symlink(a, root / "cls")  # a symlinked class folder
        make_image(root / ".hiddencls" / "z.png", (9, 9, 9))  # a hidden class folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths, labels, classes = scan_support(tmp_path / "sup")
        test = scan_test(tmp_path / "tst")
    assert classes == ["cls"]
    assert [os.path.basename(p) for p in paths] == [os.path.basename(p) for p in test.paths]
    assert test.labels == ["cls"] * 3 or test.layout != "class folders"
    msgs = [str(w.message) for w in caught if issubclass(w.category, SkippedFilesWarning)]
    assert len(msgs) == 2
    for m in msgs:
        assert "scan.tif" in m and "pipe.jpg" in m and "hidden" in m


def test_unreadable_folder_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    make_image(tmp_path / "r" / "ok.png", (1, 2, 3))
    locked = tmp_path / "r" / "locked"
    make_image(locked / "x.png", (1, 2, 3))
    locked.chmod(0)
    try:
        with pytest.warns(SkippedFilesWarning, match="locked .cannot read folder"):
            assert len(list_images(tmp_path / "r")) == 1
    finally:
        locked.chmod(0o755)


def test_folder_errors_name_the_culprit(tmp_path):
    f = tmp_path / "file.png"
    make_image(f, (1, 2, 3))
    with pytest.raises(DataError, match="is not a folder"):
        list_images(f)
    with pytest.raises(DataError, match="image folder not found"):
        scan_class_folders(tmp_path / "nope")
    with pytest.raises(DataError, match="test folder is not a folder"):
        scan_test(f)
    make_image(tmp_path / "s" / "loose.png", (1, 2, 3))
    make_image(tmp_path / "s" / "c" / "x.png", (1, 2, 3))
    with pytest.raises(DataError, match="lie directly in it"):
        scan_support(tmp_path / "s")


def test_no_warning_when_nothing_is_skipped(tmp_path):
    make_image(tmp_path / "c" / "x.png", (1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(scan_class_folders(tmp_path)[0]) == 1
        assert len(list_images(tmp_path)) == 1


def test_non_utf8_file_name_is_named_before_any_work(tmp_path):
    root = tmp_path / "t"
    make_image(root / "ok.png", (1, 2, 3))
    bad = os.fsencode(str(root)) + b"/caf\xe9.png"
    with open(bad, "wb") as fh:
        fh.write((root / "ok.png").read_bytes())
    with pytest.raises(DataError, match=r"not valid UTF-8: .*caf\\udce9.png"):
        scan_test(root)

"""Data loading: list files, class folders, image decoding; every error names the file (and line)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import DATA_ROOT, make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from resend_novelty.data import (
    DataError,
    ImageDataset,
    ImageRecord,
    list_images,
    load_image,
    read_list_file,
    resolve_list_path,
    scan_class_folders,
)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- list files
def test_read_list_file_parses_paths_labels_and_sources(tmp_path):
    for rel in ("a/x.png", "b/y z.png"):  # a path with a space: the label is the last token
        make_image(tmp_path / rel, (10, 20, 30))
    lst = _write(tmp_path / "l.txt", "# comment\n\na/x.png 0\n  b/y z.png   3  \n")
    recs = read_list_file(lst, tmp_path)
    assert recs == [
        ImageRecord(str(tmp_path / "a/x.png"), 0, f"{lst}:3"),
        ImageRecord(str(tmp_path / "b/y z.png"), 3, f"{lst}:4"),
    ]
    # without a root the paths are kept as written
    assert [r.path for r in read_list_file(lst, check_exists=False)] == ["a/x.png", "b/y z.png"]


@pytest.mark.parametrize(
    "line,match",
    [
        ("lonelytoken", r"expected '<path> <label>'"),
        ("img.png 1.5", r"label '1.5' is not an integer"),
        ("img.png abc", r"label 'abc' is not an integer"),
        ("img.png -1", r"label -1 is negative"),
        ("img.png 1_0", r"label '1_0' is not an integer"),  # int() would accept these two
        ("img.png \u0663", r"is not an integer"),
        ("img.png 0x1", r"label '0x1' is not an integer"),
    ],
)
def test_bad_list_lines_name_file_and_line(tmp_path, line, match):
    make_image(tmp_path / "img.png", (0, 0, 0))
    lst = _write(tmp_path / "bad.txt", f"img.png 0\n# ok\n{line}\nimg.png 1\n")
    with pytest.raises(DataError, match=match) as exc:
        read_list_file(lst, tmp_path)
    assert f"{lst}:3:" in str(exc.value)


def test_non_utf8_line_and_bom(tmp_path):
    make_image(tmp_path / "img.png", (0, 0, 0))
    lst = tmp_path / "bin.txt"
    lst.write_bytes(b"img.png 0\nimg\xff\xfe.png 1\n")
    with pytest.raises(DataError, match=f"{re.escape(str(lst))}:2: not UTF-8"):
        read_list_file(lst, tmp_path)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffimg.png 3\r\nimg.png 4\r\n".encode())  # BOM, Windows line ends
    assert [(r.path, r.label) for r in read_list_file(bom, tmp_path)] == [
        (str(tmp_path / "img.png"), 3), (str(tmp_path / "img.png"), 4)]


def test_missing_images_are_all_listed_with_lines(tmp_path):
    make_image(tmp_path / "ok.png", (0, 0, 0))
    lst = _write(tmp_path / "l.txt", "ok.png 0\ngone1.png 0\nok.png 1\ngone2.png 1\n")
    with pytest.raises(DataError) as exc:
        read_list_file(lst, tmp_path)
    msg = str(exc.value)
    assert "2 image(s)" in msg and f"{lst}:2" in msg and f"{lst}:4" in msg
    assert "gone1.png" in msg and "gone2.png" in msg
    # check_exists=False defers the check
    assert len(read_list_file(lst, tmp_path, check_exists=False)) == 4


def test_many_missing_images_are_summarised(tmp_path):
    lst = _write(tmp_path / "l.txt", "".join(f"gone{i}.png 0\n" for i in range(15)))
    with pytest.raises(DataError, match=r"(?s)15 image\(s\).*and 5 more"):
        read_list_file(lst, tmp_path)


def test_missing_and_empty_list_files(tmp_path):
    with pytest.raises(DataError, match="list file not found: .*nope.txt"):
        read_list_file(tmp_path / "nope.txt", tmp_path)
    empty = _write(tmp_path / "empty.txt", "# only a comment\n\n")
    with pytest.raises(DataError, match=f"{re.escape(str(empty))} holds no images"):
        read_list_file(empty, tmp_path)


_token = st.text(
    alphabet=st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-./"),
    min_size=1, max_size=12,
).filter(lambda t: not t.startswith("#"))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    entries=st.lists(
        st.tuples(st.lists(_token, min_size=1, max_size=3).map(" ".join),
                  st.integers(0, 10**6), st.sampled_from([" ", "\t", "   "])),
        min_size=1, max_size=20,
    )
)
def test_list_parser_roundtrip_property(tmp_path, entries):
    """Any '<path> <label>' lines (paths may hold spaces) parse back to the same records."""
    lst = tmp_path / "prop.txt"
    lst.write_text("".join(f"{p}{sep}{label}\n" for p, label, sep in entries))
    recs = read_list_file(lst, check_exists=False)
    assert [(r.path, r.label) for r in recs] == [(p, label) for p, label, _ in entries]
    assert [r.source for r in recs] == [f"{lst}:{i}" for i in range(1, len(entries) + 1)]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    good=st.integers(0, 5),
    bad_label=st.one_of(
        st.integers(-10**6, -1).map(str),
        st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: f != int(f) if np.isfinite(f) else True).map(repr),
        st.text(alphabet="abcxyz!?%", min_size=1, max_size=5),
    ),
)
def test_list_parser_rejects_bad_labels_property(tmp_path, good, bad_label):
    """A bad label anywhere is reported with its exact line number."""
    lst = tmp_path / "prop_bad.txt"
    lst.write_text("".join(f"p{i}.png {i}\n" for i in range(good)) + f"q.png {bad_label}\n")
    with pytest.raises(DataError) as exc:
        read_list_file(lst, check_exists=False)
    assert f"{lst}:{good + 1}:" in str(exc.value)


def test_resolve_list_path_maps_official_prefix(tmp_path):
    make_image(tmp_path / "pacs/photo/dog/a.jpg", (1, 2, 3), fmt="JPEG")
    assert resolve_list_path(tmp_path, "PACS/kfold/photo/dog/a.jpg") == str(tmp_path / "pacs/photo/dog/a.jpg")
    # the literal path wins when it exists (a root laid out like the official repository)
    make_image(tmp_path / "PACS/kfold/photo/dog/a.jpg", (1, 2, 3), fmt="JPEG")
    assert resolve_list_path(tmp_path, "PACS/kfold/photo/dog/a.jpg") == str(tmp_path / "PACS/kfold/photo/dog/a.jpg")
    # other prefixes are left alone
    assert resolve_list_path(tmp_path, "office/x.jpg") == str(tmp_path / "office/x.jpg")


def test_list_with_official_prefix_reads_under_alias(tmp_path):
    make_image(tmp_path / "pacs/sketch/horse/1.png", (1, 2, 3))
    lst = _write(tmp_path / "Sketch.txt", "PACS/kfold/sketch/horse/1.png 4\n")
    (rec,) = read_list_file(lst, tmp_path)
    assert rec.path == str(tmp_path / "pacs/sketch/horse/1.png") and rec.label == 4


@pytest.mark.skipif(not (DATA_ROOT / "pacs_lists").is_dir(), reason="shared PACS data absent")
def test_real_pacs_lists_resolve():
    recs = read_list_file(DATA_ROOT / "pacs_lists/PACS_DG/Photo.txt", DATA_ROOT)
    assert len(recs) > 1000 and recs[0].path.startswith(str(DATA_ROOT / "pacs" / "photo"))
    kfold = read_list_file(DATA_ROOT / "pacs_lists/kfold/photo_test_kfold.txt", DATA_ROOT / "pacs")
    assert {r.label for r in kfold} <= set(range(1, 8))


# --------------------------------------------------------------------------- class folders
def test_scan_class_folders_labels_sorted_and_filters(class_folders):
    root = class_folders / "support"
    (root / "red" / ".hidden.png").write_bytes(b"x")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".git").mkdir()
    make_image(root / "green" / "nested" / "deep.png", (0, 200, 0))
    recs, classes = scan_class_folders(root)
    assert classes == ["blue", "green", "red"]
    by = {c: sorted(os.path.basename(r.path) for r in recs if r.label == i) for i, c in enumerate(classes)}
    assert by["red"] == ["0.png", "1.png", "2.png", "3.png"]
    assert "deep.png" in by["green"] and len(by["green"]) == 5
    flat, _ = scan_class_folders(root, recursive=False)
    assert len(flat) == 12
    # explicit class order; extra folders are appended after the requested ones
    recs2, classes2 = scan_class_folders(root, class_names=["red", "green"])
    assert classes2 == ["red", "green", "blue"]
    assert {r.label for r in recs2 if "/red/" in r.path} == {0}


def test_empty_support_class_is_named(class_folders):
    (class_folders / "support" / "purple").mkdir()
    (class_folders / "support" / "purple" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"class folder .*purple holds no image"):
        scan_class_folders(class_folders / "support")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        scan_class_folders(tmp_path / "nope")
    make_image(tmp_path / "flat" / "a.png", (0, 0, 0))
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_class_folders(tmp_path / "flat")
    assert list_images(tmp_path / "flat") == [str(tmp_path / "flat" / "a.png")]
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        list_images(tmp_path / "none")
    with pytest.raises(DataError, match="image folder not found"):
        list_images(tmp_path / "missing")


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize(
    "name,mode,fmt",
    [
        ("g.png", "L", "PNG"),
        ("rgba.png", "RGBA", "PNG"),
        ("pal.png", "P", "PNG"),
        ("w.webp", "RGB", "WEBP"),
        ("b.bmp", "RGB", "BMP"),
        ("j.jpg", "RGB", "JPEG"),
        ("la.png", "LA", "PNG"),
        ("i16.png", "I;16", "PNG"),
        ("cmyk.jpg", "CMYK", "JPEG"),
    ],
)
def test_load_image_modes_and_formats(tmp_path, name, mode, fmt):
    p = make_image(tmp_path / name, (200, 40, 40), mode=mode, fmt=fmt)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (40, 32)
    arr = np.asarray(img)
    assert arr.shape == (32, 40, 3) and arr.std() > 0


def test_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255  # red, fully transparent on the left half
    arr[:, 4:, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_image(tmp_path / "t.png"))
    assert (out[:, :4] == 255).all()  # white background
    assert (out[:, 4:] == [255, 0, 0]).all()
    pal = Image.fromarray(arr, "RGBA").convert("P")  # palette with a transparency entry
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=pal.getpixel((0, 0)))
    assert np.asarray(load_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 255, 255]


def test_bad_image_files_are_named(tmp_path):
    good = make_image(tmp_path / "good.png", (1, 2, 3), size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    jpg = make_image(tmp_path / "good.jpg", (1, 2, 3), size=(64, 64), fmt="JPEG").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "zero.png").write_bytes(b"")
    for name, match in [
        ("trunc.png", "cannot decode image"),
        ("trunc.jpg", "cannot decode image"),
        ("text.jpg", "cannot decode image"),
        ("zero.png", r"empty \(0 bytes\)"),
        ("missing.png", "cannot read image"),
    ]:
        with pytest.raises(DataError, match=match) as exc:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(exc.value), name


def test_image_dataset(tmp_path, class_folders):
    ds = ImageDataset.from_folder(class_folders / "support", transform=lambda im: im.size)
    assert len(ds) == 12 and ds[0] == ((40, 32), 0)
    assert ds.labels == sorted(ds.labels) and len(ds.paths) == 12
    lst = _write(tmp_path / "l.txt", "support/red/0.png 5\nsupport/blue/1.png 2\n")
    ds2 = ImageDataset.from_list(lst, class_folders)
    assert ds2.labels == [5, 2]
    img, label = ds2[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 2

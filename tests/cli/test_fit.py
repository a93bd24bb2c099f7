"""`resend fit`, `resend score --detector` (same scores.csv as --support) and `--watch`."""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time

import pytest
import torch
from conftest import COLORS, make_image

from resend_novelty.cli import main
from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint


def _cli(capsys, *argv):
    rc = main([*map(str, argv), "--quiet", "--workers", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _checkpoint(path):
    torch.manual_seed(1)
    save_checkpoint(RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                                      backbone="tiny_test_cnn")), path)
    return path


@pytest.mark.parametrize("method", ["cosine-centered", "resend"])
def test_fit_then_score_detector_equals_score_support(method, class_folders, tiny_registered,
                                                      tmp_path, capsys):
    opts = ["--method", method]
    opts += (["--model", _checkpoint(tmp_path / "ck.safetensors")] if method == "resend"
             else ["--backbone", "tiny_test_cnn"])
    sup, test = class_folders / "support", class_folders / "test"
    rc, out, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out",
                        tmp_path / "a", "--tpr", "0.9", "--no-plots", *opts)
    assert rc == 0, err
    det = tmp_path / "d.safetensors"
    rc, out, err = _cli(capsys, "fit", "--support", sup, "--out", det, "--tpr", "0.9", *opts)
    assert rc == 0, err
    assert "wrote" in out and det.is_file()
    extra = ["--model", tmp_path / "ck.safetensors"] if method == "resend" else []
    rc, out, err = _cli(capsys, "score", "--detector", det, "--test", test, "--out",
                        tmp_path / "b", "--no-plots", *extra)
    assert rc == 0, err
    a, b = _rows(tmp_path / "a" / "scores.csv"), _rows(tmp_path / "b" / "scores.csv")
    assert len(a) == len(b) == 12 and list(a[0]) == list(b[0])
    for ra, rb in zip(a, b):
        for key in ra:
            if key == "normality" or key.startswith("sim_"):
                assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-6)
            else:
                assert ra[key] == rb[key]
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["threshold"] == sb["threshold"] and sa["metrics"] == sb["metrics"]


def test_fit_refusals_exit_2(class_folders, tiny_registered, tmp_path, capsys):
    sup = class_folders / "support"
    det = tmp_path / "d.safetensors"
    base = ["fit", "--support", sup, "--method", "cosine", "--backbone", "tiny_test_cnn"]
    assert _cli(capsys, *base, "--out", det)[0] == 0
    rc, out, err = _cli(capsys, *base, "--out", det)
    assert rc == 2 and "exists: pass --overwrite" in err and "Traceback" not in err
    assert _cli(capsys, *base, "--out", det, "--overwrite")[0] == 0
    rc, out, err = _cli(capsys, "fit", "--support", sup, "--method", "gram", "--out",
                        tmp_path / "g.safetensors")
    assert rc == 2 and "'gram' cannot be saved" in err
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a detector")
    rc, out, err = _cli(capsys, "score", "--detector", bad, "--test", class_folders / "test")
    assert rc == 2 and "not a safetensors detector file" in err
    rc, out, err = _cli(capsys, "score", "--support", sup, "--watch", class_folders / "test")
    assert rc == 2 and "--watch needs --detector" in err


def _fit(capsys, class_folders, tmp_path):
    det = tmp_path / "d.safetensors"
    rc, _, err = _cli(capsys, "fit", "--support", class_folders / "support", "--out", det,
                      "--method", "cosine", "--backbone", "tiny_test_cnn", "--tpr", "0.9")
    assert rc == 0, err
    return det


def test_watch_scores_files_as_they_arrive_and_resumes(class_folders, tiny_registered,
                                                       tmp_path, capsys):
    det = _fit(capsys, class_folders, tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_image(inbox / "first.png", COLORS["red"])
    sources = sorted((class_folders / "test").rglob("*.png"))[:3]

    def drop():  # files arrive while the watcher runs (written elsewhere, then moved in)
        for i, src in enumerate(sources):
            time.sleep(0.3)
            shutil.copy(src, tmp_path / f"tmp{i}.png")
            (tmp_path / f"tmp{i}.png").rename(inbox / f"new{i}.png")

    t = threading.Thread(target=drop)
    t.start()
    rc, out, err = _cli(capsys, "score", "--detector", det, "--watch", inbox, "--out",
                        tmp_path / "w", "--poll", "0.1", "--max-images", "4", "--timeout", "60")
    t.join()
    assert rc == 0, err
    assert "4 images scored" in out
    rows = _rows(tmp_path / "w" / "scores.csv")
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == [
        "first.png", "new0.png", "new1.png", "new2.png"]
    assert list(rows[0])[:5] == ["path", "normality", "p_known", "nearest_class", "sim_blue"]
    first = next(r for r in rows if r["path"].endswith("first.png"))
    assert first["nearest_class"] == "red"
    # restart: nothing new is scored twice; a new file is appended
    make_image(inbox / "later.png", COLORS["blue"])
    rc, out, err = _cli(capsys, "score", "--detector", det, "--watch", inbox, "--out",
                        tmp_path / "w", "--poll", "0.1", "--max-images", "1", "--timeout", "30")
    assert rc == 0, err
    assert "1 images scored" in out and "4 already in" in out
    rows = _rows(tmp_path / "w" / "scores.csv")
    assert len(rows) == 5 and len({r["path"] for r in rows}) == 5


def test_watch_reads_paths_from_stdin_and_ctrl_c_keeps_the_csv(class_folders, tiny_registered,
                                                               tmp_path, capsys, monkeypatch):
    det = _fit(capsys, class_folders, tmp_path)
    paths = sorted(str(p) for p in (class_folders / "test").rglob("*.png"))[:3]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(paths) + "\n"))
    rc, out, err = _cli(capsys, "score", "--detector", det, "--watch", "-", "--out",
                        tmp_path / "s")
    assert rc == 0, err
    assert [r["path"] for r in _rows(tmp_path / "s" / "scores.csv")] == paths

    class Interrupting(io.StringIO):
        def readline(self, *a):
            line = super().readline(*a)
            if not line:
                raise KeyboardInterrupt
            return line

    more = sorted(str(p) for p in (class_folders / "test").rglob("*.png"))[3:5]
    monkeypatch.setattr("sys.stdin", Interrupting("\n".join(paths + more) + "\n"))
    rc, out, err = _cli(capsys, "score", "--detector", det, "--watch", "-", "--out",
                        tmp_path / "s")
    assert rc == 0 and "(interrupted)" in out and "Traceback" not in err
    rows = _rows(tmp_path / "s" / "scores.csv")
    assert [r["path"] for r in rows] == paths + more


def test_threshold_from_test(class_folders, tiny_registered, tmp_path, capsys):
    for c in ("red", "green", "blue"):  # 20+ test images: the mixture needs a sample
        for i in range(6):
            make_image(class_folders / "test" / c / f"extra{i}.png", COLORS[c], noise_seed=100 + i)
    rc, out, err = _cli(capsys, "score", "--support", class_folders / "support", "--test",
                        class_folders / "test", "--method", "cosine", "--backbone",
                        "tiny_test_cnn", "--out", tmp_path / "o", "--threshold-from", "test",
                        "--no-plots")
    assert rc == 0, err
    rule = json.loads((tmp_path / "o" / "summary.json").read_text())["threshold_rule"]
    assert rule["source"].startswith("test scores") and rule["n_images"] == 30
    assert rule["tpr"] == 0.95
    rc, out, err = _cli(capsys, "score", "--support", class_folders / "support", "--test",
                        class_folders / "test", "--threshold", "0.5", "--threshold-from", "test")
    assert rc == 2 and "exclude each other" in err


def test_per_image_applies_to_a_detector_file(class_folders, tiny_registered, tmp_path, capsys):
    """`score --detector F --per-image` gives the scores of `score --support DIR --per-image`."""
    opts = ["--method", "cosine-standardized", "--backbone", "tiny_test_cnn"]
    sup, test = class_folders / "support", class_folders / "test"
    for i in range(8):  # 20 test images: enough for the transductive statistics of the batch
        make_image(test / "yellow" / f"more{i}.png", COLORS["yellow"], noise_seed=50 + i)
    rc, _, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out", tmp_path / "a",
                      "--tpr", "0.9", "--no-plots", "--per-image", *opts)
    assert rc == 0, err
    det = tmp_path / "d.safetensors"
    assert _cli(capsys, "fit", "--support", sup, "--out", det, "--tpr", "0.9", *opts)[0] == 0
    for out, extra in (("b", ["--per-image"]), ("c", [])):
        rc, _, err = _cli(capsys, "score", "--detector", det, "--test", test, "--out",
                          tmp_path / out, "--no-plots", *extra)
        assert rc == 0, err
    a, b, c = (_rows(tmp_path / o / "scores.csv") for o in "abc")
    assert [float(r["normality"]) for r in a] == pytest.approx(
        [float(r["normality"]) for r in b], abs=1e-6)
    # transductive (the default) uses the statistics of the test images scored together
    assert [float(r["normality"]) for r in c] != pytest.approx(
        [float(r["normality"]) for r in a], abs=1e-6)


def test_raw_weight_reaches_scores_csv_and_detector_files(class_folders, tiny_registered,
                                                           tmp_path, capsys):
    """`--per-image --raw-weight W`: the same scores from the folders and from a detector file
    fitted with it; the summary says so; W = 0 gives other scores."""
    opts = ["--method", "cosine-standardized", "--backbone", "tiny_test_cnn"]
    sup, test = class_folders / "support", class_folders / "test"
    runs = {}
    for name, w in (("mix", "0.5"), ("off", "0")):
        rc, out, err = _cli(capsys, "score", "--support", sup, "--test", test, "--out",
                            tmp_path / name, "--tpr", "0.9", "--no-plots", "--per-image",
                            "--raw-weight", w, *opts)
        assert rc == 0, err
        runs[name] = [float(r["normality"]) for r in _rows(tmp_path / name / "scores.csv")]
        assert ("raw weight 0.5" in out) == (name == "mix"), out
    assert runs["mix"] != pytest.approx(runs["off"], abs=1e-6)
    det = tmp_path / "d.safetensors"
    rc, _, err = _cli(capsys, "fit", "--support", sup, "--out", det, "--tpr", "0.9",
                      "--raw-weight", "0.5", *opts)
    assert rc == 0, err
    rc, out, err = _cli(capsys, "score", "--detector", det, "--test", test, "--out",
                        tmp_path / "file", "--no-plots", "--per-image")
    assert rc == 0 and "raw weight 0.5" in out, err
    got = [float(r["normality"]) for r in _rows(tmp_path / "file" / "scores.csv")]
    assert got == pytest.approx(runs["mix"], abs=1e-6)

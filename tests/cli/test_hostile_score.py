"""``resend score`` against careless and hostile input: nothing lost, no silent wrong answer."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import make_image

from resend_novelty.cli import main
from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint


def _score(capsys, *argv):
    rc = main(["score", *map(str, argv), "--quiet", "--workers", "0"])
    out, err = capsys.readouterr()
    return rc, out, err


def _cosine_args(root, out):
    return ["--support", root / "support", "--test", root / "test", "--method", "cosine",
            "--backbone", "tiny_test_cnn", "--out", out, "--no-plots"]


def test_out_inside_the_support_or_test_folder_is_refused(class_folders, tiny_registered, capsys):
    for inside in (class_folders / "support" / "plots", class_folders / "test" / "red" / "o"):
        rc, out, err = _score(capsys, *_cosine_args(class_folders, inside))
        assert rc == 2 and "lies inside the input folder" in err and str(inside) in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not inside.exists()  # checked before any work


def test_existing_results_need_overwrite_and_stale_plots_go(class_folders, tiny_registered, capsys):
    out_dir = class_folders / "out"
    args = _cosine_args(class_folders, out_dir)[:-1]  # with plots
    assert _score(capsys, *args)[0] == 0
    assert (out_dir / "roc.png").is_file()
    before = (out_dir / "scores.csv").read_bytes()
    rc, _, err = _score(capsys, *args, "--no-plots")
    assert rc == 2 and "already holds files" in err and "--overwrite" in err
    assert (out_dir / "scores.csv").read_bytes() == before  # untouched
    (out_dir / "mine.txt").write_text("keep me")
    rc, _, err = _score(capsys, *args, "--no-plots", "--overwrite")
    assert rc == 0, err
    assert not (out_dir / "roc.png").exists()  # no stale plot of the earlier run
    assert (out_dir / "mine.txt").read_text() == "keep me"  # not ours: never deleted


def test_out_that_is_a_file_or_read_only_fails_before_work(class_folders, tiny_registered, capsys):
    f = class_folders / "afile"
    f.write_text("x")
    rc, _, err = _score(capsys, *_cosine_args(class_folders, f))
    assert rc == 2 and "is a file, not a folder" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_refused(class_folders, tiny_registered, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["score", *map(str, _cosine_args(class_folders, class_folders / "o")),
              f"--threshold={value}"])
    assert exc.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_test_folder_inside_support_folder_refused(class_folders, tiny_registered, capsys):
    args = _cosine_args(class_folders, class_folders / "o")
    args[3] = class_folders / "support" / "red"
    rc, _, err = _score(capsys, *args)
    assert rc == 2 and "lies inside the support folder" in err


def test_nan_model_is_an_error_not_nothing_flagged(class_folders, tiny_registered, capsys):
    torch.manual_seed(0)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                              backbone="tiny_test_cnn"))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    ckpt = class_folders / "nan.safetensors"
    save_checkpoint(model, ckpt)
    flat = class_folders / "flat"  # unlabelled test images
    for i in range(3):
        make_image(flat / f"{i}.png", (10 * i, 50, 90), noise_seed=i)
    out_dir = class_folders / "o"
    rc, _, err = _score(capsys, "--support", class_folders / "support", "--test", flat,
                        "--model", ckpt, "--backbone", "tiny_test_cnn", "--out", out_dir,
                        "--threshold", "0.5", "--no-plots")
    assert rc == 2 and "non-finite score" in err, err
    assert not (out_dir / "summary.json").exists()


def test_spreadsheet_formulas_and_terminal_escapes_are_neutralised(tmp_path, tiny_registered,
                                                                    capsys):
    names = ["=1+2", "@SUM(A1)", "blue\x1b[31m"]
    for j, c in enumerate(names):
        for i in range(3):
            make_image(tmp_path / "support" / c / f"{i}.png", (80 * j, 40, 200 - 60 * j),
                       noise_seed=10 * j + i)
    make_image(tmp_path / "test" / "=cmd|' /C calc'!A0.png", (0, 40, 200))
    make_image(tmp_path / "test" / "-2+3.png", (160, 40, 80))
    out_dir = tmp_path / "out"
    rc, out, err = _score(capsys, "--support", tmp_path / "support", "--test", tmp_path / "test",
                          "--method", "cosine", "--backbone", "tiny_test_cnn", "--out", out_dir,
                          "--no-plots", "--tpr", "0.9")
    assert rc == 0, err
    assert "\x1b" not in out + err and "\\x1b" in out
    with open(out_dir / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    for cell in header + [c for r in body for c in (r[0], r[2], r[-1])]:
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert "'=1+2" in {r[2] for r in body} | {r[-1] for r in body} or "sim_=1+2" in header
    json.loads((out_dir / "summary.json").read_text())


def test_unsupported_and_special_files_are_reported_not_silently_dropped(class_folders,
                                                                         tiny_registered, capsys):
    import os

    test = class_folders / "test"
    (test / "red" / "scan.tif").write_bytes(b"II*\x00")
    os.mkfifo(test / "red" / "pipe.png")
    rc, _, err = _score(capsys, *_cosine_args(class_folders, class_folders / "o"))
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "skipped" in line]
    assert len(warning) == 1
    assert "scan.tif (not a JPEG/PNG/WebP/BMP" in warning[0]
    assert "pipe.png (not a regular file" in warning[0]


def test_api_refuses_label_minus_one_empty_support_and_bad_paths(tiny_backbone, tmp_path):
    from resend_novelty.data import DataError
    from resend_novelty.detectors import CosineDetector

    det = CosineDetector(backbone=tiny_backbone, num_workers=0, progress=False)
    feats = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"labels must be >= 0, got -1 \(-1 is UNKNOWN"):
        det.fit_features(feats, [0, 1, -1, 1])
    with pytest.raises(ValueError, match="the support set is empty"):
        det.fit_features(torch.zeros(0, 16), [])
    with pytest.raises(DataError, match="image folder not found"):
        det.fit(str(tmp_path / "bad"))


def test_check_output_rules(tmp_path):
    from resend_novelty.cli.common import check_output

    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="--json .* is a folder, not a file"):
        check_output(tmp_path, flag="--json")
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(ValueError, match="exists: pass --overwrite"):
        check_output(tmp_path / "r.json", flag="--json")
    check_output(tmp_path / "r.json", flag="--json", overwrite=True)
    assert (tmp_path / "r.json").read_text() == "{}"  # a check deletes no file
    with pytest.raises(ValueError, match="cannot be written"):
        check_output(tmp_path / "r.json" / "x.json", flag="--json")  # parent is a file
    with pytest.raises(ValueError, match="lies inside the input folder"):
        check_output(tmp_path / "in" / "o", inside=(tmp_path / "in",), folder=True)


@pytest.mark.parametrize("command", ["eval", "benchmark", "osdg", "score", "features", "pretrain"])
def test_commands_writing_files_offer_overwrite(command):
    import argparse

    from resend_novelty.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert "--overwrite" in {o for a in sub.choices[command]._actions for o in a.option_strings}


def test_bad_cache_dir_is_one_line_exit_2(class_folders, tiny_registered, capsys):
    f = class_folders / "cachefile"
    f.write_text("not a folder")
    rc, _, err = _score(capsys, *_cosine_args(class_folders, class_folders / "o"),
                        "--cache-dir", f)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(f) in err or "cache" in err


def test_corrupt_cache_database_is_one_line_exit_2(class_folders, tiny_registered, capsys):
    d = class_folders / "badcache"
    d.mkdir()
    (d / "features.sqlite").write_bytes(b"garbage, not SQLite" * 100)
    rc, _, err = _score(capsys, *_cosine_args(class_folders, class_folders / "o"),
                        "--cache-dir", d)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

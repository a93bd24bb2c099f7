"""``resend pretrain`` / ``features`` / detector options against careless input: one-line errors
(exit 2), small-data defaults, SIGTERM exit status, the documented export -> pretrain route."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_image
from safetensors.torch import load_file

from resend_novelty.cli import main


@pytest.fixture
def synth(tmp_path, reference_features):
    return reference_features(tmp_path / "synth.safetensors")


_FAST = ["--steps", "2", "--batch-pairs", "16", "--warmup", "1", "--optimizer", "adamw",
         "--lr", "0.002", "--val-every", "0", "--checkpoint-every", "1", "--workers", "0",
         "--dim", "16", "--heads", "2", "--depth", "1", "--quiet"]


def _pretrain(capsys, *argv):
    rc = main(["pretrain", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("opt,value,match", [
    ("--lr", "nan", "lr must be a finite number"),
    ("--micro-batch", "-4", "micro_batch must be an integer >= 0"),
    ("--max-per-class", "-1", "max_per_class must be an integer >= 0"),
    ("--checkpoint-every", "0", "checkpoint_every must be an integer >= 1"),
    ("--dropout", "1.5", "dropout must be a number in"),
])
def test_bad_pretrain_options_exit_2_in_one_line(synth, tmp_path, capsys, opt, value, match):
    rc, _, err = _pretrain(capsys, "--data", synth, "--out", tmp_path / "r", *_FAST,
                           f"{opt}={value}")
    assert rc == 2 and match in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_pretrain_out_holding_a_run_needs_resume_or_overwrite(synth, tmp_path, capsys):
    out = tmp_path / "run"
    assert _pretrain(capsys, "--data", synth, "--out", out, *_FAST)[0] == 0
    before = (out / "final.safetensors").read_bytes()
    rc, _, err = _pretrain(capsys, "--data", synth, "--out", out, *_FAST, "--seed", "3")
    assert rc == 2 and "holds a run" in err and "--overwrite" in err
    assert (out / "final.safetensors").read_bytes() == before
    rc, _, err = _pretrain(capsys, "--data", synth, "--out", out, *_FAST, "--seed", "3",
                           "--overwrite")
    assert rc == 0, err


def test_six_class_folder_pretrains_with_default_validation(tmp_path, tiny_registered, capsys):
    for c in range(6):
        for i in range(4):
            make_image(tmp_path / "ref" / f"c{c}" / f"{i}.png", (40 * c, 200 - 30 * c, 90),
                       noise_seed=10 * c + i)
    fast = [a for a in _FAST if a != "--val-every"]
    fast.remove("0")  # keep validation on (its default period) with the default val classes
    rc, out, err = _pretrain(capsys, "--data", tmp_path / "ref", "--out", tmp_path / "run",
                             "--frozen-backbone", "--backbone", "tiny_test_cnn", *fast)
    assert rc == 0, err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["val_classes"] == 2


def test_features_export_writes_labels_and_pretrain_reads_them(tmp_path, tiny_registered, capsys):
    for c in range(4):
        for i in range(3):
            make_image(tmp_path / "ref" / f"k{c}" / f"{i}.png", (60 * c, 90, 200 - 50 * c),
                       noise_seed=c * 7 + i)
    export = tmp_path / "f.safetensors"
    rc = main(["features", str(tmp_path / "ref"), "--backbone", "tiny_test_cnn",
               "--export", str(export), "--quiet", "--workers", "0"])
    assert rc == 0, capsys.readouterr().err
    t = load_file(str(export))
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    rc, _, err = _pretrain(capsys, "--data", export, "--out", tmp_path / "run", *_FAST)
    assert rc == 0, err
    # the export is not overwritten silently, and a folder is not a file
    rc = main(["features", str(tmp_path / "ref"), "--backbone", "tiny_test_cnn",
               "--export", str(export), "--quiet"])
    assert rc == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    rc = main(["features", str(tmp_path / "ref"), "--backbone", "tiny_test_cnn",
               "--export", str(tmp_path), "--quiet"])
    assert rc == 2 and "is a folder, not a file" in capsys.readouterr().err


def test_features_of_a_missing_path_says_not_found(tmp_path, capsys):
    rc = main(["features", str(tmp_path / "nonexistent")])
    err = capsys.readouterr().err
    assert rc == 2 and "DATA not found" in err and "list file" in err


@pytest.mark.parametrize("extra,match", [
    (["--method", "ft-msp", "--ft-budget", "nan"], "--ft-budget must be a finite"),
    (["--method", "ft-msp", "--ft-budget", "0", "--ft-epochs", "-1"], "--ft-epochs must be >= 1"),
    (["--method", "ft-odin", "--ft-budget", "5", "--odin-temperature", "0"],
     "--odin-temperature must be a finite number > 0"),
])
def test_bad_baseline_options_exit_2(class_folders, tiny_registered, capsys, extra, match):
    rc = main(["score", "--support", str(class_folders / "support"), "--test",
               str(class_folders / "test"), "--backbone", "tiny_test_cnn", "--out",
               str(class_folders / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err


# SIGTERM -> exit 143 after the checkpoint: tests/training/test_train.py
# (test_sigterm_leaves_consistent_checkpoint_and_resume_matches)

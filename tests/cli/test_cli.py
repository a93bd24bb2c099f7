"""CLI: every --help, `resend eval` end to end, error reporting; the real backbone offline."""

from __future__ import annotations

import argparse
import json
import warnings
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, DATA_ROOT, make_image

from resend_novelty.backbones import build_backbone
from resend_novelty.cli import build_parser, main
from resend_novelty.cli.main import COMMANDS
from resend_novelty.features import extract_features
from resend_novelty.models import RelationalConfig, RelationalModule, save_checkpoint


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    with pytest.raises(SystemExit) as exc:
        main([])  # a sub-command is required
    assert exc.value.code == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_help_explains_every_option(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    parser = _subparsers()[name]
    assert parser.description, f"{name} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)
        for opt in action.option_strings:
            assert opt in out, (name, opt)


def test_console_script_help_in_a_subprocess():
    """The installed entry point works (`resend --help`), also as `python -m`."""
    exe = Path(sys.executable).with_name("resend")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "resend_novelty.cli", "--help"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: resend" in r.stdout and "eval" in r.stdout


# --------------------------------------------------------------------------- resend eval
@pytest.fixture
def lists(tmp_path):
    """root/img/<class>/<i>.png with list files: support (3 known classes), test (+ unknown)."""
    root = tmp_path / "data"
    label = {"red": 0, "green": 1, "blue": 2, "yellow": 3}
    sup, test = [], []
    for c in COLORS:
        for i in range(6):
            rel = f"img/{c}/{i}.png"
            make_image(root / rel, COLORS[c], noise_seed=zlib.crc32(rel.encode()))
            if c != "yellow" and i < 3:
                sup.append(f"{rel} {label[c]}\n")
            elif i >= 3 or c == "yellow":
                test.append(f"{rel} {label[c]}\n")
    (tmp_path / "support.txt").write_text("".join(sup))
    (tmp_path / "test.txt").write_text("".join(test))
    (tmp_path / "known_only.txt").write_text("".join(t for t in test if not t.startswith("img/yellow")))
    return tmp_path, root


def _eval_args(tmp, root, test="test.txt", *extra):
    return ["eval", "--root", str(root), "--support", str(tmp / "support.txt"),
            "--test", str(tmp / test), "--workers", "0", "--quiet", "--device", "cpu", *extra]


def test_eval_cosine_end_to_end(lists, tiny_registered, capsys):
    tmp, root = lists
    out = tmp / "res" / "eval.json"
    rc = main(_eval_args(tmp, root, "test.txt", "--method", "cosine", "--backbone", "tiny_test_cnn",
                         "--json", str(out)))
    assert rc == 0
    rep = json.loads(out.read_text())
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "n_known", "n_unknown"):
        assert key in rep, key
    assert rep["n_known"] == 9 and rep["n_unknown"] == 6
    for key in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_accuracy"):
        assert 0.0 <= rep[key] <= 1.0, key
    assert rep["method"] == "cosine"
    printed = capsys.readouterr().out
    assert f"AUROC {rep['auroc']:.4f}" in printed and "known 9, unknown 6" in printed


def test_eval_resend_with_a_checkpoint(lists, tiny_registered, capsys):
    tmp, root = lists
    torch.manual_seed(0)
    save_checkpoint(RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2,
                                                      backbone="tiny_test_cnn")),
                    tmp / "m.safetensors")
    out = tmp / "r.json"
    assert main(_eval_args(tmp, root, "test.txt", "--model", str(tmp / "m.safetensors"),
                           "--json", str(out))) == 0
    rep = json.loads(out.read_text())
    assert rep["method"] == "resend" and rep["n_unknown"] == 6 and 0 <= rep["auroc"] <= 1


def test_eval_with_only_knowns_reports_what_is_defined(lists, tiny_registered, capsys):
    tmp, root = lists
    out = tmp / "k.json"
    rc = main(_eval_args(tmp, root, "known_only.txt", "--method", "cosine",
                         "--backbone", "tiny_test_cnn", "--json", str(out)))
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["auroc"] is None and rep["fpr95"] is None and rep["n_unknown"] == 0
    assert 0.0 <= rep["closed_set_accuracy"] <= 1.0
    assert "undefined" in rep["note"]
    printed = capsys.readouterr().out
    assert "AUROC n/a" in printed and "note:" in printed


@pytest.mark.parametrize(
    "line,match",
    [("img/red/0.png", "expected '<path> <label>'"), ("img/red/0.png -3", "negative"),
     ("img/red/0.png x", "not an integer"), ("img/red/missing.png 0", "image not found")],
)
def test_eval_bad_list_line_exits_2_naming_file_and_line(lists, tiny_registered, capsys, line, match):
    tmp, root = lists
    bad = tmp / "bad.txt"
    bad.write_text("img/red/0.png 0\nimg/red/1.png 0\n" + line + "\n")
    rc = main(["eval", "--root", str(root), "--support", str(bad), "--test", str(tmp / "test.txt"),
               "--method", "cosine", "--backbone", "tiny_test_cnn", "--quiet", "--workers", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and match in err
    assert err.startswith("resend eval: error:")


def test_eval_other_errors_exit_2(lists, tiny_registered, capsys, tmp_path):
    tmp, root = lists
    rc = main(_eval_args(tmp, root, "nope.txt", "--method", "cosine", "--backbone", "tiny_test_cnn"))
    assert rc == 2 and "list file not found" in capsys.readouterr().err
    (tmp / "evil.pt").write_bytes(b"\x80\x04not a safetensors file")
    rc = main(_eval_args(tmp, root, "test.txt", "--model", str(tmp / "evil.pt")))
    assert rc == 2 and "not a safetensors checkpoint" in capsys.readouterr().err
    (root / "img" / "red" / "0.png").write_bytes(b"")  # a zero-byte support image
    rc = main(_eval_args(tmp, root, "test.txt", "--method", "cosine", "--backbone", "tiny_test_cnn",
                         "--no-cache"))
    err = capsys.readouterr().err
    assert rc == 2 and "empty (0 bytes)" in err and str(root / "img" / "red" / "0.png") in err


# --------------------------------------------------------------------------- the real backbone
_PACS = DATA_ROOT / "pacs"


@pytest.mark.skipif(not _PACS.is_dir(), reason="shared PACS data absent")
def test_efficientnet_lite0_offline_features():
    paths = [str(sorted((_PACS / dom / "dog").iterdir())[0]) for dom in ("photo", "sketch", "cartoon")]
    bb = build_backbone("efficientnet_lite0")  # weights from a pip package: offline
    assert bb.feature_dim == 1280 and bb.weights_id.startswith("imagenet-")
    feats = extract_features(bb, paths, cache=False, num_workers=0, progress=False, device="cpu",
                             batch_size=3)
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert feats.std(dim=0).mean() > 1e-3  # images differ
    assert np.isfinite(feats.norm(dim=1).numpy()).all() and (feats.norm(dim=1) > 1).all()


def test_eval_refine_option_reaches_the_detector(lists, tiny_registered, capsys):
    tmp, root = lists
    base = _eval_args(tmp, root, "test.txt", "--method", "cosine", "--backbone", "tiny_test_cnn")
    # 15 test images < min_center_batch: the refining detector says it cannot refine them
    with pytest.warns(UserWarning, match="unrefined support prototypes"):
        assert main(base + ["--refine", "2"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(base) == 0  # without --refine: no such warning
    capsys.readouterr()
    # knn has no class prototypes to refine: a clear error, exit code 2
    assert main(_eval_args(tmp, root, "test.txt", "--method", "knn", "--backbone",
                           "tiny_test_cnn", "--refine", "2")) == 2
    assert "does not support test-time prototype refinement" in capsys.readouterr().err

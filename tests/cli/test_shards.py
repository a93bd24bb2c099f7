"""Sharded extraction: ``resend features --shard i/N`` and torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import make_image
from resend_novelty.backbones import build_backbone
from resend_novelty.cli import build_parser, main
from resend_novelty.cli.features import parse_shard, shard_of
from resend_novelty.features import FeatureCache


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    for i in range(7):
        make_image(d / f"{i:02d}.png", (30 * i, 100, 200 - 20 * i), size=(32, 32), noise_seed=i)
    return d


@pytest.mark.parametrize("n_items, count", [(7, 2), (7, 3), (2, 4), (10, 1)])
def test_shards_cover_the_list_exactly_once(n_items, count):
    items = [f"img{i}" for i in range(n_items)]
    shards = [shard_of(items, i, count) for i in range(count)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard_of(items, i, count) for i in range(count)]  # deterministic


@pytest.mark.parametrize("text, ok", [("0/2", (0, 2)), ("1/2", (1, 2)), ("2/2", None),
                                      ("-1/2", None), ("1", None), ("a/b", None), ("0/0", None)])
def test_parse_shard(text, ok):
    if ok:
        assert parse_shard(text) == ok
    else:
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(text)


def test_engine_flag_on_every_extracting_command():
    parser = build_parser()
    for cmd in (["features", "d"], ["eval", "--root", "r", "--support", "s", "--test", "t"],
                ["benchmark", "pacs-multi"], ["score", "--support", "s", "--test", "t"],
                ["osdg", "pacs-multi"]):
        args = parser.parse_args(cmd + ["--engine", "torch"])
        assert args.engine == "torch", cmd
        assert parser.parse_args(cmd).engine == "auto", cmd


def test_bad_engine_is_a_usage_error(folder, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["features", str(folder), "--engine", "tensorrt"])
    assert exc.value.code == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_two_shards_fill_the_cache_once(folder, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    common = ["--backbone", "efficientnet_lite0", "--cache-dir", str(cache_dir), "--quiet",
              "--engine", "torch"]
    assert main(["features", str(folder), "--shard", "0/2", *common]) == 0
    assert main(["features", str(folder), "--shard", "1/2", *common]) == 0
    out = capsys.readouterr().out
    assert "shard 0/2: 4 of 7 images" in out and "shard 1/2: 3 of 7 images" in out
    ns = build_backbone("efficientnet_lite0").cache_namespace
    assert FeatureCache(cache_dir).count(ns) == 7


def test_shard_with_export_is_refused(folder, tmp_path, capsys):
    rc = main(["features", str(folder), "--shard", "0/2", "--export", str(tmp_path / "f.st")])
    assert rc == 2
    assert "--export needs every shard" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes(folder, tmp_path):
    cache_dir, export = tmp_path / "cache", tmp_path / "feats.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESEND_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "resend_novelty.cli", "features", str(folder), "--backbone", "efficientnet_lite0",
           "--cache-dir", str(cache_dir), "--export", str(export), "--quiet", "--engine", "torch"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shard 1/2: 3 images" in r.stdout and "7 images, features (7, 1280)" in r.stdout
    assert FeatureCache(cache_dir).count(build_backbone("efficientnet_lite0").cache_namespace) == 7
    with safe_open(str(export), "pt") as fh:
        assert tuple(fh.get_tensor("features").shape) == (7, 1280)

"""Pretraining: loss decreases, exact resume, DDP equivalence, interruption safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from resend_novelty.models import load_checkpoint
from resend_novelty.training import PairSampler, TrainConfig, train


@pytest.fixture
def synth(tmp_path, reference_features):
    return reference_features(tmp_path / "synth.safetensors", n_classes=10, per=16, dim=24)


def _cfg(synth, out, **kw):
    base = dict(data=synth, out=str(out), steps=24, batch_pairs=64, lr=2e-3, warmup=4,
                optimizer="adamw", val_classes=4, val_every=8, checkpoint_every=8,
                model={"dim": 16, "heads": 2, "depth": 2})
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_file(str(path))


def test_pair_sampler_labels_and_determinism():
    labels = np.repeat(np.arange(5), 4)
    s = PairSampler(labels, neg_per_pos=3, seed=1)
    p = s.epoch(0)
    assert len(p) == 20 * 4
    same = labels[p.i] == labels[p.j]
    assert np.array_equal(same, p.y == 1)
    assert (p.i != p.j).all()
    assert np.array_equal(p.w[p.y == 1], np.full(20, 3.0))  # balanced: positives weighted
    q = PairSampler(labels, neg_per_pos=3, seed=1).epoch(0)
    assert np.array_equal(p.i, q.i) and np.array_equal(p.j, q.j)
    assert not np.array_equal(p.j, s.epoch(1).j)  # regenerated each epoch


def test_pair_sampler_rejects_singleton_class():
    with pytest.raises(ValueError, match="single item"):
        PairSampler([0, 0, 1], neg_per_pos=1)


def test_loss_decreases_and_outputs(synth, tmp_path):
    summary = train(_cfg(synth, tmp_path / "r", steps=60), progress=False)
    hist = [json.loads(l) for l in open(tmp_path / "r" / "history.jsonl")]
    first = np.mean([h["loss"] for h in hist[:5]])
    last = np.mean([h["loss"] for h in hist[-5:]])
    assert last < first * 0.9
    assert summary["step"] == 60
    for name in ("final.safetensors", "best.safetensors", "latest.json", "summary.json"):
        assert (tmp_path / "r" / name).exists()
    model = load_checkpoint(tmp_path / "r" / "final.safetensors")
    assert model.config.feature_dim == 24
    assert summary["best_val_auroc"] is not None


@pytest.mark.parametrize("optimizer,loss", [("lars", "mse"), ("adamw", "bce")])
def test_exact_resume(synth, tmp_path, optimizer, loss):
    kw = dict(optimizer=optimizer, loss=loss, lr=0.05 if optimizer == "lars" else 2e-3,
              model={"dim": 16, "heads": 2, "depth": 2, "input_dropout": 0.3, "dropout": 0.1})
    train(_cfg(synth, tmp_path / "full", **kw), progress=False)
    part = _cfg(synth, tmp_path / "part", **kw)
    s = train(part, progress=False, stop_after=11)  # stops mid-way, between checkpoints
    assert s["step"] == 11 and not (tmp_path / "part" / "final.safetensors").exists()
    train(part, resume=True, progress=False)
    a = _weights(tmp_path / "full" / "final.safetensors")
    b = _weights(tmp_path / "part" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_config(synth, tmp_path):
    train(_cfg(synth, tmp_path / "r"), progress=False, stop_after=3)
    with pytest.raises(ValueError, match="different configuration"):
        train(_cfg(synth, tmp_path / "r", lr=1.0), resume=True, progress=False)


def _run_cli(args, nproc=None, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "resend_novelty.cli", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "resend_novelty.cli", "pretrain", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_two_processes_match_one(synth, tmp_path):
    common = ["--data", synth, "--steps", "12", "--batch-pairs", "64", "--lr", "0.05",
              "--warmup", "3", "--dim", "16", "--heads", "2", "--depth", "2", "--val-classes", "4",
              "--val-every", "6", "--checkpoint-every", "6", "--quiet", "--micro-batch", "16"]
    r1 = _run_cli([*common, "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _run_cli([*common, "--out", str(tmp_path / "two")], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = _weights(tmp_path / "one" / "final.safetensors")
    b = _weights(tmp_path / "two" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the weights did move from initialisation
    init = torch.nn.init  # noqa: F841
    assert not torch.allclose(a["head.weight"], torch.zeros_like(a["head.weight"]))


def test_sigterm_leaves_consistent_checkpoint_and_resume_matches(synth, tmp_path):
    common = ["--data", synth, "--batch-pairs", "64", "--lr", "2e-3",
              "--optimizer", "adamw", "--warmup", "4", "--dim", "16", "--heads", "2",
              "--depth", "2", "--val-classes", "4", "--val-every", "50",
              "--checkpoint-every", "100000", "--quiet"]
    out = tmp_path / "sig"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "resend_novelty.cli", "pretrain", *common,
                             "--steps", "100000", "--out", str(out)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # run.json appears once the signal handlers are installed and training starts
    while not (out / "run.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (out / "run.json").exists(), "training did not start"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM, after the checkpoint
    latest = json.loads((out / "latest.json").read_text())
    stopped = latest["step"]
    assert 0 < stopped < 100000, "the run should have been stopped part-way"
    assert "interrupted" in err
    assert load_checkpoint(out / "checkpoints" / latest["path"] / "model.safetensors") is not None
    # resume a few steps further and compare with an uninterrupted run of as many steps
    # (the lr schedule is constant after warm-up, so the total does not change the trajectory)
    total = str(stopped + 7)
    r = _run_cli([*common, "--steps", total, "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run_cli([*common, "--steps", total, "--out", str(tmp_path / "ref")])
    assert r.returncode == 0, r.stderr[-2000:]
    a = _weights(out / "final.safetensors")
    b = _weights(tmp_path / "ref" / "final.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_end_to_end_refuses_a_backbone_ensemble(tmp_path):
    with pytest.raises(ValueError, match="end-to-end training needs a single backbone"):
        TrainConfig(data=str(tmp_path), backbone="efficientnet_lite0+efficientnet_lite1",
                    frozen_backbone=False, val_protocol="halves")

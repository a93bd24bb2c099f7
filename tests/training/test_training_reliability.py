"""Training reliability: no code execution from a training state, refused bad reference
features, and a hard kill (SIGKILL) that still leaves a complete checkpoint to resume exactly."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from resend_novelty.data import DataError
from resend_novelty.models import load_checkpoint, read_metadata
from resend_novelty.training import TrainConfig, train



@pytest.fixture
def synth(tmp_path, reference_features):
    return reference_features(tmp_path / "synth.safetensors")


def _cfg(synth, out, **kw):
    base = dict(data=synth, out=str(out), steps=6, batch_pairs=32, lr=2e-3, warmup=2,
                optimizer="adamw", val_classes=2, val_every=0, checkpoint_every=1, workers=0,
                model={"dim": 16, "heads": 2, "depth": 1})
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_never_unpickles_code_from_a_training_state(synth, tmp_path, evil_pickle):
    """A tampered OUT/checkpoints/*/state.pt is read with weights_only=True: resume fails cleanly."""
    out = tmp_path / "run"
    train(_cfg(synth, out, steps=2), progress=False)
    info = json.loads((out / "latest.json").read_text())
    marker = tmp_path / "pwned"
    evil_pickle(out / "checkpoints" / info["path"] / "state.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        train(_cfg(synth, out, steps=4), resume=True, progress=False)
    assert not marker.exists()


def test_nan_or_misshapen_reference_features_are_refused(tmp_path):
    feats = torch.randn(16, 12)
    feats[5, 3] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file({"features": feats, "labels": torch.arange(4).repeat_interleave(4)}, str(bad))
    with pytest.raises(ValueError, match=r"features of .*bad.safetensors contain NaN or inf.*index 5"):
        train(_cfg(str(bad), tmp_path / "o"), progress=False)
    save_file({"features": torch.randn(15, 12), "labels": torch.arange(4).repeat_interleave(4)},
              str(tmp_path / "short.safetensors"))
    with pytest.raises(DataError, match=r"\(15, 12\) do not match 16 labels"):
        train(_cfg(str(tmp_path / "short.safetensors"), tmp_path / "o2"), progress=False)


def _assert_consistent(out: Path) -> int:
    """latest.json parses and points at a complete, loadable checkpoint; returns its step."""
    info = json.loads((out / "latest.json").read_text())
    ck = out / "checkpoints" / info["path"]
    assert ck.is_dir() and not ck.name.startswith(".")
    model = load_checkpoint(ck / "model.safetensors")
    assert json.loads(read_metadata(ck / "model.safetensors")["step"]) == info["step"]
    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == info["step"]
    assert model.config.feature_dim == 12
    return int(info["step"])


def test_kill_9_leaves_a_complete_checkpoint_and_resume_is_exact(synth, tmp_path):
    """SIGKILL (no handler can run) while checkpointing every step: latest.json still points at a
    complete checkpoint; resuming from it gives the uninterrupted run's weights exactly."""
    out = tmp_path / "killed"
    cfg = _cfg(synth, out, steps=100_000)
    code = ("import json, sys; from resend_novelty.training import TrainConfig, train; "
            "train(TrainConfig(**json.loads(sys.argv[1])), progress=False)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        step = 0
        while time.time() < deadline and proc.poll() is None:
            try:
                step = json.loads((out / "latest.json").read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                step = 0  # (a torn read would fail the test below, through _assert_consistent)
            if step >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert step >= 3, "training did not start in time"
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    k = _assert_consistent(out)
    assert k >= 3

    # resume to step k + 3 and compare with an uninterrupted run to k + 3 (same threads: 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_cfg(synth, out, steps=k + 3), resume=True, progress=False)
        train(_cfg(synth, tmp_path / "ref", steps=k + 3), progress=False)
    finally:
        torch.set_num_threads(threads)
    a = load_file(str(out / "final.safetensors"))
    b = load_file(str(tmp_path / "ref" / "final.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

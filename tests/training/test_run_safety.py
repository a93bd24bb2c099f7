"""Pretraining runs are never overwritten or mixed silently; bad options and inputs are refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from resend_novelty.data import DataError
from resend_novelty.training import TrainConfig, train
from resend_novelty.training.config import default_val_classes


@pytest.fixture
def synth(tmp_path, reference_features):
    return reference_features(tmp_path / "synth.safetensors")


def _cfg(data, out, **kw):
    base = dict(data=data, out=str(out), steps=3, batch_pairs=32, lr=2e-3, warmup=1,
                optimizer="adamw", val_classes=2, val_every=0, checkpoint_every=1, workers=0,
                model={"dim": 16, "heads": 2, "depth": 1})
    base.update(kw)
    return TrainConfig(**base)


def test_a_second_run_into_a_run_folder_is_refused(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out), progress=False)
    final = (out / "final.safetensors").read_bytes()
    history = (out / "history.jsonl").read_text()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"holds a run .*--resume.*--overwrite"):
        train(_cfg(synth, out, seed=1), progress=False)
    assert (out / "final.safetensors").read_bytes() == final
    assert (out / "history.jsonl").read_text() == history
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    # --overwrite starts over: one run's history, not two mixed
    train(_cfg(synth, out, seed=1), progress=False, overwrite=True)
    steps = [json.loads(line)["step"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "final.safetensors").read_bytes() != final


def test_unrelated_non_empty_folder_and_files_are_protected(synth, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("precious")
    (out / "notes.txt").write_text("precious too")
    with pytest.raises(ValueError, match="--out .* holds a run|is not empty"):
        train(_cfg(synth, out), progress=False)
    assert (out / "summary.json").read_text() == "precious"
    train(_cfg(synth, out), progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "precious too"  # not a run file: kept
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(_cfg(synth, f), progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        train(_cfg(synth, tmp_path / "new"), resume=True, overwrite=True, progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr=0.0), "lr must be"),
    (dict(lr=float("inf")), "lr must be"),
    (dict(micro_batch=-4), "micro_batch must be an integer >= 0"),
    (dict(max_per_class=-1), "max_per_class must be an integer >= 0"),
    (dict(checkpoint_every=0), "checkpoint_every must be an integer >= 1"),
    (dict(val_classes=-1), "val_classes must be"),
    (dict(cross_domain=float("nan")), "cross_domain must be"),
    (dict(warmup=-1), "warmup must be"),
    (dict(momentum=float("nan")), "momentum must be"),
    (dict(neg_per_pos=0), "neg_per_pos must be"),
])
def test_bad_training_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="x", **kw)


def test_float_and_negative_labels_in_a_features_file_are_refused(tmp_path, reference_features):
    f = reference_features(tmp_path / "f.safetensors", dtype=torch.float32)
    with pytest.raises(DataError, match=r"'labels' must be integers, got torch.float32"):
        train(_cfg(f, tmp_path / "a"), progress=False)
    g = torch.randn(4, 12).relu()
    save_file({"features": g, "labels": torch.tensor([0, 1, -1, 2])}, str(tmp_path / "n.safetensors"))
    with pytest.raises(DataError, match=r"must be >= 0"):
        train(_cfg(str(tmp_path / "n.safetensors"), tmp_path / "b"), progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(DataError, match="cannot read features file"):
        train(_cfg(str(tmp_path / "junk.safetensors"), tmp_path / "c"), progress=False)


def test_default_validation_classes_scale_to_the_data(tmp_path, reference_features):
    assert [default_val_classes(n) for n in (3, 4, 6, 40, 80, 200)] == [0, 2, 2, 10, 20, 20]
    f = reference_features(tmp_path / "six.safetensors", n_classes=6)
    s = train(_cfg(f, tmp_path / "run", val_classes=None, val_every=1), progress=False)
    assert len(s["val_classes"]) == 2 and s["best_val_auroc"] is not None
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["val_classes"] == 2  # the resolved number is the run's config
    # --resume of that run agrees with the resolved default
    s2 = train(_cfg(f, tmp_path / "run", val_classes=None, val_every=1, steps=4), resume=True,
               progress=False)
    assert s2["step"] == 4


def test_garbage_latest_json_and_tampered_state_are_clear_errors(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out, steps=2), progress=False)
    latest = json.loads((out / "latest.json").read_text())
    (out / "latest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"latest.json is corrupt"):
        train(_cfg(synth, out, steps=3), resume=True, progress=False)
    (out / "latest.json").write_text(json.dumps({"step": 2, "path": "../../etc"}))
    with pytest.raises(ValueError, match=r"latest.json is corrupt"):
        train(_cfg(synth, out, steps=3), resume=True, progress=False)
    (out / "latest.json").write_text(json.dumps(latest))
    state = out / "checkpoints" / latest["path"] / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"state.pt is corrupt or tampered with"):
        train(_cfg(synth, out, steps=3), resume=True, progress=False)

"""Checkpoint metadata is validated BEFORE anything is allocated; no download unless asked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from resend_novelty.backbones import BACKBONES
from resend_novelty.cli import main
from resend_novelty.models import (CheckpointError, RelationalConfig, RelationalModule,
                                   load_checkpoint, save_checkpoint)
from resend_novelty.models.checkpoint import FORMAT


def _small(path, **config):
    torch.manual_seed(0)
    model = RelationalModule(RelationalConfig(feature_dim=16, dim=32, depth=1, heads=2, **config))
    save_checkpoint(model, path)
    return model


def _retag(src, dst, **changes):
    """Copy a checkpoint with its metadata config changed (the tensors kept)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    cfg = json.loads(meta["config"])
    cfg.update(changes)
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_small_file_claiming_a_huge_model_is_refused_without_allocating(tmp_path, monkeypatch):
    from resend_novelty.models import checkpoint as ck

    src = _small(tmp_path / "a.safetensors") and tmp_path / "a.safetensors"
    bad = _retag(src, tmp_path / "huge.safetensors", dim=4096, feature_dim=4096, depth=8, heads=8)
    assert bad.stat().st_size < 2_000_000
    devices = []
    real_build = ck.build_relational

    def spy(*a, **k):
        devices.append(torch.empty(0).device.type)  # the default device the module is built on
        return real_build(*a, **k)

    monkeypatch.setattr(ck, "build_relational", spy)
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(bad)
    assert devices == ["meta"]  # only the memory-free shape check ran
    devices.clear()
    load_checkpoint(src)
    assert devices == ["meta", "cpu"]


@pytest.mark.parametrize("changes,match", [
    (dict(mlp_ratio=1e9), "mlp_ratio must be"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be"),
    (dict(dropout=2.0), "dropout must be"),
    (dict(input_dropout=-1), "input_dropout must be"),
    (dict(dim=32.5), "dim must be an integer"),
    (dict(cosine_skip="yes"), "cosine_skip must be true or false"),
])
def test_bad_options_in_metadata_are_checkpoint_errors(tmp_path, changes, match):
    _small(tmp_path / "a.safetensors")
    bad = _retag(tmp_path / "a.safetensors", tmp_path / "b.safetensors", **changes)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(bad)


def test_good_checkpoint_still_loads_exactly(tmp_path):
    model = _small(tmp_path / "a.safetensors")
    back = load_checkpoint(tmp_path / "a.safetensors")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_checkpoint_naming_a_downloading_backbone_needs_explicit_backbone(tmp_path, capsys,
                                                                         class_folders,
                                                                         monkeypatch):
    calls = []

    class NoDownload:  # stands in for ResNet-18: building it would download
        def __init__(self, *a, **k):
            calls.append(1)
            raise AssertionError("backbone built: a download would have started")

    monkeypatch.setitem(BACKBONES, "resnet18", NoDownload)
    _small(tmp_path / "a.safetensors")
    ckpt = _retag(tmp_path / "a.safetensors", tmp_path / "r.safetensors", backbone="resnet18")
    rc = main(["score", "--support", str(class_folders / "support"), "--test",
               str(class_folders / "test"), "--model", str(ckpt), "--out", str(tmp_path / "o"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --backbone resnet18" in err and not calls
    assert FORMAT  # the file is a genuine relational checkpoint, refused only for the download

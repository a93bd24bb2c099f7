"""Checkpoints: safetensors only, strict keys/shapes, config rebuild, shipped-checkpoint checksum."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from resend_novelty.integrity import sha256_file
from resend_novelty.models import (
    FORMAT,
    SHIPPED_NAME,
    CheckpointError,
    RelationalConfig,
    RelationalModule,
    default_checkpoint_path,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from resend_novelty.models import checkpoint as ckpt


def _model(**kw) -> RelationalModule:
    torch.manual_seed(0)
    cfg = dict(feature_dim=16, dim=32, depth=2, heads=2, input_norm="none", backbone="tiny_test_cnn")
    cfg.update(kw)
    return RelationalModule(RelationalConfig(**cfg))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_roundtrip(tmp_path, dtype, tol):
    m = _model()
    path = tmp_path / "m.safetensors"
    save_checkpoint(m, path, dtype=dtype, metadata={"step": 7, "note": "hello"})
    assert load_file(str(path))["proj.weight"].dtype == dtype
    back = load_checkpoint(path)
    assert back.config == m.config and not back.training
    for k, v in m.state_dict().items():
        w = back.state_dict()[k]
        assert w.dtype == torch.float32, k  # always rebuilt in fp32
        torch.testing.assert_close(w, v, atol=tol * max(1.0, float(v.abs().max())), rtol=0)
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and json.loads(meta["step"]) == 7 and meta["note"] == "hello"
    assert json.loads(meta["config"]) == m.config.to_dict()
    f = torch.randn(3, 16)
    torch.testing.assert_close(back.eval()(f, f.flip(0)), m.eval()(f, f.flip(0)),
                               atol=5e-2 if tol else 0, rtol=0)


def test_fp16_file_is_half_the_size(tmp_path):
    m = _model(dim=64)
    save_checkpoint(m, tmp_path / "a.safetensors", dtype=torch.float32)
    save_checkpoint(m, tmp_path / "b.safetensors", dtype=torch.float16)
    a, b = (os.path.getsize(tmp_path / n) for n in ("a.safetensors", "b.safetensors"))
    assert b < 0.6 * a


def test_config_rebuilds_the_model(tmp_path):
    """A checkpoint carries its own config: no architecture argument is needed to load it."""
    m = _model(feature_dim=24, dim=48, depth=3, heads=3, input_norm="l2", mlp_ratio=2.0)
    save_checkpoint(m, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert back.config == m.config and len(back.blocks) == 3 and back.proj.in_features == 24


def test_save_is_atomic_no_temp_left(tmp_path):
    save_checkpoint(_model(), tmp_path / "sub" / "m.safetensors")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.safetensors"]


def _tamper(path, fn):
    tensors = load_file(str(path))
    meta = read_metadata(path)
    fn(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_missing_unexpected_and_shape_errors_are_listed(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(), path)

    def edit(t):
        del t["head.bias"]
        del t["blocks.1.norm1.weight"]
        t["extra.weight"] = torch.zeros(2)
        t["proj.weight"] = torch.zeros(32, 8)

    _tamper(path, edit)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert "missing keys ['blocks.1.norm1.weight', 'head.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert "proj.weight: file (32, 8) vs model (32, 16)" in msg
    assert str(path) in msg


def test_only_missing_key(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(), path)
    _tamper(path, lambda t: t.pop("label_token"))
    with pytest.raises(CheckpointError, match=r"missing keys \['label_token'\], unexpected keys \[\]"):
        load_checkpoint(path)


class _Exploit:
    """Unpickling this would create a file: a stand-in for arbitrary code execution."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil.pth"])
def test_pickle_files_are_refused_without_executing_them(tmp_path, name):
    marker = tmp_path / "pwned"
    _Exploit.target = str(marker)
    path = tmp_path / name
    with open(path, "wb") as fh:
        pickle.dump({"proj.weight": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match=r"not a safetensors checkpoint.*pickle"):
        load_checkpoint(path)
    assert not marker.exists(), "loading a checkpoint must never unpickle it"
    # a genuine torch.save state dict is refused too
    torch.save(_model().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"only \.safetensors files"):
        load_checkpoint(tmp_path / "sd.pt")


def test_other_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(tmp_path / "empty.safetensors")
    # a safetensors file that is not ours
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a resend-novelty relational checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
    # ours, with a broken config
    save_file({"w": torch.zeros(2)}, str(tmp_path / "badcfg.safetensors"),
              metadata={"format": FORMAT, "config": json.dumps({"dim": 30, "heads": 4})})
    with pytest.raises(CheckpointError, match=r"bad model config.*divisible"):
        load_checkpoint(tmp_path / "badcfg.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "unk.safetensors"),
              metadata={"format": FORMAT, "config": json.dumps({"wings": 2})})
    with pytest.raises(CheckpointError, match="unknown relational-config keys"):
        load_checkpoint(tmp_path / "unk.safetensors")
    # a truncated file
    save_checkpoint(_model(), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "trunc.safetensors")


# --------------------------------------------------------------------------- shipped checkpoint
@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """Point ``resources.files('resend_novelty')`` at a temporary package directory."""
    pkg = tmp_path / "pkg"
    (pkg / "weights").mkdir(parents=True)

    class _Resources:
        @staticmethod
        def files(name):
            assert name == "resend_novelty"
            return pkg

    monkeypatch.setattr(ckpt, "resources", _Resources)
    return pkg / "weights"


def _ship(weights: Path, model=None):
    path = weights / SHIPPED_NAME
    save_checkpoint(model or _model(), path, dtype=torch.float16)
    (weights / (SHIPPED_NAME + ".json")).write_text(json.dumps({"sha256": sha256_file(path)}))
    return path


def test_shipped_checkpoint_missing(fake_package):
    with pytest.raises(CheckpointError, match="shipped checkpoint is missing.*--model"):
        default_checkpoint_path()
    with pytest.raises(CheckpointError, match="shipped checkpoint is missing"):
        load_checkpoint()


def test_shipped_checkpoint_verified_and_loaded(fake_package):
    m = _model()
    path = _ship(fake_package, m)
    assert default_checkpoint_path() == path
    back = load_checkpoint()  # None = the shipped one
    assert back.config == m.config


def test_shipped_checkpoint_corruption_is_detected(fake_package):
    path = _ship(fake_package)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"is corrupt: sha256 [0-9a-f]{64} != recorded"):
        default_checkpoint_path()
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint()
    assert default_checkpoint_path(verify=False) == path  # explicit opt-out still works
    (fake_package / (SHIPPED_NAME + ".json")).unlink()
    with pytest.raises(CheckpointError, match="checksum file of the shipped checkpoint is missing"):
        default_checkpoint_path()


def test_sha256_file(tmp_path):
    (tmp_path / "x").write_bytes(b"abc")
    assert sha256_file(tmp_path / "x") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


_REAL = Path(ckpt.__file__).parents[1] / "weights" / SHIPPED_NAME


@pytest.mark.skipif(not _REAL.is_file(), reason="the shipped checkpoint is not built yet")
def test_real_shipped_checkpoint_loads(tmp_path, monkeypatch):
    path = default_checkpoint_path()  # verifies the recorded sha256
    assert path == _REAL
    model = load_checkpoint()
    # session 4: the proxy chose Lite0 + Lite1 features; session 6: the same backbones fine-tuned
    # end to end on the reference set (src/resend_novelty/training/shipped_recipe.json "backbone")
    assert model.config.backbone == "efficientnet_lite0_ft+efficientnet_lite1_ft"
    assert model.config.feature_dim == 2560
    assert model.config.standardize_features and model.scoring.normality == "max-logit"
    # session 5: hybrid support references chosen on the proxy (shipped_recipe.json "scoring")
    assert (model.scoring.neighbors, model.scoring.neighbor_weight) == (10, 0.5)
    from resend_novelty.backbones import build_backbone

    for member in build_backbone(model.config.backbone).members:  # weights in the package
        assert member.weights_id.startswith("file-")
    f = torch.randn(4, 2560)
    out = model.pairwise_logits(f, f[:2])
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    # a copy with one changed byte is rejected by the same check
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(_REAL, weights / SHIPPED_NAME)
    shutil.copy(str(_REAL) + ".json", weights / (SHIPPED_NAME + ".json"))
    with open(weights / SHIPPED_NAME, "r+b") as fh:
        fh.seek(-2, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-2, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))

    class _Resources:
        @staticmethod
        def files(name):
            return tmp_path

    monkeypatch.setattr(ckpt, "resources", _Resources)
    with pytest.raises(CheckpointError, match="corrupt"):
        default_checkpoint_path()

"""Checkpoint writes are atomic: a failure while writing leaves the previous file untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import resend_novelty.models.checkpoint as ck  # module object: its save_file is replaced
from resend_novelty.models import RelationalConfig, RelationalModule, load_checkpoint, save_checkpoint


def test_checkpoint_write_is_atomic_under_failure(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint untouched and no partial file."""
    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    old = RelationalModule(RelationalConfig(feature_dim=12, dim=16, depth=1, heads=2))
    save_checkpoint(old, path)
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(RelationalModule(RelationalConfig(feature_dim=12, dim=16, depth=1, heads=2)), path)
    assert path.read_bytes() == before
    assert load_checkpoint(path).config.feature_dim == 12

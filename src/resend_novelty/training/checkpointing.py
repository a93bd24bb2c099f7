"""Resumable training state: written atomically, read back to continue a run exactly.

``OUT/checkpoints/step_XXXXXXX/`` holds ``model.safetensors`` (the relational model) and
``state.pt`` (optimiser, scheduler, step, RNG state, best validation AUROC, the run's
configuration and, end to end, the backbone); ``OUT/latest.json`` names the newest complete one.
A checkpoint directory is written under a temporary name and renamed, so it appears complete or
not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..models import load_checkpoint, save_checkpoint

__all__ = ["rng_state", "set_rng_state", "save_training_checkpoint", "load_training_checkpoint"]


def rng_state() -> dict:
    """The torch (and CUDA) random generator states."""
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_training_checkpoint(out: Path, model, backbone, optimizer, scheduler, step: int,
                             config: dict, best: float, keep: int = 2) -> Path:
    """Write the training state at ``step`` under ``out`` and point ``out/latest.json`` at it;
    keeps the newest ``keep`` checkpoints. ``config``: the run's configuration (a dict)."""
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:07d}"
    tmp = ckdir / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_checkpoint(model, tmp / "model.safetensors", metadata={"step": step})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "best_val_auroc": best,
        "config": json.dumps(config),
    }
    if backbone is not None:
        state["backbone"] = backbone.state_dict()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the directory appears complete or not at all
    latest_tmp = out / ".latest.json.tmp"
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, out / "latest.json")
    olds = sorted(p for p in ckdir.glob("step_*") if p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_training_checkpoint(out: Path):
    """``(model, state)`` of the checkpoint ``out/latest.json`` names, or None without one."""
    latest = out / "latest.json"
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    path = out / "checkpoints" / info["path"]
    model = load_checkpoint(path / "model.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return model, state

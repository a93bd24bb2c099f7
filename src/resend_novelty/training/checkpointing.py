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
import pickle
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
    try:
        info = json.loads(latest.read_text())
        name = info["path"]
        if not isinstance(name, str) or not name.startswith("step_") or "/" in name or "\\" in name:
            raise ValueError(f"bad checkpoint name {name!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{latest} is corrupt ({exc}); delete it to resume from scratch, or "
                         "restore it") from None
    path = out / "checkpoints" / name
    if not (path / "state.pt").is_file():
        raise ValueError(f"{latest} names {path}, which holds no state.pt")
    model = load_checkpoint(path / "model.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        int(state["step"]), float(state["best_val_auroc"]), json.loads(state["config"])
    except Exception as exc:  # noqa: BLE001 - a tampered file may fail in any way
        raise TrainingStateError(f"training state {path / 'state.pt'} is corrupt or tampered with: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return model, state


class TrainingStateError(ValueError, pickle.UnpicklingError):
    """A corrupt or tampered ``state.pt`` (a ValueError for the CLI; an UnpicklingError as
    ``torch.load`` raises for a refused pickle)."""


_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "best_val_auroc", "config")

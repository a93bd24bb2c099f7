"""Safe checkpoints: safetensors weights with the model config stored in the file's metadata.

Only safetensors files are loaded (no pickle, so a model file can never execute code). Loading
is strict: missing or unexpected tensors and shape mismatches raise an error listing them.
The checkpoint shipped inside the package is verified against its recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .relational import RelationalConfig, RelationalModule, build_relational

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "default_checkpoint_path",
    "CheckpointError",
    "FORMAT",
    "sha256_file",
]

FORMAT = "resend-relational-v1"
SHIPPED_NAME = "resend_lite0_lite1.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, of the wrong format, or does not match the model."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    model: RelationalModule,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temporary file + rename), config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", dtype=dtype).contiguous() for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict:
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a safetensors checkpoint ({exc}); only .safetensors files written by "
            "resend-novelty are loaded (pickled .pt/.pth files are refused for safety)"
        ) from None


def load_checkpoint(
    path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
) -> RelationalModule:
    """Rebuild a :class:`RelationalModule` from a checkpoint (default: the shipped one)."""
    if path is None:
        path = default_checkpoint_path()
    path = str(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path} is not a resend-novelty relational checkpoint (format={meta.get('format')!r})"
        )
    try:
        config = RelationalConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad model config in metadata: {exc}") from None
    model = build_relational(config)  # the transformer, or an ablation model (config.arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = {}
    with safe_open(path, framework="pt", device=str(map_location)) as fh:
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    mismatch = state_mismatch(expected, tensors)
    if mismatch:
        raise CheckpointError(f"{path} does not match its config: {mismatch}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval()


def state_mismatch(expected: dict, tensors: dict, limit: int = 5) -> str | None:
    """How the ``tensors`` of a file differ from a module's ``expected`` ``{key: shape}``: missing
    keys, unexpected keys and shape mismatches (at most ``limit`` of each named); None if none."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or shapes):
        return None

    def few(xs):
        return str(xs[:limit]) + (f" (+{len(xs) - limit} more)" if len(xs) > limit else "")

    return (f"missing keys {few(missing)}, unexpected keys {few(unexpected)}, "
            f"shape mismatches {few(shapes)}")


def verify_recorded_sha256(path: str | os.PathLike, what: str) -> None:
    """Check a file shipped in the package against the SHA-256 recorded in ``<path>.json``."""
    info = Path(str(path) + ".json")
    if not info.is_file():
        raise CheckpointError(f"checksum file of the {what} is missing: {info}")
    want = json.loads(info.read_text())["sha256"]
    got = sha256_file(path)
    if got != want:
        raise CheckpointError(f"{what} {path} is corrupt: sha256 {got} != recorded {want} "
                              f"(SHA-256 recorded in {info}); reinstall the package")


def default_checkpoint_path(verify: bool = True) -> Path:
    """Path of the checkpoint shipped in the package, checked against its recorded SHA-256."""
    weights = resources.files("resend_novelty") / "weights"
    path = Path(str(weights / SHIPPED_NAME))
    if not path.is_file():
        raise CheckpointError(
            f"the shipped checkpoint is missing from the installation ({path}); pass --model"
        )
    if verify:
        verify_recorded_sha256(path, "shipped checkpoint")
    return path

"""Safe checkpoints: safetensors weights with the model's configs stored in the file's metadata.

Only safetensors files are loaded (no pickle, so a model file can never execute code). Loading
is strict: missing or unexpected tensors and shape mismatches raise an error listing them.
The checkpoint shipped inside the package is verified against its recorded SHA-256.

Metadata keys written by :func:`save_checkpoint`: ``format`` (:data:`FORMAT`), ``config`` (the
architecture, :class:`~resend_novelty.models.config.RelationalConfig`) and ``scoring`` (the
default scoring, :class:`~resend_novelty.models.config.ScoringConfig`), all JSON. Files written
before the scoring had its own key hold its fields inside ``config``; :func:`load_checkpoint`
reads them from there (:func:`~resend_novelty.models.config.split_config`).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..integrity import CheckpointError, state_mismatch, verify_recorded_sha256
from .config import ScoringConfig, split_config
from .registry import build_relational
from .relational import RelationalModule

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "default_checkpoint_path",
    "CheckpointError",
    "FORMAT",
    "SHIPPED_NAME",
]

FORMAT = "resend-relational-v1"
SHIPPED_NAME = "resend_lite0_lite1.safetensors"


def save_checkpoint(
    model: RelationalModule,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temporary file + rename), its config and scoring
    in the metadata, with the extra entries of ``metadata`` (non-strings stored as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", dtype=dtype).contiguous() for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()),
            "scoring": json.dumps(model.scoring.to_dict())}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a safetensors checkpoint (``{key: string}``)."""
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
    """Rebuild a relational model (``config.arch``: :class:`RelationalModule` or an ablation) with
    its scoring from a checkpoint (default: the shipped one), in eval mode.

    The scoring is the file's ``scoring`` entry; a file without one takes the scoring fields of
    its ``config`` (older files), and defaults for fields found in neither.
    """
    if path is None:
        path = default_checkpoint_path()
    path = str(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{path} is not a resend-novelty relational checkpoint (format={meta.get('format')!r})"
        )
    try:
        config, scoring = split_config(json.loads(meta["config"]))
        if "scoring" in meta:
            scoring = ScoringConfig.from_dict(json.loads(meta["scoring"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad model config in metadata: {exc}") from None
    # shapes checked BEFORE anything is allocated: the module is first built on the meta device
    # (no memory) and compared with the tensor shapes of the file's header (no data read), so a
    # small file whose config claims a huge model costs nothing
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape)
                        for k, v in build_relational(config, scoring).state_dict().items()}
        with safe_open(path, framework="pt") as fh:
            shapes = {key: _Shape(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: bad model config in metadata: {exc}") from None
    mismatch = state_mismatch(expected, shapes)
    if mismatch:
        raise CheckpointError(f"{path} does not match its config: {mismatch}")
    model = build_relational(config, scoring)
    tensors = {}
    with safe_open(path, framework="pt", device=str(map_location)) as fh:
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval()


class _Shape:
    """A tensor's shape as read from a safetensors header (what :func:`state_mismatch` reads)."""

    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)


def default_checkpoint_path(verify: bool = True) -> Path:
    """Path of the checkpoint shipped in the package, checked against its recorded SHA-256
    (unless ``verify`` is False)."""
    weights = resources.files("resend_novelty") / "weights"
    path = Path(str(weights / SHIPPED_NAME))
    if not path.is_file():
        raise CheckpointError(
            f"the shipped checkpoint is missing from the installation ({path}); pass --model"
        )
    if verify:
        verify_recorded_sha256(path, "shipped checkpoint")
    return path

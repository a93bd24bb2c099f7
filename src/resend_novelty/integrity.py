"""Integrity checks of weights files: SHA-256 digests, recorded hashes, state-dict mismatches.

Every weights file shipped inside the package (the relational checkpoint and the fine-tuned
backbone weights) has a ``<file>.json`` beside it recording its SHA-256; :func:`verified_file`
refuses a missing or altered file. :func:`state_mismatch` lists how the tensors of a file differ
from what a module expects, so that loading is strict and its errors say what is wrong.
Both :mod:`resend_novelty.backbones` and :mod:`resend_novelty.models` use these helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["CheckpointError", "sha256_file", "verify_recorded_sha256", "verified_file",
           "state_mismatch"]


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, of the wrong format, corrupt, or does not match
    the model."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def verified_file(path: str, what: str) -> str:
    """``path`` of a file shipped in the package (``what`` names it in errors), checked to exist
    and to match the SHA-256 recorded beside it (``<file>.json``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} missing from the installation: {path}")
    verify_recorded_sha256(path, what)
    return path


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

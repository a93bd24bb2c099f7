"""Class probabilities of a closed-set classifier: checks, files, and the MSP.

Class probabilities are ``(N, K)`` with one column per known class, in the sorted order of the
known labels (``np.unique`` of the support labels); :func:`validate_probabilities` checks them
up front, :func:`load_probabilities` / :func:`save_probabilities` read and write them as
``.csv`` or ``.npy``, :func:`classifier_probabilities` computes them with a PyTorch classifier,
and :func:`msp` is the maximum softmax probability of each row (the classifier's confidence).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import DataError, load_image

__all__ = [
    "validate_probabilities",
    "validate_scores",
    "load_probabilities",
    "save_probabilities",
    "classifier_probabilities",
    "msp",
]


def validate_probabilities(
    probs,
    n_samples: int | None = None,
    n_classes: int | None = None,
    atol: float = 1e-3,
    what: str = "probabilities",
    paths: Sequence[str] | None = None,
) -> np.ndarray:
    """Check class probabilities up front; returns them as a float64 ``(N, K)`` array.

    Raises ``ValueError`` (naming ``what`` and the first offending row, 1-based, and its image
    where ``paths`` is given) for: not 2-D, a row count other than ``n_samples`` (the test
    list), a column count other than ``n_classes`` (the known classes), NaN/inf, negative
    values, rows not summing to 1 within ``atol`` (logits instead of probabilities?).
    """
    arr = np.asarray(probs)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"{what}: expected a 2-D array (N images, K known classes), got shape {arr.shape}"
        )

    def row(i: int) -> str:
        s = f"row {i + 1}"
        if paths is not None and i < len(paths):
            s += f" ({paths[i]})"
        return s

    if n_samples is not None and arr.shape[0] != n_samples:
        raise ValueError(
            f"{what}: {arr.shape[0]} rows but the test list has {n_samples} images "
            "(one row per test image, in the list order)"
        )
    if n_classes is not None and arr.shape[1] != n_classes:
        raise ValueError(
            f"{what}: {arr.shape[1]} columns but there are {n_classes} known classes (the labels "
            "of the support list); one column per known class, in sorted label order"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: empty array of shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{what}: {int(bad.sum())} NaN/inf value(s), first at {row(i)}, column {j + 1}")
    if (arr < 0).any():
        i, j = np.argwhere(arr < 0)[0]
        raise ValueError(
            f"{what}: negative value {arr[i, j]:.4g} at {row(i)}, column {j + 1} "
            "(probabilities must be >= 0; are these logits? apply softmax first)"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > atol
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(
            f"{what}: {int(off.sum())} row(s) do not sum to 1 (tolerance {atol}), first {row(i)} "
            f"sums to {sums[i]:.6g} (are these logits or scores? apply softmax first)"
        )
    return arr


def _check_npy_header(path) -> None:
    """The shape a ``.npy`` header claims must fit in the file: a 192-byte file claiming
    10^12 x 3 values is refused before anything is allocated."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        body = os.fstat(fh.fileno()).st_size - fh.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: a .npy array of Python objects is not probabilities")
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed > body:
        raise DataError(f"{path}: the .npy header claims shape {shape} ({needed} bytes) but the "
                        f"file holds {body} bytes of data")


def load_probabilities(
    path: str | os.PathLike,
    n_samples: int | None = None,
    n_classes: int | None = None,
    atol: float = 1e-3,
    paths: Sequence[str] | None = None,
) -> np.ndarray:
    """Read class probabilities from ``.npy`` (2-D array) or ``.csv`` (one row per image).

    A CSV holds K numeric columns (one per known class in sorted label order), comma-separated,
    in the order of the test list; a first line with non-numeric cells is taken as a header.
    The result is checked with :func:`validate_probabilities`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"probability file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            _check_npy_header(path)
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {path} as a .npy array: {exc}") from None
    elif suffix == ".csv":
        rows: list[list[float]] = []
        with open(path, newline="", encoding="utf-8") as fh:
            for lineno, cells in enumerate(csv.reader(fh), start=1):
                cells = [c.strip() for c in cells]
                if not cells or all(c == "" for c in cells):
                    continue
                try:
                    rows.append([float(c) for c in cells])
                except ValueError:
                    if lineno == 1:  # header
                        continue
                    raise DataError(f"{path}:{lineno}: non-numeric value in {cells!r}") from None
                if rows and len(rows[-1]) != len(rows[0]):
                    raise DataError(
                        f"{path}:{lineno}: {len(rows[-1])} columns, previous rows have {len(rows[0])}"
                    )
        if not rows:
            raise DataError(f"{path} holds no probability rows")
        arr = np.array(rows, dtype=np.float64)
    else:
        raise DataError(f"{path}: unsupported probability file type {suffix!r}; use .csv or .npy")
    return validate_probabilities(arr, n_samples, n_classes, atol, what=str(path), paths=paths)


def save_probabilities(path: str | os.PathLike, probs, classes: Sequence | None = None) -> None:
    """Write probabilities as ``.npy`` or ``.csv`` (header ``class_<label>`` per column)."""
    path = Path(path)
    probs = np.asarray(probs, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, probs)
        return
    if classes is None:
        classes = range(probs.shape[1])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([f"class_{c}" for c in classes])
        for r in probs:
            w.writerow([f"{v:.8g}" for v in r])


@torch.inference_mode()
def classifier_probabilities(
    module: nn.Module,
    inputs,
    outputs: str = "logits",
    transform: Callable | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class probabilities of a PyTorch classifier, ``(N, K)`` float64.

    ``inputs`` is a tensor/array batch (features for a head on a frozen backbone, or
    preprocessed images) or a list of image paths, loaded as RGB and passed through
    ``transform`` (default: ``module.transform`` where the module has one). ``outputs`` says what
    the module returns: ``"logits"`` (softmax applied here) or ``"probs"``.
    """
    if outputs not in ("logits", "probs"):
        raise ValueError(f"outputs must be 'logits' or 'probs', got {outputs!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    was_training = module.training
    module = module.to(device).eval()
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (str, os.PathLike)):
        transform = transform or getattr(module, "transform", None)
        if transform is None:
            raise ValueError("image paths need a transform (pass transform= or give the module one)")

        def batches():
            for i in range(0, len(inputs), batch_size):
                yield torch.stack([transform(load_image(p)) for p in inputs[i : i + batch_size]])
    else:
        x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
        x = x.float()

        def batches():
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size]

    out = []
    for xb in batches():
        y = module(xb.to(device)).float()
        out.append((torch.softmax(y, dim=1) if outputs == "logits" else y).cpu())
    if was_training:
        module.train()
    if not out:
        raise ValueError("no inputs given")
    probs = torch.cat(out).double().numpy()
    return validate_probabilities(probs, what=f"{type(module).__name__} outputs")


def msp(probs) -> np.ndarray:
    """Maximum softmax probability of each row."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def validate_scores(x, what: str, n: int | None = None) -> np.ndarray:
    """Check a 1-D array of finite scores (``n`` of them where given); returns it as float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of scores, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{what}: {len(arr)} scores but {n} samples")
    if not np.isfinite(arr).all():
        i = int(np.argmax(~np.isfinite(arr)))
        raise ValueError(f"{what}: NaN/inf score at row {i + 1}")
    return arr

"""Detector inputs -> feature tensors.

A detector accepts image paths, a class-folder directory, an
:class:`~resend_novelty.data.ImageDataset`, a DataLoader of ``(images, labels)``, a tensor of
preprocessed images ``(N, 3, H, W)`` or PIL images. :func:`input_features` turns any of them into
an ``(N, D)`` float32 feature tensor, plus the labels and class names where the input carries
them. Image files go through :func:`~resend_novelty.features.extract.extract_features` (and its
cache), on the chosen inference engine (``engine=``: "auto", "onnx", "torch"); tensors and
DataLoaders run the torch backbone directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..backbones import Backbone
from ..data import IMAGE_EXTENSIONS, DataError, ImageDataset, list_images, scan_class_folders
from .cache import FeatureCache
from .engine import resolve_engine
from .extract import check_features, default_device, extract_features

__all__ = ["InputFeatures", "input_features"]


class InputFeatures(NamedTuple):
    """Features of an input, with its labels and class names where the input carries them."""

    features: torch.Tensor
    labels: np.ndarray | None = None
    class_names: list[str] | None = None  # class folders: the folder name of each label


def input_features(
    x,
    backbone: Backbone,
    *,
    cache: FeatureCache | bool | None = True,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
    extra: Sequence[tuple[Backbone, str]] = (),
    engine: str = "auto",
) -> InputFeatures:
    """Backbone features of ``x`` (any supported input type), see the module docstring.

    ``extra``: ``(backbone, label)`` pairs whose outputs are appended to those of ``backbone``,
    column-wise (e.g. Gram statistics of intermediate layers); for image files each is cached
    under its own namespace, with ``label`` in its progress bar. DataLoaders take no ``extra``.
    ``engine``: the inference engine for image files (see :func:`extract_features`).
    """
    device = torch.device(device) if device is not None else default_device()
    resolve_engine(engine, device)  # a wrong value fails here, whatever the input type
    kw = dict(cache=cache, batch_size=batch_size, num_workers=num_workers, device=device,
              progress=progress, engine=engine)

    def from_paths(paths: Sequence[str]) -> torch.Tensor:
        out = [extract_features(backbone, paths, desc=desc, **kw)]
        out += [extract_features(b, paths, desc=f"{desc} ({label})", **kw) for b, label in extra]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
        entries = [e for e in Path(x).iterdir() if not e.name.startswith(".")]
        sub = [d for d in entries if d.is_dir()]
        loose = [f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if sub and not loose:  # class folders: labels are the folder indices
            records, classes = scan_class_folders(x)
            return InputFeatures(from_paths([r.path for r in records]),
                                 np.array([r.label for r in records]), classes)
        return InputFeatures(from_paths(list_images(x)))
    if isinstance(x, ImageDataset):
        return InputFeatures(from_paths(x.paths), np.asarray(x.labels))
    if isinstance(x, torch.utils.data.DataLoader):
        if extra:
            raise TypeError("DataLoader inputs take no extra backbones")
        feats, labels = [], []
        bb = backbone.to(device).eval()
        with torch.inference_mode():
            for batch in x:
                images, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                feats.append(bb(images.to(device)).float().cpu())
                if y is not None:
                    labels.append(torch.as_tensor(y))
        f = check_features(torch.cat(feats), desc)
        return InputFeatures(f, torch.cat(labels).numpy() if labels else None)
    if isinstance(x, torch.Tensor):
        if x.ndim != 4:
            raise ValueError(
                f"image tensors must be (N, 3, H, W), got {tuple(x.shape)}; "
                "use fit_features/score_features for precomputed features"
            )
        nets = [backbone.to(device).eval()] + [b.to(device).eval() for b, _ in extra]
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                xi = x[i : i + batch_size].to(device)
                out.append(torch.cat([net(xi).float() for net in nets], dim=1).cpu())
        return InputFeatures(check_features(torch.cat(out), desc))
    if isinstance(x, (list, tuple)) and x and hasattr(x[0], "convert"):  # PIL images
        # each network with its own preprocessing: an ensemble's members one by one (as
        # extract_features concatenates them), then the extra backbones
        nets = list(getattr(backbone, "members", [backbone])) + [b for b, _ in extra]
        rgb = [im.convert("RGB") for im in x]
        return InputFeatures(torch.cat([input_features(
            torch.stack([net.transform(im) for im in rgb]), net, desc=desc, **kw).features
            for net in nets], dim=1))
    if isinstance(x, (list, tuple, np.ndarray)):
        return InputFeatures(from_paths([str(p) for p in x]))
    if isinstance(x, (str, os.PathLike)):  # a path that is not a folder
        raise DataError(f"image folder {'is not a folder' if Path(x).exists() else 'not found'}: {x}")
    raise TypeError(f"unsupported input type {type(x).__name__}")

"""Look up backbone features in a file exported by ``resend features DIR --export F``.

The file holds ``features`` (N, D) and, in its metadata, the image ``paths`` (JSON) and the
``backbone`` name. :func:`features_file_lookup` gives a ``features_fn(paths)`` that benchmark
runners accept in place of a backbone and cache, so that a machine holding the list files but
not the images can score exported features.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

__all__ = ["features_file_lookup"]


def features_file_lookup(path: str | Path):
    """``(features_fn, n_features)`` from an exported features file.

    Exported paths are matched to the requested paths by their trailing components (relative
    to the common folder of the exported paths), so the file may come from another machine.
    ``features_fn(paths)`` returns float32 rows (fp16 exports are upcast) and raises
    ``KeyError`` for a path not in the file; ``features_fn.backbone`` is the recorded backbone
    name (None for a file exported without it).
    """
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        feats = fh.get_tensor("features").float()
    if "paths" not in meta:
        raise ValueError(f"{path} has no 'paths' metadata: export it with `resend features --export`")
    exported = [Path(p) for p in json.loads(meta["paths"])]
    common = Path(os.path.commonpath([str(p) for p in exported])) if len(exported) > 1 else exported[0].parent
    index, lengths = {}, set()
    for i, p in enumerate(exported):
        rel = p.relative_to(common).parts
        index[rel] = i
        lengths.add(len(rel))

    def features_fn(paths):
        rows = []
        for p in paths:
            parts = Path(p).parts
            hit = next((index[parts[-n:]] for n in sorted(lengths) if parts[-n:] in index), None)
            if hit is None:
                raise KeyError(f"{p} is not in the features file {path}")
            rows.append(hit)
        return feats[rows]

    features_fn.backbone = meta.get("backbone")  # name of the backbone of the export
    return features_fn, feats.shape[0]

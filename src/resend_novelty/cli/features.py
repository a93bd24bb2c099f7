"""``resend features``: fill the feature cache for a folder or list (e.g. before a GPU run)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..backbones import build_backbone
from ..data import list_images, read_list_file
from ..features import FeatureCache, extract_features


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="extract and cache backbone features of a folder or list file",
        description=(
            "Run the backbone over every image of DATA (a directory, searched recursively, or a "
            "list file with --root) and store the features in the cache, so later runs skip the "
            "backbone. Optionally export them to a .safetensors file (--export)."
        ),
    )
    p.add_argument("data", help="image directory or list file")
    p.add_argument("--root", default=None, help="root of the list file's paths")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="backbone name (default efficientnet_lite0; efficientnet_lite1, "
                   "efficientnet_lite2, the fine-tuned efficientnet_lite0_ft / efficientnet_lite1_ft, "
                   "resnet18, or names joined by '+' for concatenated features, e.g. "
                   "efficientnet_lite0_ft+efficientnet_lite1_ft, the shipped checkpoint's)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone batch (default 64)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding worker processes")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default $RESEND_CACHE or ~/.cache/resend_novelty)")
    p.add_argument("--export", default=None, metavar="OUT.safetensors",
                   help="also write features, labels and paths to this file")
    p.add_argument("--fp16", action="store_true",
                   help="--export: store the features as float16 (half the file; loaders upcast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    if os.path.isdir(args.data):
        paths, labels = list_images(args.data), None
    else:
        recs = read_list_file(args.data, args.root)
        paths, labels = [r.path for r in recs], [r.label for r in recs]
    cache = FeatureCache(args.cache_dir) if args.cache_dir else True
    bb = build_backbone(args.backbone)
    feats = extract_features(bb, paths, cache=cache, batch_size=args.batch_size,
                             num_workers=args.workers, device=args.device,
                             progress=not args.quiet)
    print(f"{len(paths)} images, features {tuple(feats.shape)} ({bb.cache_namespace})")
    if args.export:
        tensors = {"features": (feats.half() if args.fp16 else feats).contiguous()}
        if labels is not None:
            tensors["labels"] = torch.tensor(labels)
        save_file(tensors, args.export, metadata={"paths": json.dumps(paths), "backbone": bb.name,
                                                  "namespace": bb.cache_namespace})
    return 0

"""``resend features``: fill the feature cache for a folder or list (e.g. before a GPU run).

Sharded extraction: ``--shard i/N`` (0 <= i < N) computes every N-th image starting at the
i-th, in the order of the image list, so N runs (on one machine or several sharing the cache
folder) together cover the list exactly once. Under ``torchrun --nproc-per-node N -m
resend_novelty.cli features ...`` the shard is the process's RANK of WORLD_SIZE; the processes
synchronise over a gloo process group, and after all shards are done rank 0 reads the whole list
from the cache (and writes ``--export``). Every shard writes to the SQLite feature cache, which is
safe for concurrent writers.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..backbones import build_backbone
from ..data import DataError, list_images, read_list_file, scan_class_folders
from ..features import FeatureCache, extract_features
from .common import add_engine_option, check_output, number


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
    p.add_argument("--batch-size", type=number(int, 1, 65536), default=64,
                   help="images per backbone batch (default 64)")
    p.add_argument("--workers", type=number(int, 0, 256), default=None,
                   help="image-decoding threads (default min(4, CPUs); 0 = no prefetching)")
    add_engine_option(p)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="compute only shard I of N (0 <= I < N): every N-th image of the list "
                   "starting at the I-th; N runs sharing the cache folder cover the list exactly "
                   "once. Under torchrun the shard is RANK/WORLD_SIZE (do not give --shard)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default $RESEND_CACHE or ~/.cache/resend_novelty)")
    p.add_argument("--export", default=None, metavar="OUT.safetensors",
                   help="also write features, paths and (for DATA/<class>/<image> or a list file) "
                   "integer labels to this file, the input of `resend pretrain --data`")
    p.add_argument("--overwrite", action="store_true", help="--export: replace an existing file")
    p.add_argument("--fp16", action="store_true",
                   help="--export: store the features as float16 (half the file; loaders upcast)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)``, checked (0 <= i < N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers, e.g. 0/4; got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N (shards are numbered from 0)")
    return i, n


def shard_of(items: list, index: int, count: int) -> list:
    """The ``index``-th of ``count`` interleaved shards of ``items`` (order kept)."""
    return items[index::count]


def _folder_items(folder: str):
    """``(paths, labels, class names)`` of an image folder; labels (the index of the sorted
    class-folder names) only when every image lies at ``folder/<class>/<image>``."""
    paths = list_images(folder)
    depths = {len(os.path.relpath(p, folder).split(os.sep)) for p in paths}
    if depths != {2}:
        return paths, None, None
    records, classes = scan_class_folders(folder, report_skipped=False)
    return [r.path for r in records], [r.label for r in records], list(classes)


def _torchrun_rank() -> tuple[int, int] | None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def run(args) -> int:
    ranked = _torchrun_rank()
    shard = parse_shard(args.shard) if args.shard else None
    if shard and ranked:
        raise ValueError("--shard is set by torchrun (RANK/WORLD_SIZE); do not give both")
    if shard and args.export:
        raise ValueError("--export needs every shard's features: run once more without --shard "
                         "after all shards finished (it reads them from the cache)")
    if args.export:
        check_output(args.export, flag="--export", overwrite=getattr(args, "overwrite", False))
    class_names = None
    if os.path.isdir(args.data):
        paths, labels, class_names = _folder_items(args.data)
    elif not os.path.exists(args.data):
        raise DataError(f"DATA not found: {args.data} (an image folder or a list file)")
    else:
        recs = read_list_file(args.data, args.root)
        paths, labels = [r.path for r in recs], [r.label for r in recs]
    cache = FeatureCache(args.cache_dir) if args.cache_dir else True
    bb = build_backbone(args.backbone)
    kw = dict(cache=cache, batch_size=args.batch_size, num_workers=args.workers,
              device=args.device, progress=not args.quiet, engine=args.engine)
    if ranked:
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        try:
            rank, world = ranked
            mine = shard_of(paths, rank, world)
            if mine:
                extract_features(bb, mine, desc=f"features [shard {rank}/{world}]", **kw)
            dist.barrier()  # every shard is in the cache
            if rank != 0:
                print(f"shard {rank}/{world}: {len(mine)} images")
                return 0
            feats = extract_features(bb, paths, **{**kw, "progress": False})
        finally:
            dist.destroy_process_group()
    elif shard:
        mine = shard_of(paths, *shard)
        if mine:
            extract_features(bb, mine, **kw)
        print(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(paths)} images "
              f"({bb.cache_namespace})")
        return 0
    else:
        feats = extract_features(bb, paths, **kw)
    print(f"{len(paths)} images, features {tuple(feats.shape)} ({bb.cache_namespace})")
    if args.export:
        tensors = {"features": (feats.half() if args.fp16 else feats).contiguous()}
        meta = {"paths": json.dumps(paths), "backbone": bb.name, "namespace": bb.cache_namespace}
        if labels is not None:
            tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
        if class_names is not None:
            meta["class_names"] = json.dumps(class_names)
        save_file(tensors, args.export, metadata=meta)
        if labels is None:
            print(f"note: {args.export} holds no labels (DATA is not DATA/<class>/<image> or a "
                  "list file), so `resend pretrain --data` cannot use it", file=sys.stderr)
    return 0

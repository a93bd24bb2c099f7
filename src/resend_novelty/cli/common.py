"""Detector options shared by several sub-commands, and the detector factory they configure.

:func:`add_detector_options` adds ``--method``, ``--model``, ``--backbone``, the ReSeND scoring
options, the baselines' options (:mod:`.detector_options`) and the run options (device, batch
size, cache); :func:`detector_factory` turns the parsed options into typed arguments of
:func:`resend_novelty.detectors.build_detector`.
"""

from __future__ import annotations

import argparse

from ..backbones import build_backbone
from ..detectors import DETECTORS, build_detector
from ..features import FeatureCache
from ..models import load_checkpoint
from .detector_options import METHOD_HELP, add_baseline_options, baseline_kwargs

__all__ = ["add_detector_options", "detector_factory", "feature_cache"]


def feature_cache(args) -> FeatureCache | bool:
    """The ``cache=`` argument of the library from ``--no-cache`` / ``--cache-dir``."""
    return False if args.no_cache else FeatureCache(args.cache_dir) if args.cache_dir else True


def add_detector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", default="resend", choices=sorted(DETECTORS),
        help="novelty score: 'resend' (relational model: similarities to class prototypes, "
        "normality from the checkpoint's config), 'cosine' (max cosine to prototypes), "
        "'cosine-centered' / 'cosine-standardized' (after per-domain normalisation) or "
        "'euclidean' (minus distance to the nearest prototype); baselines of the paper: "
        + "; ".join(f"'{k}' ({v})" for k, v in METHOD_HELP.items()) + ". Default: resend",
    )
    p.add_argument(
        "--model", default=None, metavar="CKPT",
        help="relational checkpoint (.safetensors) for --method resend (and, for ft-* methods with "
        "--ft-budget resend, the model whose evaluation time sets the budget); default: the "
        "checkpoint shipped with the package",
    )
    p.add_argument(
        "--backbone", default=None,
        help="backbone for every method but resend (default efficientnet_lite0; resend uses the "
        "backbone its checkpoint was trained on)",
    )
    p.add_argument(
        "--normality", default=None, choices=("softmax", "max-logit"),
        help="--method resend: 'softmax' (the paper's max softmax of the similarities) or "
        "'max-logit' (the largest similarity); default: the checkpoint's own",
    )
    p.add_argument(
        "--neighbors", type=int, default=None, metavar="K",
        help="--method resend: also compare each test image with the K support images of each "
        "class nearest to it (cosine), not only with the class prototype (not in the paper); "
        "0 = prototypes only; default: the checkpoint's own",
    )
    p.add_argument(
        "--neighbor-weight", type=float, default=None, metavar="W",
        help="--method resend with --neighbors K: similarity to a class = (1 - W) x similarity "
        "to its prototype + W x mean similarity to its K nearest support images (1 = neighbours "
        "only); default: the checkpoint's own",
    )
    p.add_argument(
        "--refine", type=int, default=None, metavar="STEPS",
        help="--method resend or cosine/cosine-centered/cosine-standardized: STEPS of test-time "
        "prototype refinement on the test images scored together (not in the paper; default 0 = "
        "off). Transductive; it can fail badly when an unknown class is a large share of the "
        "test images (PACS Photo target: AUROC 0.41, see BENCHMARKS.md)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per backbone batch (default 64)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding worker processes")
    p.add_argument(
        "--cache-dir", default=None,
        help="feature cache directory (default $RESEND_CACHE or ~/.cache/resend_novelty)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_baseline_options(p)


def detector_factory(args):
    """A function returning a fresh detector configured from the CLI options."""
    cache = feature_cache(args)
    model = None
    if args.method == "resend":
        model = load_checkpoint(args.model)
        bb_name = model.config.backbone
        if args.backbone and args.backbone != bb_name:
            raise ValueError(
                f"--backbone {args.backbone} differs from the checkpoint's backbone {bb_name}"
            )
    elif args.model and not (args.method.startswith("ft-")
                                    and getattr(args, "ft_budget", "resend") == "resend"):
        raise ValueError(f"--model is only used by --method resend (and by ft-* methods with "
                         f"--ft-budget resend), not {args.method}")
    else:
        bb_name = args.backbone or "efficientnet_lite0"
    backbone = build_backbone(bb_name)  # built once, shared by every detector
    common = dict(
        backbone=backbone, device=args.device, cache=cache, batch_size=args.batch_size,
        num_workers=args.workers, progress=not args.quiet,
    )
    common.update(baseline_kwargs(args))

    resend_only = {k: getattr(args, k, None) for k in ("normality", "neighbors", "neighbor_weight")}
    resend_only = {k: v for k, v in resend_only.items() if v is not None}
    if resend_only and args.method != "resend":
        flags = "/--".join(k.replace("_", "-") for k in resend_only)
        raise ValueError(f"--{flags} only apply to --method resend, not {args.method}")
    common.update(resend_only)
    if getattr(args, "refine", None):
        common["refine"] = args.refine  # detectors without refinement raise a clear error

    def make():
        return build_detector(args.method, model=model, **common)

    return make

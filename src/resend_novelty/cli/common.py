"""Detector options shared by several sub-commands, and the detector factory they configure.

:func:`add_detector_options` adds ``--method``, ``--model``, ``--backbone``, the ReSeND scoring
options, the baselines' options (:mod:`.detector_options`) and the run options (device, batch
size, cache); :func:`detector_factory` turns the parsed options into typed arguments of
:func:`resend_novelty.detectors.build_detector`.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from ..backbones import build_backbone
from ..detectors import DETECTORS, build_detector
from ..features import ENGINES, FeatureCache
from ..models import load_checkpoint
from .detector_options import METHOD_HELP, add_baseline_options, baseline_kwargs

__all__ = ["add_detector_options", "add_engine_option", "detector_factory", "feature_cache",
           "FIT_OPTIONS", "fit_options_given", "number", "SEED", "finite_float"]


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
        "--candidates", type=int, default=None, metavar="M",
        help="--method resend: score with the relational module only the M classes nearest to "
        "each test image by cosine (the others cannot be the nearest class); 0 = every class "
        "(exact; so is any M >= the number of classes); default: the checkpoint's own",
    )
    p.add_argument(
        "--refine", type=int, default=None, metavar="STEPS",
        help="--method resend or cosine/cosine-centered/cosine-standardized: STEPS of test-time "
        "prototype refinement on the test images scored together (not in the paper; default 0 = "
        "off). Transductive; it can fail badly when an unknown class is a large share of the "
        "test images (PACS multi-source Photo target: AUROC 0.41, see docs/scoring.md)",
    )
    p.add_argument(
        "--shift-threshold", type=float, default=None, metavar="T",
        help="--method resend, cosine*, euclidean: shift gate of the per-domain normalisation "
        "(not in the paper). When the support-test gap (1 - cosine of their mean unit features) "
        "is at most T, support and test are normalised with one set of statistics of both "
        "together; above it, each with its own (the paper's setting of a shifted domain). "
        "0 = always each its own; default: the checkpoint's own (resend), 0 (others). "
        "Transductive only: no effect with --per-image",
    )
    p.add_argument(
        "--raw-weight", type=float, default=None, metavar="W",
        help="--method resend, cosine*, euclidean, with --per-image and one support domain: "
        "normality = (1 - W) x normality on the support-normalised features + W x normality "
        "on the unnormalised features (not in the paper; a test image alone may come from "
        "another domain than the support's). 0 = normalised only; default: the checkpoint's "
        "own (resend), 0 (others)",
    )
    p.add_argument(
        "--per-image", action="store_true",
        help="score each test image alone: no statistic of any other test image is used (the "
        "per-domain normalisation of the test features uses the support statistics; the "
        "scores do not depend on which images are scored together). Default: transductive "
        "(test statistics from the test images scored together). Not with --refine",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=number(int, 1, 65536), default=64,
                   help="images per backbone batch (default 64)")
    p.add_argument("--workers", type=number(int, 0, 256), default=None,
                   help="image-decoding threads (default min(4, CPUs); 0 = no prefetching)")
    add_engine_option(p)
    p.add_argument(
        "--cache-dir", default=None,
        help="feature cache directory (default $RESEND_CACHE or ~/.cache/resend_novelty)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_baseline_options(p)
    p.set_defaults(_fit_defaults={a.dest: a.default for a in p._actions
                                  if a.dest in FIT_OPTIONS})


#: options that decide how a detector is fitted and scores: a detector file fixes them
#: (``resend score --detector`` refuses them rather than ignore them)
FIT_OPTIONS = ("method", "backbone", "normality", "neighbors", "neighbor_weight", "candidates",
               "refine", "shift_threshold", "raw_weight", "knn_k", "ft_budget", "ft_epochs",
               "ft_hidden", "ft_lr", "odin_temperature", "odin_eps")


def fit_options_given(args) -> list[str]:
    """The fitting options (:data:`FIT_OPTIONS`) given on the command line (value other than
    the default), as flags."""
    defaults = getattr(args, "_fit_defaults", {})
    return ["--" + k.replace("_", "-") for k, v in defaults.items()
            if getattr(args, k, v) != v]


def add_engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine", default="auto", choices=ENGINES,
        help="backbone inference engine: 'onnx' (ONNX Runtime, CPU only; the graph is exported "
        "from the backbone on first use into the cache folder and checked against torch), "
        "'torch', or 'auto' (default: onnx on the CPU, torch on CUDA). Both engines share the "
        "feature cache: their features agree within 1e-4",
    )


def detector_factory(args):
    """A function returning a fresh detector configured from the CLI options."""
    cache = feature_cache(args)
    model = None
    cls = DETECTORS[args.method]
    if cls.uses_model:
        model = load_checkpoint(args.model)
        bb_name = model.config.backbone
        if args.backbone != bb_name and set(bb_name.split("+")) & set(DOWNLOADING_BACKBONES):
            raise ValueError(  # never a download the user did not ask for
                f"the checkpoint {args.model} was trained on {bb_name}, whose weights torchvision "
                f"downloads from the internet: pass --backbone {bb_name} to allow it")
        if args.backbone and args.backbone != bb_name:
            raise ValueError(
                f"--backbone {args.backbone} differs from the checkpoint's backbone {bb_name}"
            )
    elif args.model and not (cls.fine_tunes and getattr(args, "ft_budget", "resend") == "resend"):
        raise ValueError(f"--model is only used by --method resend (and by ft-* methods with "
                         f"--ft-budget resend), not {args.method}")
    else:
        bb_name = args.backbone or "efficientnet_lite0"
    backbone = build_backbone(bb_name)  # built once, shared by every detector
    common = dict(
        backbone=backbone, device=args.device, cache=cache, batch_size=args.batch_size,
        num_workers=args.workers, progress=not args.quiet, engine=getattr(args, "engine", "auto"),
    )
    # options without a default that this method does not declare (e.g. --neighbors for cosine)
    foreign = [k for k in ("normality", "neighbors", "neighbor_weight", "candidates")
               if getattr(args, k, None) is not None and k not in cls.cli_params]
    if foreign:
        flags = "/--".join(k.replace("_", "-") for k in foreign)
        raise ValueError(f"--{flags} only apply to --method resend, not {args.method}")
    common.update(baseline_kwargs(args))  # None: the checkpoint's own
    if getattr(args, "refine", None):
        common["refine"] = args.refine  # detectors without refinement raise a clear error
    if getattr(args, "per_image", False):
        common["per_image"] = True  # with --refine: a clear error from the detector
    if getattr(args, "shift_threshold", None) is not None:
        common["shift_threshold"] = args.shift_threshold  # unsupported methods raise clearly
    if getattr(args, "raw_weight", None) is not None:
        common["raw_weight"] = args.raw_weight  # unsupported methods raise clearly

    def make():
        return build_detector(args.method, model=model, **common)

    return make


def check_output(path, *, inside=(), overwrite: bool = False, folder: bool = False,
                 flag: str = "--out") -> None:
    """Check an output path BEFORE any work; raises ValueError naming it (exit 2 in the CLI).

    Refused: a path inside (or equal to) one of the input folders ``inside`` (its files would
    become input on the next run); a file where a folder is wanted and the reverse; an existing
    output (a non-empty folder, or a file) without ``overwrite`` (nothing is overwritten
    silently); a place that cannot be written (a probe file is created and removed). Nothing
    is deleted here: the command replaces its own outputs once its new ones are complete
    (``report.write_report``).
    """
    p = Path(path)
    real = Path(os.path.realpath(p))
    for src in inside:
        if src is None:
            continue
        s = Path(os.path.realpath(src))
        if real == s or s in real.parents:
            raise ValueError(f"{flag} {p} lies inside the input folder {src}: its files would be "
                             "read as input images on the next run; choose another folder")
    if folder:
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {p} is a file, not a folder")
        if p.is_dir() and any(p.iterdir()):
            if not overwrite:
                raise ValueError(f"{flag} {p} already holds files: pass --overwrite to replace "
                                 "this command's outputs in it, or choose another folder")
        target = p
    else:
        if p.is_dir():
            raise ValueError(f"{flag} {p} is a folder, not a file")
        if p.exists() and not overwrite:
            raise ValueError(f"{flag} {p} exists: pass --overwrite to replace it")
        target = p.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".resend-write-check-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {p} cannot be written: {exc.strerror or exc}") from None


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False):
    """argparse type: a finite ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` with
    ``low_open``); the one numeric-option type of the CLI, so every bad value is refused at
    parse time with a message naming the bound (argparse names the option, exit 2)."""
    what = "an integer" if kind is int else "a finite number"
    bound = " and ".join(b for b in (
        None if low is None else f"{'>' if low_open else '>='} {kind(low)}",
        None if high is None else f"<= {kind(high)}") if b)

    def parse(value: str):
        try:
            v = kind(value)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
        if (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
                or (high is not None and v > high)):
            raise argparse.ArgumentTypeError(f"must be {what}{' ' + bound if bound else ''}, "
                                             f"got {value}")
        return v

    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording for other errors
    return parse


#: a seed of numpy / torch generators
SEED = number(int, 0, 2**32 - 1)


def finite_float(value: str) -> float:
    """argparse type: a float that is not NaN or infinite."""

    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return v


#: Backbones whose weights are downloaded at run time (used only when named by --backbone).
DOWNLOADING_BACKBONES = ("resnet18",)

"""Command-line options of the baselines (knn, ft-*) and their conversion to detector arguments.

:data:`METHOD_HELP` is read from the ``description`` of each registered baseline;
:func:`add_baseline_options` adds the argparse group; :func:`baseline_kwargs` turns the parsed
options into the typed keyword arguments of :func:`resend_novelty.detectors.build_detector`.
"""

from __future__ import annotations

import argparse
import math

from ..detectors import BASELINES, FT_METHODS

__all__ = ["METHOD_HELP", "add_baseline_options", "baseline_kwargs"]

METHOD_HELP = {name: cls.description for name, cls in BASELINES.items()}


def add_baseline_options(p: argparse.ArgumentParser) -> None:
    """Options of the baselines (argparse group); used by the CLI's detector options."""
    g = p.add_argument_group(
        "baseline options",
        "used only by the baselines (knn, ft-*). ft-* methods fine-tune a NEW classifier head on "
        "the frozen, cached backbone features of the support set (not the backbone: a CPU-friendly "
        "deviation from the paper) and need pytorch-ood (pip install 'resend-novelty[ood]')")
    g.add_argument("--knn-k", type=int, default=10, metavar="K",
                   help="knn: nearest support features per class (default 10)")
    g.add_argument("--ft-budget", default="resend", metavar="resend|SECONDS",
                   help="ft-*: training wall time per target: 'resend' = the time ReSeND takes to "
                   "evaluate the same target (the paper's rule; uses --model or the shipped "
                   "checkpoint), or a number of seconds (default resend)")
    g.add_argument("--ft-epochs", type=int, default=None, metavar="N",
                   help="ft-*: at most N epochs (with --ft-budget 0: exactly N epochs)")
    g.add_argument("--ft-hidden", type=int, default=None, metavar="H",
                   help="ft-*: hidden units of the head (0 = linear; default 0, ft-mahalanobis 512)")
    g.add_argument("--ft-lr", type=float, default=1e-2, help="ft-*: AdamW learning rate (default 1e-2)")
    g.add_argument("--odin-temperature", type=float, default=1000.0,
                   help="ft-odin: softmax temperature T (default 1000)")
    g.add_argument("--odin-eps", type=float, default=0.0014,
                   help="ft-odin: perturbation step on the backbone feature (default 0.0014)")


def baseline_kwargs(args: argparse.Namespace) -> dict:
    """Detector keyword arguments of ``args.method`` from the options of add_baseline_options."""
    method = args.method
    if method == "knn":
        if getattr(args, "knn_k", 10) < 1:
            raise ValueError(f"--knn-k must be >= 1, got {args.knn_k}")
        return {"k": getattr(args, "knn_k", 10)}
    if method not in FT_METHODS:
        return {}
    budget = getattr(args, "ft_budget", "resend")
    if budget != "resend":
        try:
            budget = float(budget)
        except ValueError:
            raise ValueError(f"--ft-budget must be 'resend' or seconds, got {budget!r}") from None
        if not math.isfinite(budget) or budget < 0:  # nan would never end the training
            raise ValueError(f"--ft-budget must be a finite number of seconds >= 0, got {budget}")
        if budget == 0:
            budget = None
    epochs = getattr(args, "ft_epochs", None)
    _check_baseline_numbers(args, method)
    if budget is None and epochs is None:
        raise ValueError("--ft-budget 0 (no time budget) needs --ft-epochs N")
    kw = {"budget": budget, "epochs": epochs, "hidden": getattr(args, "ft_hidden", None),
          "lr": getattr(args, "ft_lr", 1e-2), "budget_model": getattr(args, "model", None)}
    if method == "ft-odin":
        kw.update(temperature=getattr(args, "odin_temperature", 1000.0),
                  odin_eps=getattr(args, "odin_eps", 0.0014))
    return kw


def _check_baseline_numbers(args, method: str) -> None:
    """Refuse ft-* option values that would train nothing or silently misbehave."""
    epochs = getattr(args, "ft_epochs", None)
    if epochs is not None and epochs < 1:
        raise ValueError(f"--ft-epochs must be >= 1, got {epochs}")
    hidden = getattr(args, "ft_hidden", None)
    if hidden is not None and hidden < 0:
        raise ValueError(f"--ft-hidden must be >= 0 (0 = linear head), got {hidden}")
    lr = getattr(args, "ft_lr", 1e-2)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--ft-lr must be a finite number > 0, got {lr}")
    if method == "ft-odin":
        t = getattr(args, "odin_temperature", 1000.0)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"--odin-temperature must be a finite number > 0, got {t}")
        eps = getattr(args, "odin_eps", 0.0014)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"--odin-eps must be a finite number >= 0, got {eps}")

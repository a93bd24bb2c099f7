"""Command-line options of the baselines (knn, ft-*) and their conversion to detector arguments.

:data:`METHOD_HELP` is read from the ``description`` of each registered baseline;
:func:`add_baseline_options` adds the argparse group; :func:`baseline_kwargs` turns the parsed
options into the typed keyword arguments of :func:`resend_novelty.detectors.build_detector`.
"""

from __future__ import annotations

import argparse
import math

from ..detectors import BASELINES, DETECTORS

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
    """Detector keyword arguments of ``args.method`` from the options of add_baseline_options:
    the options its class declares (``cli_params``: {argparse dest: parameter}), checked."""
    params = DETECTORS[args.method].cli_params
    given = {dest: getattr(args, dest) for dest in params if hasattr(args, dest)}
    _check_baseline_numbers(given)
    if "ft_budget" in given:
        budget = given["ft_budget"]
        if budget != "resend":
            try:
                budget = float(budget)
            except ValueError:
                raise ValueError(f"--ft-budget must be 'resend' or seconds, got {budget!r}") from None
            if not math.isfinite(budget) or budget < 0:  # nan would never end the training
                raise ValueError(f"--ft-budget must be a finite number of seconds >= 0, got {budget}")
            if budget == 0:
                budget = None
        if budget is None and given.get("ft_epochs") is None:
            raise ValueError("--ft-budget 0 (no time budget) needs --ft-epochs N")
        given["ft_budget"] = budget
    return {params[dest]: value for dest, value in given.items()}


#: the numeric options of the baselines and what they must be: (check, requirement)
_NUMBER_RULES = {
    "knn_k": (lambda v: v >= 1, ">= 1"),
    "ft_epochs": (lambda v: v >= 1, ">= 1"),
    "ft_hidden": (lambda v: v >= 0, ">= 0 (0 = linear head)"),
    "ft_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "odin_temperature": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "odin_eps": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
}


def _check_baseline_numbers(given: dict) -> None:
    """Refuse option values that would train nothing or silently misbehave."""
    for dest, value in given.items():
        rule = _NUMBER_RULES.get(dest)
        if rule is not None and value is not None and not rule[0](value):
            raise ValueError(f"--{dest.replace('_', '-')} must be {rule[1]}, got {value}")

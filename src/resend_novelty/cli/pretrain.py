"""``resend pretrain``: relational pretraining (see :mod:`resend_novelty.training.loop`)."""

from __future__ import annotations


def add_parser(sub, name):
    from ..training.loop import add_arguments

    p = sub.add_parser(
        name,
        help="pretrain the relational model on a labelled reference set",
        description=(
            "Pretrain ReSeND's relational module on pairs of reference images (same class -> 1, "
            "different classes -> 0). Defaults follow the paper (LARS, lr 0.008, 500 warm-up "
            "steps, 4096 pairs a step, MSE). Multi-GPU: torchrun --nproc_per_node N -m "
            "resend_novelty.training.loop with the same options. Ctrl-C writes a checkpoint; --resume "
            "continues exactly."
        ),
    )
    add_arguments(p)
    return p


def run(args) -> int:
    from ..training.loop import run_from_args

    return run_from_args(args)

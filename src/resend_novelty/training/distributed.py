"""torch.distributed helpers for data-parallel pretraining.

A run started by ``torchrun --nproc_per_node N -m resend_novelty.cli pretrain ...`` sees
``WORLD_SIZE`` > 1 in its environment: :func:`init_distributed` then joins the process group
(NCCL on CUDA, else Gloo). Every rank builds the same global batch of pairs and takes its
shard; DDP averages the gradients.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "init_distributed", "is_main_process", "training_device",
           "all_reduce_sum", "shutdown_distributed"]


def is_distributed() -> bool:
    """A process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> tuple[int, int]:
    """Join the process group when launched with ``WORLD_SIZE`` > 1; returns ``(rank, world)``
    (``(0, 1)`` in a single process)."""
    wanted = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if wanted and not is_distributed():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0, or no process group."""
    return not is_distributed() or dist.get_rank() == 0


def training_device(requested: str | None = None) -> torch.device:
    """``requested``, else this process's GPU (``LOCAL_RANK``) if CUDA is available, else CPU;
    a CUDA device becomes the current one."""
    if requested:
        device = torch.device(requested)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of ``value`` over all ranks (``value`` itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return float(t)


def shutdown_distributed() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()

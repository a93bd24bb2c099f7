"""Measurement helpers for speed benchmarks: peak memory, thread count, GEMM rate, arithmetic.

- :class:`PeakMemory`: peak resident memory of this process (sampled in a thread) and peak GPU
  memory (``torch.cuda.max_memory_allocated``) over a ``with`` block;
- :class:`torch_threads`: torch's intra-op thread count set for a ``with`` block;
- :func:`gemm_gflops`: measured rate of a large fp32 matrix product of the scorer's shape;
- :func:`loop_macs` / :func:`batched_macs`: multiply-adds of one (test image, prototype) pair of
  the relational module, scored one image at a time (full forward) or batched
  (``RelationalModule.pairwise_logits``: shared work per image).
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

__all__ = ["current_rss", "PeakMemory", "torch_threads", "sync_device", "gemm_gflops",
           "loop_macs", "batched_macs"]


def current_rss() -> int | None:
    """Resident memory of this process in bytes (psutil, else /proc), None where unreadable."""
    try:
        import psutil  # optional

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def sync_device(device: torch.device) -> None:
    """Wait for the queued kernels of a CUDA device (no-op elsewhere), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak RSS of this process (sampled every ``interval`` s) and peak GPU memory in a block.

    After the block: ``rss_mb`` (peak), ``start_mb`` (RSS when the block began), ``gpu_mb``
    (None off CUDA). Where the current RSS cannot be read, falls back to ``ru_maxrss`` (peak of
    the process so far, not of the block).
    """

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.rss_mb: float | None = None
        self.gpu_mb: float | None = None
        self.start_mb: float | None = None

    def __enter__(self):
        self._peak = current_rss()
        self.start_mb = None if self._peak is None else self._peak / 2**20
        self._stop = threading.Event()
        if self._peak is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        if self._peak is not None:
            self._thread.join()
            rss = current_rss()
            self.rss_mb = max(self._peak, rss or 0) / 2**20
        else:  # ru_maxrss: KiB on Linux
            self.rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False

    def json(self) -> dict:
        return {"peak_rss_mb": self.rss_mb, "start_rss_mb": self.start_mb, "peak_gpu_mb": self.gpu_mb}


class torch_threads:
    """Set torch's intra-op thread count for a ``with`` block (``n`` None or 0: unchanged)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)
        return False


def gemm_gflops(dim: int, device: torch.device, rows: int = 12288) -> float:
    """Measured rate of a ``(rows x dim) @ (dim x 4 dim)`` fp32 matrix product (best of 5)."""
    a = torch.randn(rows, dim, device=device)
    w = torch.randn(dim, 4 * dim, device=device)
    a @ w
    best = float("inf")
    for _ in range(5):
        sync_device(device)
        t0 = time.perf_counter()
        a @ w
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * dim * 4 * dim / best / 1e9


def loop_macs(c: dict) -> float:
    """Multiply-adds of one pair in the one-at-a-time loop: two projections, full blocks.

    ``c``: the relational config as a dict (feature_dim, dim, depth, mlp_ratio).
    """
    d, r = c["dim"], c.get("mlp_ratio", 4.0)
    return 2 * c["feature_dim"] * d + 3 * c["depth"] * (4 + 2 * r) * d * d


def batched_macs(c: dict) -> float:
    """Multiply-adds of one pair in ``pairwise_logits`` (projections counted per image apart):
    first block without q/k/v (shared per image), last block for the label token only."""
    d, r, depth = c["dim"], c.get("mlp_ratio", 4.0), c["depth"]
    if depth == 1:
        return (1 + 2 * r) * d * d
    return (3 * (1 + 2 * r) + 3 * (depth - 2) * (4 + 2 * r) + (8 + 2 * r)) * d * d

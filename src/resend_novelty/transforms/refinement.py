"""Test-time prototype refinement (not in the paper): class prototypes moved towards the test
domain, from unlabelled test features.

:class:`PrototypeRefiner` runs ``steps`` steps of

    a_i = argmax_c u_ic;  m_c = mean of the unit test features assigned to c whose u_ic is in
    the top ``fraction`` of those assigned to c;
    p_c <- unit(keep * unit(p0_c) + (1 - keep) * unit(m_c))

(p0 = the support prototypes, u = the detector's own similarities to the current prototypes).
Only the most confident share of each class moves its prototype, and every step stays anchored
to the support prototype, so an unknown class in the test batch pulls little. A class no test
image is assigned to keeps its prototype. The refined prototypes are unit vectors: only
detectors whose similarities depend on a prototype's direction alone can use them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["REFINE_FRACTION", "REFINE_KEEP", "PrototypeRefiner"]

# chosen on the synthetic proxy only (benchmarks/proxy_rejected.py, confirmed on fresh proxy
# episodes; never on PACS)
REFINE_FRACTION = 0.3  # q: share of the test images assigned to a class that move its prototype
REFINE_KEEP = 0.75  # lambda: weight kept on the support prototype at every step

Similarities = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PrototypeRefiner:
    """``steps`` refinement steps (0 = off), see the module docstring; validated up front."""

    def __init__(self, steps: int = 0, fraction: float = REFINE_FRACTION,
                 keep: float = REFINE_KEEP):
        if steps is None or int(steps) < 0:
            raise ValueError(f"refine must be a number of steps >= 0, got {steps!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"refine_fraction must be in (0, 1], got {fraction}")
        if not 0.0 <= float(keep) <= 1.0:
            raise ValueError(f"refine_keep must be in [0, 1], got {keep}")
        self.steps = int(steps)
        self.fraction, self.keep = float(fraction), float(keep)

    def refine(self, prototypes: torch.Tensor, features: torch.Tensor,
               similarities: Similarities) -> torch.Tensor:
        """Refined unit prototypes ``(K, D)`` from the support ``prototypes`` and the
        (normalised) test ``features`` ``(N, D)``; ``similarities(features, prototypes)`` gives
        u ``(N, K)``."""
        p0 = F.normalize(prototypes, dim=1)
        x = F.normalize(features, dim=1)
        p = p0
        for _ in range(self.steps):
            conf, assigned = similarities(features, p).max(dim=1)
            m = p.clone()
            for c in range(p.shape[0]):
                rows = (assigned == c).nonzero().flatten()
                if len(rows):
                    k = max(1, round(self.fraction * len(rows)))
                    m[c] = x[rows[conf[rows].topk(k).indices]].mean(0)
            p = F.normalize(self.keep * p0 + (1 - self.keep) * F.normalize(m, dim=1), dim=1)
        return p

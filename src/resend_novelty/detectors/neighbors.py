"""Nearest support images per class by cosine, in chunks of test rows (chunked torch top-k).

The support set is held once as a matrix of unit rows and a padded ``(K, n_max)`` matrix of
the support rows of each class (:class:`SupportIndex`). A query block of ``rows`` test features
costs one ``(rows, S)`` cosine matrix and one gather to ``(rows, K, n_max)``; :meth:`rows_per_chunk`
sizes the blocks so that these stay below ``budget`` floats, whatever the number of test images.
A torch matrix product is already BLAS-bound here (one pass over the support per block), so no
approximate index (faiss) is needed at the sizes measured in ``benchmarks/speed.py`` (up to
100,000 support images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SupportIndex", "CHUNK_FLOATS", "masked_mean"]

CHUNK_FLOATS = 1 << 22  # floats per query block (16 MiB of float32): cosine + gathered matrix


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the last dimension where ``valid`` (0 where none is)."""
    return values.where(valid, 0).sum(-1) / valid.sum(-1).clamp_min(1)


class SupportIndex:
    """Unit support rows and their classes, for chunked per-class top-k cosine queries.

    ``support`` ``(S, D)`` features, ``class_index`` ``(S,)`` class of each row in
    ``0..n_classes-1``. Attributes: ``unit`` ``(S, D)`` (L2-normalised rows), ``class_index``,
    ``members`` ``(K, n_max)`` support rows of each class padded with ``S`` (a column of -inf
    in the gathered cosines), ``counts`` ``(K,)``.
    """

    def __init__(self, support: torch.Tensor, class_index, n_classes: int,
                 budget: int = CHUNK_FLOATS):
        self.unit = F.normalize(support.float(), dim=1)
        self.class_index = torch.as_tensor(class_index, dtype=torch.long)
        if self.class_index.shape != (support.shape[0],):
            raise ValueError(f"{support.shape[0]} support rows but {self.class_index.numel()} "
                             "class indices")
        n = self.unit.shape[0]
        self.counts = torch.bincount(self.class_index, minlength=n_classes)
        n_max = max(1, int(self.counts.max())) if n else 1
        order = torch.argsort(self.class_index, stable=True)
        starts = torch.cumsum(self.counts, 0) - self.counts
        slot = torch.arange(n) - starts[self.class_index[order]]
        self.members = torch.full((n_classes, n_max), n, dtype=torch.long)
        self.members[self.class_index[order], slot] = order
        self.budget = int(budget)

    @property
    def n_classes(self) -> int:
        return self.members.shape[0]

    def to(self, device) -> "SupportIndex":
        self.unit = self.unit.to(device)
        self.members = self.members.to(device)
        self.class_index = self.class_index.to(device)
        return self

    def rows_per_chunk(self, classes: int | None = None) -> int:
        """Test rows per block so that the cosines ``(rows, S)`` and the gathered per-class
        cosines ``(rows, classes, n_max)`` stay below ``budget`` floats."""
        classes = self.n_classes if classes is None else classes
        per_row = self.unit.shape[0] + 1 + classes * self.members.shape[1]
        return max(1, self.budget // per_row)

    def cosines(self, queries: torch.Tensor, exclude: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``(rows, S + 1)`` cosines of ``queries`` to every support row, plus a last column
        of -inf (the padding of :attr:`members`); ``exclude[r]``: a support row that may not
        be a neighbour of query r (set to -inf; leave-one-out)."""
        q = F.normalize(queries.to(self.unit.device).float(), dim=1)
        cos = q @ self.unit.T
        if exclude is not None:
            cos[torch.arange(cos.shape[0], device=cos.device), exclude.to(cos.device)] = float("-inf")
        return torch.cat([cos, cos.new_full((cos.shape[0], 1), float("-inf"))], dim=1)

    def class_topk(self, cos: torch.Tensor, k: int, classes: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest cosines of each query to the support rows of each class.

        ``cos`` from :meth:`cosines`; ``classes``: ``(rows, M)`` classes per query (default:
        every class). Returns ``(values, rows)`` of shape ``(rows, M or K, min(k, n_max))``:
        -inf values (padding of a class with fewer than k images, or an excluded row) mark
        slots that are not neighbours."""
        kk = min(int(k), self.members.shape[1])
        if classes is None:
            gathered = cos[:, self.members]  # (rows, K, n_max)
            members = self.members.expand(cos.shape[0], -1, -1)
        else:
            members = self.members[classes]  # (rows, M, n_max)
            gathered = cos.gather(1, members.flatten(1)).view(members.shape)
        top = gathered.topk(kk, dim=2)
        return top.values, members.gather(2, top.indices)

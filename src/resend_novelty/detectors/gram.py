"""Gram-matrix baseline (Sastry & Oore, ICML 2020; paper Tables 2 and 3).

:class:`GramStats` wraps a backbone: images -> Gram statistics of intermediate feature maps, a
cacheable feature like any backbone output. :class:`GramDetector` (``gram``) scores the
deviations of those statistics from the per-class ranges seen in the support set, with the
class predicted by the nearest prototype (cosine); :class:`FineTunedGramDetector` (``ft-gram``)
predicts the class with a head fine-tuned on the support set
(:class:`~resend_novelty.detectors.finetuned.FineTunedDetector`). Neither needs pytorch-ood
for the Gram part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..features import InputFeatures, input_features
from .finetuned import FT_CLI_PARAMS, FineTunedDetector
from .calibration import NoLOOCalibrationMixin
from .support import SupportDetector

__all__ = ["GramStats", "GramDetector", "FineTunedGramDetector", "gram_statistics"]


_GRAM_LAYERS = {
    # last block of each stage with >= 24 channels (24, 40, 80, 112, 192, 320 channels)
    "efficientnet_lite0": ["net._blocks.2", "net._blocks.4", "net._blocks.7", "net._blocks.10",
                           "net._blocks.14", "net._blocks.15"],
    "resnet18": ["net.layer1", "net.layer2", "net.layer3", "net.layer4"],
}


def gram_statistics(fmap: torch.Tensor, p: int) -> torch.Tensor:
    """Row sums of the p-th order Gram matrix (F^p F^p^T)^(1/p) of feature maps (B, C, ...).

    Sastry & Oore (ICML 2020), eq. 1: G_l^p = (F_l^p F_l^p^T)^(1/p), F^p element-wise, the
    1/p-th root signed; as in their code (and pytorch-ood) only the row sums are kept. Computed
    as F^p (F^p^T 1): O(C * HW) instead of O(C^2 * HW).
    """
    f = fmap.detach().double().flatten(2) ** p  # (B, C, HW)
    g = f @ f.sum(dim=1, keepdim=True).transpose(1, 2)  # (B, C, 1): sum_j sum_t f_it f_jt
    g = g.squeeze(2)
    return g.sign() * g.abs() ** (1.0 / p)


class GramStats(Backbone):
    """Backbone wrapper: images -> Gram statistics of intermediate feature maps (cacheable).

    Output: for each hooked layer l (``layers``: module names of ``base``) and pole p
    (``poles``), the C_l row sums of :func:`gram_statistics`, concatenated (layer-major).
    """

    def __init__(self, base: Backbone, layers: Sequence[str] | None = None,
                 poles: Sequence[int] = (1, 2, 3, 4, 5)):
        super().__init__(base.preprocessing)
        self.base = base
        if layers is None:
            layers = _GRAM_LAYERS.get(base.name)
        if layers is None:  # any other backbone: every convolution
            layers = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
        modules = dict(base.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing or not layers:
            raise ValueError(f"backbone {base.name} has no module(s) {missing or layers} to hook")
        self.layers, self.poles = list(layers), tuple(int(p) for p in poles)
        self.name = f"{base.name}-gram"
        self._outputs: list[torch.Tensor] = []
        self._recording = False
        for n in self.layers:
            modules[n].register_forward_hook(self._record)
        with torch.no_grad():
            was = base.training
            base.eval()
            c = base.preprocessing.crop
            self(torch.zeros(1, 3, c, c))
            base.train(was)
        self.channels = self._channels
        self.feature_dim = sum(self.channels) * len(self.poles)

    @property
    def cache_namespace(self) -> str:
        return (f"{self.base.cache_namespace}|gram-v1|layers={','.join(self.layers)}"
                f"|poles={','.join(map(str, self.poles))}")

    def _record(self, module, inputs, output) -> None:
        if self._recording:  # only while this wrapper runs the base backbone
            self._outputs.append(output)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._outputs, self._recording = [], True
        try:
            self.base(images)
        finally:
            self._recording = False
        outs, self._outputs = self._outputs, []
        if len(outs) != len(self.layers):
            raise RuntimeError(f"expected {len(self.layers)} hooked outputs, got {len(outs)}")
        self._channels = [o.shape[1] for o in outs]
        stats = [gram_statistics(o, p) for o in outs for p in self.poles]
        return torch.cat(stats, dim=1).float()


class GramDetector(NoLOOCalibrationMixin, SupportDetector):
    """Gram-matrix deviations (Sastry & Oore, ICML 2020) of intermediate backbone feature maps.

    Features: ``[pooled backbone feature (D) | Gram statistics (S)]`` (both cached on disk). Fit:
    for each class c, the min and max of every Gram statistic over 90% of its support images
    (seeded split); the other 10% estimate the expected deviation E_l of each layer (as in
    pytorch-ood's ``Gram``). Score of x with predicted class c:
    ``Delta(x) = sum_l delta_l(x) / E_l``, ``delta_l = sum_{p, entries} relu(min - g)/|min| +
    relu(g - max)/|max|``; normality = -Delta. The class c is the nearest prototype (cosine on
    the pooled feature) or, with ``fine_tune=True`` (``ft-gram``), the argmax of a head
    fine-tuned on the pooled features (same options and budget as :class:`FineTunedDetector`).
    """

    name = "gram"
    description = "Gram-matrix deviations of intermediate feature maps (runs the backbone again)"

    def __init__(self, fine_tune: bool = False, layers: Sequence[str] | None = None,
                 poles: Sequence[int] = (1, 2, 3, 4, 5), holdout: float = 0.1, seed: int = 0,
                 **kwargs):
        ft_keys = ("budget", "epochs", "hidden", "lr", "weight_decay", "ft_batch_size",
                   "budget_model")
        ft_kwargs = {k: kwargs.pop(k) for k in ft_keys if k in kwargs}
        super().__init__(**kwargs)
        if self.center:
            raise ValueError("GramDetector does not support center=True (Gram statistics of "
                             "centred features are meaningless)")
        self.fine_tune = fine_tune
        self._ft_kwargs = ft_kwargs
        self.layers, self.poles = layers, tuple(poles)
        self.holdout, self.seed = holdout, seed
        self._gram: GramStats | None = None

    # ------------------------------------------------------------------ features
    @property
    def gram_backbone(self) -> GramStats:
        if self._gram is None:
            # one wrapper (and one set of hooks) per backbone, layers and poles
            bb = self.backbone
            cache = bb.__dict__.setdefault("_gram_stats", {})
            key = (None if self.layers is None else tuple(self.layers), self.poles)
            if key not in cache:
                cache[key] = GramStats(bb, self.layers, self.poles)
            self._gram = cache[key]
        return self._gram

    def input_features(self, x, desc: str = "features") -> InputFeatures:
        """``[pooled backbone feature | Gram statistics]`` of ``x`` (images: both in one pass)."""
        if isinstance(x, torch.utils.data.DataLoader):
            raise TypeError("GramDetector takes image paths, folders, datasets or tensors")
        return input_features(x, self.backbone, cache=self.cache, batch_size=self.batch_size,
                              num_workers=self.num_workers, device=self.device,
                              engine=getattr(self, "engine", "auto"),
                              progress=self.progress, desc=desc,
                              extra=[(self.gram_backbone, "Gram statistics")])

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.backbone.feature_dim
        return features[:, :d], features[:, d:].double()

    # ------------------------------------------------------------------ fit / score
    def fit_features(self, features, labels, domains=None) -> "GramDetector":
        features = torch.as_tensor(features, dtype=torch.float32)
        d = self.backbone.feature_dim
        gb = self.gram_backbone
        if features.ndim != 2 or features.shape[1] != d + gb.feature_dim:
            raise ValueError(
                f"Gram features must be (N, {d} + {gb.feature_dim}) [pooled | Gram statistics], "
                f"got {tuple(features.shape)}: use this detector's own features()"
            )
        super().fit_features(features, labels, domains=domains)
        pooled, stats = self._split(features)
        idx = np.searchsorted(self.classes_, np.asarray(labels))
        rng = np.random.default_rng(self.seed)
        sizes = [c * len(self.poles) for c in gb.channels]
        bounds = np.cumsum([0, *sizes])
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        mins, maxs, val = [], [], []
        for k in range(len(self.classes_)):
            members = np.flatnonzero(idx == k)
            members = members[rng.permutation(len(members))]
            n_val = int(self.holdout * len(members)) if len(members) >= 10 else 0
            fit_rows = members[n_val:]
            mins.append(stats[fit_rows].min(dim=0).values)
            maxs.append(stats[fit_rows].max(dim=0).values)
            val.extend((int(r), k) for r in members[:n_val])
        self._min, self._max = torch.stack(mins), torch.stack(maxs)
        self._norm = torch.ones(len(self._slices), dtype=torch.float64)
        if val:
            rows = torch.as_tensor([r for r, _ in val])
            cls = torch.as_tensor([k for _, k in val])
            dev = self._layer_deviations(stats[rows], cls)  # (n_val, L)
            mean = dev.mean(dim=0)
            self._norm = torch.where(mean > 0, mean, torch.ones_like(mean))
        self._ft = None
        if self.fine_tune:
            self._ft = FineTunedDetector(score="msp", backbone=None, device=self.device,
                                         progress=False, **self._ft_kwargs)
            self._ft.fit_features(pooled, np.asarray(labels))
        return self

    def _layer_deviations(self, stats: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        lo, hi = self._min[cls], self._max[cls]
        dev = F.relu(lo - stats) / (lo.abs() + 1e-6) + F.relu(stats - hi) / (hi.abs() + 1e-6)
        return torch.stack([dev[:, s].sum(dim=1) for s in self._slices], dim=1)

    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        """Closed-set scores used for the predicted class: cosine to the pooled part of the
        prototypes (default ``prototypes_``), or the fine-tuned head's logits."""
        pooled, _ = self._split(torch.as_tensor(features, dtype=torch.float32))
        if self._ft is not None:
            return self._ft.similarities_features(pooled)
        d = self.backbone.feature_dim
        p = self.prototypes_ if prototypes is None else prototypes
        return F.normalize(pooled, dim=1) @ F.normalize(p[:, :d], dim=1).T

    def score_features(self, features) -> np.ndarray:
        features = self.prepare_features(features)
        _, stats = self._split(features)
        cls = self.similarities_features(features).argmax(dim=1)
        delta = (self._layer_deviations(stats, cls) / self._norm).sum(dim=1)
        return (-delta).float().numpy()

    @property
    def ft_info_(self) -> dict:
        return {} if self._ft is None else self._ft.ft_info_



class FineTunedGramDetector(GramDetector):
    """``ft-gram``: Gram deviations, class predicted by a head fine-tuned on the support set."""

    name = "ft-gram"
    fine_tunes = True
    cli_params = FT_CLI_PARAMS
    description = "Gram deviations, class predicted by the fine-tuned head"

    def __init__(self, fine_tune: bool = True, **kwargs):
        super().__init__(fine_tune=fine_tune, **kwargs)

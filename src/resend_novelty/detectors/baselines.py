"""Baselines of the paper (Tables 2 and 3) under the detector API of :mod:`resend_novelty.detectors.base`.

Every class here is a :class:`~resend_novelty.detectors.base.PrototypeDetector`: ``fit`` /
``fit_features`` on a labelled support set, ``score`` / ``score_features`` give a *normality*
(higher = more likely a known class), ``nearest_class_features`` the closed-set prediction. They
are registered in :data:`resend_novelty.detectors.base.DETECTORS`, so ``build_detector(name)`` and
``resend benchmark SETTING --method NAME`` work for all of them.

Without fine-tuning (paper Table 2 and the "w/o fine-tuning" rows of Table 3):

- ``knn`` (:class:`KNNDetector`): u_k = mean cosine similarity of the test feature to its ``k``
  nearest support features of class k (all of them if the class has fewer); normality =
  max_k u_k. A class-wise variant of deep-kNN (Sun et al., ICML 2022), whose score is the
  distance to the k-th nearest support feature regardless of class; the class-wise form also
  gives a closed-set prediction (argmax_k u_k). Hand-written (a few lines).
- ``mahalanobis`` (:class:`MahalanobisDetector`): class means and a tied covariance of the support
  features (Lee et al., NeurIPS 2018; fitted by pytorch-ood's ``Mahalanobis``); u_k =
  -1/2 (f - mu_k)^T Sigma^-1 (f - mu_k), normality = max_k u_k.
- ``gram`` (:class:`GramDetector`): Gram-matrix deviations of intermediate feature maps (Sastry &
  Oore, ICML 2020), class predicted by the nearest prototype (cosine).

Fine-tuning based (paper Table 3), :class:`FineTunedDetector`. **Deviation from the paper**: the
paper fine-tunes the whole ImageNet backbone plus a new classifier on the support set; on the
CPU-only machines of this project that is infeasible, so only a new classifier head is trained,
on the cached frozen backbone features of the support set ("head-only fine-tuning on cached
features"). The paper's budget rule is kept: by default (``budget="resend"``) the head trains
for the wall time that ReSeND takes to evaluate the same target (prototypes of the support
features + scoring of the test features; backbone time excluded on both sides because features
are cached; best of two timings), measured on the same machine right before training. The head
is ``standardise -> [Linear(D, hidden) -> ReLU] -> Linear(., K)`` (``hidden=0``: linear, the
default), trained with AdamW and cross-entropy in mini-batches. Scores (pytorch-ood detectors
applied to the model "head over features"; normality = minus their outlier score):

- ``ft-msp``: max softmax probability (Hendrycks & Gimpel, ICLR 2017).
- ``ft-maxlogit``: max logit (Hendrycks et al., ICML 2022).
- ``ft-energy``: minus the free energy, T logsumexp(logits / T), T = 1 (Liu et al., NeurIPS 2020).
- ``ft-odin``: temperature scaling (T = 1000) + input perturbation (Liang et al., ICLR 2018).
  The perturbation step is taken on the **backbone feature** (the head's input; eps in feature
  units), not on the pixels: the backbone is frozen and not differentiated here.
- ``ft-gradnorm``: L1 norm of the gradient of the KL divergence to the uniform distribution
  w.r.t. the weights of the last layer (Huang et al., NeurIPS 2021).
- ``ft-mahalanobis``: Mahalanobis on the penultimate representation of the fine-tuned model.
  With a linear head that is the (standardised) frozen feature itself, i.e. the same as
  ``mahalanobis``; so this method uses a head with one hidden layer (``hidden=512``) by default.
- ``ft-gram``: Gram deviations with the class predicted by the fine-tuned head (the backbone is
  frozen, so the Gram statistics themselves are those of ``gram``).

pytorch-ood is an optional dependency (``pip install 'resend-novelty[ood]'``), needed by
``mahalanobis`` and the ``ft-*`` methods; ``knn`` and ``gram`` do not need it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, build_backbone
from .base import DETECTORS, PrototypeDetector
from ..features.extract import check_features, extract_features

__all__ = [
    "KNNDetector",
    "MahalanobisDetector",
    "FineTunedDetector",
    "GramDetector",
    "GramStats",
    "resend_eval_seconds",
    "train_head",
    "BASELINES",
    "add_baseline_options",
    "baseline_kwargs",
]


def _pytorch_ood():
    try:
        import pytorch_ood.detector as d
    except ImportError as exc:
        raise ImportError(
            "this baseline uses pytorch-ood: pip install 'resend-novelty[ood]' (or pytorch-ood)"
        ) from exc
    return d


class _NoLOOCalibration:
    """Mixin for detectors whose normality is not a function of the class similarities u.

    Their ``score_features`` is their own, so the shortcut of the base class that derives the
    normality and the nearest class from one pass over u is redirected to it; and leave-one-out
    calibration (defined for prototype-style detectors) is refused.
    """

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        return self.score_features(features), self.nearest_class_features(features)

    def calibrate(self, *args, **kwargs):
        raise ValueError(
            f"leave-one-out threshold calibration is not available for method {self.name!r} "
            "(defined for the prototype methods resend/cosine/euclidean/knn/mahalanobis); "
            "pass an explicit threshold"
        )

    calibrate_features = calibrate


# =============================================================================== kNN
class KNNDetector(PrototypeDetector):
    """u_k = mean cosine to the ``k`` nearest support features of class k; normality = max_k u_k."""

    name = "knn"

    def __init__(self, k: int = 10, chunk: int = 1024, **kwargs):
        super().__init__(**kwargs)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.chunk = int(chunk)

    def fit_features(self, features, labels, domains=None) -> "KNNDetector":
        super().fit_features(features, labels, domains=domains)
        feats = self._support_normalized  # domain-normalised like the test features (center=)
        idx = np.searchsorted(self.classes_, np.asarray(labels))
        self._support = F.normalize(feats, dim=1)
        self._members = [torch.as_tensor(np.flatnonzero(idx == k)) for k in range(len(self.classes_))]
        return self

    def _class_means(self, sims: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) similarities to the support -> (N, K) mean of the top-k of each class."""
        out = torch.empty(sims.shape[0], len(self.classes_))
        for k, members in enumerate(self._members):
            s = sims[:, members]
            n = s.shape[1]
            if exclude is None or n > self.k:
                if exclude is not None:  # leave-one-out: an image is not its own neighbour
                    s = s.masked_fill(exclude[:, members], -math.inf)  # >= k others remain
                out[:, k] = s.topk(min(self.k, n), dim=1).values.mean(dim=1)
            else:  # a class of <= k images: the mean over all of them, minus the excluded one
                ex = exclude[:, members]
                count = (n - ex.sum(dim=1)).clamp_min(0)
                mean = s.masked_fill(ex, 0.0).sum(dim=1) / count.clamp_min(1)
                out[:, k] = torch.where(count > 0, mean, torch.full_like(mean, -math.inf))
        return out

    def similarities_features(self, features) -> torch.Tensor:
        q = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
        return torch.cat([self._class_means(q[i : i + self.chunk] @ self._support.T)
                          for i in range(0, len(q), self.chunk)]) if len(q) else \
            torch.empty(0, len(self.classes_))

    def loo_scores_features(self, features, labels, block: int = 16):
        """Leave-one-out scores of the support images: each is excluded from its own neighbours.

        ``features``/``labels`` must be the support set the detector was fitted on.
        """
        features = self._check_fitted(features)
        labels = np.asarray(labels)
        if features.shape[0] != self._support.shape[0]:
            raise ValueError("kNN leave-one-out scores need the fitted support features")
        idx = np.searchsorted(self.classes_, labels)
        counts = np.bincount(idx, minlength=len(self.classes_))
        used = counts[idx] >= 2
        scores = []
        q = F.normalize(features, dim=1)
        for i in range(0, len(q), self.chunk):
            rows = torch.arange(i, min(i + self.chunk, len(q)))
            exclude = torch.zeros(len(rows), len(q), dtype=torch.bool)
            exclude[torch.arange(len(rows)), rows] = True
            scores.append(self._class_means(q[rows] @ self._support.T, exclude))
        u = torch.cat(scores)[torch.as_tensor(used)]
        return self.normality_from_similarities(u).numpy(), used


# =============================================================================== Mahalanobis
def _fit_mahalanobis(ood, z: torch.Tensor, y: torch.Tensor):
    """pytorch-ood's Mahalanobis fitted in float64 (it allocates its statistics in the default
    dtype; the inverse of a 1280-d scatter matrix is unreliable in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return ood.Mahalanobis(None).fit_features(z.double(), y)
    finally:
        torch.set_default_dtype(old)


class MahalanobisDetector(PrototypeDetector):
    """Class-conditional Gaussians with a tied covariance (Lee et al. 2018), via pytorch-ood.

    u_k = -1/2 (f - mu_k)^T Sigma^-1 (f - mu_k), normality = max_k u_k. pytorch-ood's
    ``Mahalanobis.fit_features`` estimates mu_k and the precision Sigma^-1 (its Sigma is the
    pooled within-class scatter plus 1e-6 I; computed here in float64).
    """

    name = "mahalanobis"

    def fit_features(self, features, labels, domains=None) -> "MahalanobisDetector":
        super().fit_features(features, labels, domains=domains)
        ood = _pytorch_ood()
        idx = torch.as_tensor(np.searchsorted(self.classes_, np.asarray(labels)))
        self._maha = _fit_mahalanobis(ood, self._support_normalized.double(), idx)
        self.precision_ = self._maha.precision.double()
        return self

    def similarities_features(self, features) -> torch.Tensor:
        # class means = prototypes_ (also during leave-one-out, where prototypes_ is swapped)
        # (z - mu)^T P (z - mu) = z^T P z - 2 z^T P mu + mu^T P mu: one D x D product per input
        z = torch.as_tensor(features, dtype=torch.float64)
        mu = self.prototypes_.double()
        zp = z @ self.precision_
        mp = mu @ self.precision_
        d2 = (zp * z).sum(1, keepdim=True) - 2 * zp @ mu.T + (mp * mu).sum(1)[None, :]
        return (-0.5 * d2).float()


# =============================================================================== fine-tuning
def resend_eval_seconds(model, support_features, support_labels, test_features,
                        device=None, repeats: int = 2) -> float:
    """Wall time of a ReSeND evaluation (prototypes + scoring of cached features), best of N."""
    from .base import ReSeNDDetector

    best = math.inf
    for _ in range(max(1, repeats)):
        det = ReSeNDDetector(model=model, backbone=None, device=device, progress=False)
        t0 = time.perf_counter()
        det.fit_features(support_features, support_labels)
        det.score_features(test_features)
        best = min(best, time.perf_counter() - t0)
    return best


class _Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x):
        return (x - self.mean) / self.std


def train_head(features: torch.Tensor, targets: torch.Tensor, n_classes: int, *,
               seconds: float | None = None, epochs: int | None = None, hidden: int = 0,
               lr: float = 1e-2, weight_decay: float = 5e-4, batch_size: int = 128,
               seed: int = 0, device=None, threads_cpu: int | None = 1
               ) -> tuple[nn.Sequential, dict]:
    """Train a new classifier head on (frozen) features with cross-entropy.

    Stops after ``seconds`` of wall time (checked after every step; at least one step) or after
    ``epochs`` epochs, whichever comes first. Returns ``(head, info)``, ``info`` with the
    seconds, steps and (fractional) epochs actually done and the final training accuracy.
    """
    if seconds is None and epochs is None:
        raise ValueError("give a time budget (seconds) or a number of epochs")
    device = torch.device(device or "cpu")
    x = torch.as_tensor(features, dtype=torch.float32).to(device)
    y = torch.as_tensor(targets, dtype=torch.long).to(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict(
            norm=_Standardize(x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)))
        width = x.shape[1]
        if hidden:
            layers["hidden"] = nn.Linear(width, hidden)
            layers["act"] = nn.ReLU()
            width = hidden
        layers["fc"] = nn.Linear(width, n_classes)
        if not hidden:  # logistic regression: start from uniform predictions
            nn.init.zeros_(layers["fc"].weight)
            nn.init.zeros_(layers["fc"].bias)
        head = nn.Sequential(layers).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    max_steps = math.inf if epochs is None else int(epochs) * steps_per_epoch
    head.train()
    # the head's matrices are small: on CPU one thread is fastest (no synchronisation between
    # threads, which dominates on a loaded machine); restored afterwards
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads_cpu:
        torch.set_num_threads(threads_cpu)
    t0 = time.perf_counter()
    step = 0
    try:
        with torch.enable_grad():
            while step < max_steps:
                if step % steps_per_epoch == 0:
                    perm = torch.randperm(n, generator=gen).to(device)
                b = perm[(step % steps_per_epoch) * batch_size:][:batch_size]
                loss = F.cross_entropy(head(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if seconds is not None and time.perf_counter() - t0 >= seconds:
                    break
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    head.eval()
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean())
    info = {"seconds": elapsed, "steps": step, "epochs": step / steps_per_epoch,
            "train_accuracy": acc}
    return head, info


class FineTunedDetector(_NoLOOCalibration, PrototypeDetector):
    """A new classifier head fine-tuned on the support features, scored by an OOD detector.

    ``score``: msp | maxlogit | energy | odin | gradnorm | mahalanobis. ``budget``: ``"resend"``
    (the wall time of a ReSeND evaluation of the same target, measured when the test features
    are first scored, with ``budget_model`` - a relational model, a checkpoint path, or None for
    the shipped checkpoint), a number of seconds, or None (then ``epochs`` is required).
    ``epochs`` caps the training (exactly that many epochs when ``budget`` is None). After
    training, ``ft_info_`` holds the budget and the seconds/steps/epochs done.
    """

    name = "ft"
    SCORES = ("msp", "maxlogit", "energy", "odin", "gradnorm", "mahalanobis")
    default_score = "msp"
    default_hidden = 0

    def __init__(self, score: str | None = None, budget: str | float | None = "resend",
                 epochs: int | None = None, hidden: int | None = None, lr: float = 1e-2,
                 weight_decay: float = 5e-4, ft_batch_size: int = 128, seed: int = 0,
                 temperature: float | None = None, odin_eps: float = 0.0014,
                 budget_model=None, **kwargs):
        super().__init__(**kwargs)
        self.score_name = score or self.default_score
        if self.score_name not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {self.score_name!r}")
        if budget is not None and budget != "resend":
            budget = float(budget)  # seconds (a number or a numeric string)
        if budget is None and epochs is None:
            raise ValueError("fine-tuning needs a budget ('resend' or seconds) or a number of epochs")
        if isinstance(budget, float) and budget <= 0:
            raise ValueError(f"the fine-tuning budget must be positive, got {budget} s")
        self.budget = budget
        self.epochs = epochs
        self.hidden = self.default_hidden if hidden is None else int(hidden)
        self.lr, self.weight_decay, self.ft_batch_size, self.seed = lr, weight_decay, ft_batch_size, seed
        self.temperature = (1000.0 if self.score_name == "odin" else 1.0) if temperature is None \
            else float(temperature)
        self.odin_eps = odin_eps
        self.budget_model = budget_model
        _pytorch_ood()  # fail early if missing

    # ------------------------------------------------------------------ training
    def head_features(self, features: torch.Tensor) -> torch.Tensor:
        """The part of the features the head is trained on (all of them here)."""
        return features

    def fit_features(self, features, labels, domains=None) -> "FineTunedDetector":
        super().fit_features(features, labels, domains=domains)
        feats = self.head_features(self._support_normalized)  # domain-normalised (center=)
        self._ft_data = (feats, torch.as_tensor(np.searchsorted(self.classes_, np.asarray(labels))),
                         np.asarray(labels))
        self.head_ = None
        self.ft_info_ = {}
        if self.budget != "resend":
            self._train(self.budget)
        return self

    def _budget_seconds(self, test_features: torch.Tensor) -> float:
        model = self.budget_model
        if not isinstance(model, nn.Module):
            from ..models.checkpoint import load_checkpoint

            model = self.budget_model = load_checkpoint(model)
        feats, _, labels = self._ft_data
        dim, feats_dim = model.config.feature_dim, feats.shape[1]
        self._budget_note = ""
        if feats_dim != dim:
            # the budget model reads other features (e.g. the shipped Lite0+Lite1 checkpoint next
            # to a Lite0 head): its evaluation time depends on the numbers of images and on its
            # own sizes, not on the feature values, so it is timed on seeded stand-in features of
            # its own dimension (same counts)
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(feats.shape[0], dim, generator=g)
            test_features = torch.randn(test_features.shape[0], dim, generator=g)
            self._budget_note = (f" (timed on stand-in features of the budget model's dimension, "
                                 f"{dim}; the head reads {feats_dim}-d features)")
        return resend_eval_seconds(model, feats, labels, test_features, device=self.device)

    def _train(self, seconds: float | None) -> None:
        feats, targets, _ = self._ft_data
        self.head_, info = train_head(
            feats, targets, len(self.classes_), seconds=seconds, epochs=self.epochs,
            hidden=self.hidden, lr=self.lr, weight_decay=self.weight_decay,
            batch_size=self.ft_batch_size, seed=self.seed, device=self.device)
        self.ft_info_ = {"budget_s": seconds, **info, "hidden": self.hidden}
        for p in self.head_.parameters():
            p.requires_grad_(False)
        if self.score_name == "mahalanobis":
            penult = self._penultimate
            with torch.no_grad():
                z = penult(feats.to(self.device)).double()
            self._maha = _fit_mahalanobis(_pytorch_ood(), z, targets.to(self.device))

    def _ensure_trained(self, test_features: torch.Tensor) -> None:
        if getattr(self, "head_", None) is None:
            if not hasattr(self, "_ft_data"):
                raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
            seconds = self._budget_seconds(test_features)
            self._train(seconds)
            self.ft_info_["budget_rule"] = ("ReSeND evaluation time of this target"
                                            + self._budget_note)

    def _penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_[:-1](x)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def similarities_features(self, features) -> torch.Tensor:
        x = self.head_features(torch.as_tensor(features, dtype=torch.float32))
        self._ensure_trained(x)
        return self.head_(x.to(self.device)).float().cpu()

    def normality_features(self, features: torch.Tensor) -> torch.Tensor:
        x = self.head_features(features)
        self._ensure_trained(x)
        x = x.to(self.device)
        ood = _pytorch_ood()
        head, name, t = self.head_, self.score_name, self.temperature
        if name == "mahalanobis":
            with torch.no_grad():
                return -self._maha.predict_features(self._penultimate(x).double()).float().cpu()
        if name == "msp":
            det = ood.MaxSoftmax(head, t=t)
        elif name == "maxlogit":
            det = ood.MaxLogit(head)
        elif name == "energy":
            det = ood.EnergyBased(head, t=t)
        elif name == "odin":
            det = ood.ODIN(head, eps=self.odin_eps, temperature=t)
        else:  # gradnorm, w.r.t. the last layer's weights (as in the paper)
            det = ood.GradNorm(head, param_filter=lambda n: n == "fc.weight", temperature=t)
        out = []
        for i in range(0, len(x), 1024):
            out.append(-det.predict(x[i : i + 1024]).detach().float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def score_features(self, features) -> np.ndarray:
        return self.normality_features(self._check_fitted(features)).numpy()

    def predict_features(self, features, threshold: float | None = None) -> np.ndarray:
        from .base import UNKNOWN

        threshold = self._threshold(threshold)
        features = self._check_fitted(features)
        normality = self.normality_features(features).numpy()
        pred = self.nearest_class_features(features)
        return np.where(normality >= threshold, pred, UNKNOWN)


# =============================================================================== Gram
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


class GramDetector(_NoLOOCalibration, PrototypeDetector):
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

    def _paths_features(self, paths: Sequence[str], desc: str) -> torch.Tensor:
        kw = dict(cache=self.cache, batch_size=self.batch_size, num_workers=self.num_workers,
                  device=self.device, progress=self.progress)
        pooled = extract_features(self.backbone, paths, desc=desc, **kw)
        stats = extract_features(self.gram_backbone, paths, desc=f"{desc} (Gram statistics)", **kw)
        return torch.cat([pooled, stats], dim=1)

    def features(self, x, desc: str = "features"):
        if isinstance(x, torch.Tensor) and x.ndim == 4:  # images: pooled + stats in one pass
            bb = self.backbone.to(self.device).eval()
            gb = self.gram_backbone
            out = []
            with torch.inference_mode():
                for i in range(0, len(x), self.batch_size):
                    xi = x[i : i + self.batch_size].to(self.device)
                    out.append(torch.cat([bb(xi).float(), gb(xi)], dim=1).cpu())
            return check_features(torch.cat(out), desc), None
        if isinstance(x, torch.utils.data.DataLoader):
            raise TypeError("GramDetector takes image paths, folders, datasets or tensors")
        return super().features(x, desc)

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

    def similarities_features(self, features) -> torch.Tensor:
        """Closed-set scores used for the predicted class: cosine to prototypes, or head logits."""
        pooled, _ = self._split(torch.as_tensor(features, dtype=torch.float32))
        if self._ft is not None:
            return self._ft.similarities_features(pooled)
        d = self.backbone.feature_dim
        return F.normalize(pooled, dim=1) @ F.normalize(self.prototypes_[:, :d], dim=1).T

    def score_features(self, features) -> np.ndarray:
        features = self._check_fitted(features)
        _, stats = self._split(features)
        cls = self.similarities_features(features).argmax(dim=1)
        delta = (self._layer_deviations(stats, cls) / self._norm).sum(dim=1)
        return (-delta).float().numpy()

    @property
    def ft_info_(self) -> dict:
        return {} if self._ft is None else self._ft.ft_info_

    def predict_features(self, features, threshold: float | None = None) -> np.ndarray:
        from .base import UNKNOWN

        threshold = self._threshold(threshold)
        normality = self.score_features(features)
        return np.where(normality >= threshold, self.nearest_class_features(features), UNKNOWN)


# =============================================================================== registry
def _ft(score: str, hidden: int = 0, doc: str = ""):
    return type(f"FineTuned_{score}", (FineTunedDetector,),
                {"name": f"ft-{score}", "default_score": score, "default_hidden": hidden,
                 "__doc__": doc or f"Head fine-tuned on the support features, scored by {score}."})


class FineTunedGramDetector(GramDetector):
    """``ft-gram``: Gram deviations, class predicted by a head fine-tuned on the support set."""

    name = "ft-gram"

    def __init__(self, **kwargs):
        kwargs.setdefault("fine_tune", True)
        super().__init__(**kwargs)


BASELINES = {
    "knn": KNNDetector,
    "mahalanobis": MahalanobisDetector,
    "gram": GramDetector,
    "ft-msp": _ft("msp"),
    "ft-maxlogit": _ft("maxlogit"),
    "ft-energy": _ft("energy"),
    "ft-odin": _ft("odin"),
    "ft-gradnorm": _ft("gradnorm"),
    "ft-mahalanobis": _ft("mahalanobis", hidden=512),
    "ft-gram": FineTunedGramDetector,
}
FT_METHODS = tuple(m for m in BASELINES if m.startswith("ft-"))

METHOD_HELP = {
    "knn": "max over classes of the mean cosine to the K nearest support features of the class",
    "mahalanobis": "Mahalanobis distance, class means + tied covariance of the support features "
                   "(pytorch-ood)",
    "gram": "Gram-matrix deviations of intermediate feature maps (runs the backbone again)",
    "ft-msp": "max softmax of a head fine-tuned on the support features (pytorch-ood)",
    "ft-maxlogit": "max logit of the fine-tuned head",
    "ft-energy": "energy score of the fine-tuned head",
    "ft-odin": "ODIN (T=1000, perturbation in feature space) on the fine-tuned head",
    "ft-gradnorm": "GradNorm w.r.t. the last layer of the fine-tuned head",
    "ft-mahalanobis": "Mahalanobis on the hidden layer of a fine-tuned 1-hidden-layer head",
    "ft-gram": "Gram deviations, class predicted by the fine-tuned head",
}


def add_baseline_options(p) -> None:
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


def baseline_kwargs(args) -> dict:
    """Detector keyword arguments of ``args.method`` from the options of add_baseline_options."""
    method = args.method
    if method == "knn":
        return {"k": getattr(args, "knn_k", 10)}
    if method not in FT_METHODS:
        return {}
    budget = getattr(args, "ft_budget", "resend")
    if budget != "resend":
        try:
            budget = float(budget)
        except ValueError:
            raise ValueError(f"--ft-budget must be 'resend' or seconds, got {budget!r}") from None
        if budget < 0:
            raise ValueError(f"--ft-budget must be >= 0 seconds, got {budget}")
        if budget == 0:
            budget = None
    epochs = getattr(args, "ft_epochs", None)
    if budget is None and epochs is None:
        raise ValueError("--ft-budget 0 (no time budget) needs --ft-epochs N")
    kw = {"budget": budget, "epochs": epochs, "hidden": getattr(args, "ft_hidden", None),
          "lr": getattr(args, "ft_lr", 1e-2), "budget_model": getattr(args, "model", None)}
    if method == "ft-odin":
        kw.update(temperature=getattr(args, "odin_temperature", 1000.0),
                  odin_eps=getattr(args, "odin_eps", 0.0014))
    return kw


DETECTORS.update(BASELINES)

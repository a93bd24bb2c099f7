"""Fine-tuning-free novelty detectors, in the spirit of pytorch-ood and scikit-learn.

Every detector follows the same protocol::

    det = ReSeNDDetector()            # or CosineDetector(), EuclideanDetector()
    det.fit(support)                  # one prototype per known class, no training
    normality = det.score(test)       # higher = more likely a known class
    pred = det.predict(test, threshold)   # known class label, or -1 (UNKNOWN)

    det.calibrate(support, tpr=0.95)  # fit + threshold from the support set alone (threshold_)
    pred = det.predict(test)          # uses det.threshold_

``fit``/``score``/``predict`` accept image paths, a class-folder directory, an
:class:`~resend_novelty.data.images.ImageDataset`, a DataLoader of ``(images, labels)``, a tensor of
preprocessed images, or PIL images. ``fit_features``/``score_features``/``predict_features`` take
cached backbone features, so that the backbone runs once and many detectors reuse its output.

Known classes are the labels present in the support set (``classes_``).

Threshold calibration without unknown samples (:meth:`PrototypeDetector.calibrate`): each support
image is scored *leave-one-out* - the prototype of its own class is recomputed without it, the
other prototypes are unchanged - so it is scored like an unseen image of a known class. The
threshold is the ``ceil(tpr * m)``-th largest of the ``m`` LOO scores: at least a fraction
``tpr`` of the support images would be accepted as known. Images of classes with a single
support image cannot be left out (their class would have no prototype): they are skipped with a
warning naming the class.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, build_backbone
from ..features.cache import FeatureCache
from ..data.images import IMAGE_EXTENSIONS, DataError, ImageDataset, list_images, scan_class_folders
from ..transforms.domain_norm import as_mode, domain_statistics, normalize, normalize_by_domain
from ..features.extract import check_features, default_device, extract_features
from ..models.relational import RelationalModule

__all__ = [
    "UNKNOWN",
    "PrototypeDetector",
    "ReSeNDDetector",
    "CosineDetector",
    "CenteredCosineDetector",
    "StandardizedCosineDetector",
    "EuclideanDetector",
    "build_detector",
    "fit_support",
    "DETECTORS",
]

UNKNOWN = -1

# test-time prototype refinement (``refine=``): chosen on the synthetic proxy only
# (benchmarks/proxy_rejected.py, confirmed on fresh proxy episodes; never on PACS)
REFINE_FRACTION = 0.3  # q: share of the test images assigned to a class that move its prototype
REFINE_KEEP = 0.75  # lambda: weight kept on the support prototype at every step


def fit_support(detector, features, labels, domains=None):
    """``detector.fit_features(features, labels)``, passing ``domains=`` (the source domain of
    each support row) only when there are domains: detectors written without a ``domains``
    parameter keep working on single-source supports, and fail loudly on multi-source ones."""
    if domains is None:
        return detector.fit_features(features, labels)
    return detector.fit_features(features, labels, domains=domains)


class PrototypeDetector:
    """Base class: class prototypes = mean backbone feature of the support images of each class."""

    name = "prototype"
    # the normality needs at least two known classes (max-softmax: always 1 with one class)
    needs_two_classes = False

    def __init__(
        self,
        backbone: Backbone | str | None = "efficientnet_lite0",
        device: str | torch.device | None = None,
        cache: FeatureCache | bool | None = True,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = True,
        center: bool | str = False,
        min_center_batch: int = 16,
        refine: int = 0,
        refine_fraction: float = REFINE_FRACTION,
        refine_keep: float = REFINE_KEEP,
    ):
        self.domain_norm = as_mode(center)
        self.min_center_batch = int(min_center_batch)
        self._set_refinement(refine, refine_fraction, refine_keep)
        self._backbone = backbone
        self.device = torch.device(device) if device is not None else default_device()
        self.cache = cache
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    # detectors whose similarities depend only on the direction of a prototype (cosine-like):
    # the refined prototypes are unit vectors
    supports_refinement = False

    def _set_refinement(self, refine, fraction, keep) -> None:
        if refine is None or int(refine) < 0:
            raise ValueError(f"refine must be a number of steps >= 0, got {refine!r}")
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"refine_fraction must be in (0, 1], got {fraction}")
        if not 0.0 <= float(keep) <= 1.0:
            raise ValueError(f"refine_keep must be in [0, 1], got {keep}")
        if int(refine) and not self.supports_refinement:
            raise ValueError(f"the {self.name} detector does not support test-time prototype "
                             "refinement (refine > 0): it needs direction-only (cosine-like) "
                             "prototypes")
        self.refine = int(refine)
        self.refine_fraction, self.refine_keep = float(fraction), float(keep)

    @property
    def center(self) -> bool:
        """Whether features are normalised per domain (``domain_norm`` "center"/"standardize")."""
        return self.domain_norm != "none"

    # ----------------------------------------------------------------- backbone and inputs
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            raise ValueError("this detector has no backbone: use fit_features/score_features")
        if isinstance(self._backbone, str):
            self._backbone = build_backbone(self._backbone)
        return self._backbone

    def features(self, x, desc: str = "features") -> tuple[torch.Tensor, np.ndarray | None]:
        """Backbone features of ``x`` (and its labels where ``x`` carries them)."""
        if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
            entries = [e for e in Path(x).iterdir() if not e.name.startswith(".")]
            sub = [d for d in entries if d.is_dir()]
            loose = [f for f in entries if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
            if sub and not loose:  # class folders: labels are the folder indices
                records, classes = scan_class_folders(x)
                self._folder_classes = classes
                return self._paths_features([r.path for r in records], desc), np.array(
                    [r.label for r in records]
                )
            return self._paths_features(list_images(x), desc), None
        if isinstance(x, ImageDataset):
            return self._paths_features(x.paths, desc), np.asarray(x.labels)
        if isinstance(x, torch.utils.data.DataLoader):
            feats, labels = [], []
            bb = self.backbone.to(self.device).eval()
            with torch.inference_mode():
                for batch in x:
                    images, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                    feats.append(bb(images.to(self.device)).float().cpu())
                    if y is not None:
                        labels.append(torch.as_tensor(y))
            f = check_features(torch.cat(feats), desc)
            return f, (torch.cat(labels).numpy() if labels else None)
        if isinstance(x, torch.Tensor):
            if x.ndim != 4:
                raise ValueError(
                    f"image tensors must be (N, 3, H, W), got {tuple(x.shape)}; "
                    "use fit_features/score_features for precomputed features"
                )
            bb = self.backbone.to(self.device).eval()
            with torch.inference_mode():
                out = [bb(x[i : i + self.batch_size].to(self.device)).float().cpu()
                       for i in range(0, len(x), self.batch_size)]
            return check_features(torch.cat(out), desc), None
        if isinstance(x, (list, tuple)) and x and hasattr(x[0], "convert"):  # PIL images
            t = self.backbone.transform
            return self.features(torch.stack([t(im.convert("RGB")) for im in x]), desc)
        if isinstance(x, (list, tuple, np.ndarray)):
            return self._paths_features([str(p) for p in x], desc), None
        raise TypeError(f"unsupported input type {type(x).__name__}")

    def _paths_features(self, paths: Sequence[str], desc: str) -> torch.Tensor:
        return extract_features(
            self.backbone, paths, cache=self.cache, batch_size=self.batch_size,
            num_workers=self.num_workers, device=self.device, progress=self.progress, desc=desc,
        )

    # ----------------------------------------------------------------- fit
    def fit(self, support, labels: Sequence[int] | None = None,
            domains: Sequence | None = None) -> "PrototypeDetector":
        """Compute one prototype per known class from support images (no training).

        ``domains`` (one id per support image, e.g. "photo"/"sketch") lets domain normalisation
        (``center=``) use each source domain's own statistics; see :meth:`fit_features`.
        """
        self._fit_input(support, labels, domains)
        return self

    def _fit_input(self, support, labels, domains=None) -> tuple[torch.Tensor, np.ndarray]:
        self._folder_classes = None
        feats, found = self.features(support, desc="support features")
        if labels is None:
            labels = found
        if labels is None:
            raise ValueError("the support set has no labels: pass labels= or class folders")
        fit_support(self, feats, labels, domains)
        classes = self._folder_classes
        if classes is not None and labels is found:
            self.class_names_ = [classes[int(c)] for c in self.classes_]
        return feats, np.asarray(labels)

    def fit_features(self, features, labels, domains: Sequence | None = None) -> "PrototypeDetector":
        """Prototypes from support features ``(N, D)`` and integer ``labels``.

        With domain normalisation (``center=True``/``"center"`` or ``"standardize"``) the support
        features are normalised with the statistics of their source domain when ``domains`` (one
        id per row) is given - as in pretraining, where every domain is normalised on its own -
        and with the statistics of the whole support set otherwise. Without domain normalisation
        ``domains`` has no effect.
        """
        features = check_features(torch.as_tensor(features, dtype=torch.float32), "support features")
        labels = np.asarray(labels)
        if features.ndim != 2:
            raise ValueError(f"support features must be (N, D), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(
                f"{features.shape[0]} support features but {labels.shape[0]} labels"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        classes = np.unique(labels)
        if len(classes) < 2:
            if self.needs_two_classes:
                raise ValueError(
                    f"the support set has a single known class ({classes.tolist()}): the "
                    f"{self.name} normality max(softmax(u)) is then always 1 and cannot flag "
                    "unknowns; add support classes or use a similarity-based method (cosine)"
                )
            warnings.warn(
                f"the support set has a single known class ({classes.tolist()}): the {self.name} "
                "normality is then the similarity to that one class, with no competing class; "
                "choose the threshold with care",
                stacklevel=2,
            )
        self.classes_ = classes
        self.__dict__.pop("threshold_", None)  # a threshold of other prototypes is stale
        self.test_prototypes_ = None  # refined from the old prototypes: stale
        if domains is not None and np.asarray(domains).shape != labels.shape:
            raise ValueError(f"{labels.shape[0]} support labels but {np.asarray(domains).size} "
                             "domain ids")
        if self.center:
            self.support_mean_, self.support_std_ = domain_statistics(features, self.domain_norm)
            features = (normalize(features, self.support_mean_, self.support_std_)
                        if domains is None
                        else normalize_by_domain(features, domains, self.domain_norm))
        self._support_normalized = features  # what subclasses build their own statistics from
        idx = torch.as_tensor(np.searchsorted(self.classes_, labels))
        protos = torch.zeros(len(self.classes_), features.shape[1])
        protos.index_add_(0, idx, features)
        counts = torch.bincount(idx, minlength=len(self.classes_)).clamp_min(1)
        self.prototypes_ = protos / counts[:, None]
        self.class_counts_ = counts.numpy()
        self.class_names_ = [str(c) for c in self.classes_]
        self._on_fit()
        return self

    def _on_fit(self) -> None:
        pass

    def _check_fitted(self, features: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "prototypes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
        features = check_features(torch.as_tensor(features, dtype=torch.float32), "test features")
        if features.ndim != 2 or features.shape[1] != self.prototypes_.shape[1]:
            raise ValueError(
                f"test features of shape {tuple(features.shape)} do not match the prototypes' "
                f"dimension {self.prototypes_.shape[1]}"
            )
        if self.center:
            features = normalize(features, *self._test_statistics(features))
        return features

    # ----------------------------------------------------------------- test-time domain normalisation
    def set_test_mean(self, features) -> "PrototypeDetector":
        """Fix the statistics used to normalise test features, from many test features ``(N, D)``
        (e.g. a first batch of a stream); a ``(D,)`` mean is accepted when only centring.
        ``set_test_mean(None)`` goes back to the statistics of each scored batch.

        With ``refine > 0`` and test features ``(N, D)``, the refined test-domain prototypes are
        fixed here too (after :meth:`fit`), so that a stream is scored image by image against
        the same prototypes."""
        self.test_prototypes_ = None
        if features is None:
            self.test_mean_ = self.test_std_ = None
            return self
        f = check_features(torch.as_tensor(features, dtype=torch.float32), "test features")
        if f.ndim == 2:
            self.test_mean_, self.test_std_ = domain_statistics(
                f, self.domain_norm if self.center else "center")
        elif self.domain_norm == "standardize":
            raise ValueError("standardising needs test features (N, D) to estimate their std, "
                             f"not a mean of shape {tuple(f.shape)}")
        else:
            self.test_mean_, self.test_std_ = f, None
        if self.refine and f.ndim == 2 and hasattr(self, "prototypes_"):
            self.test_prototypes_ = self.refine_prototypes(self._check_fitted(f))
        return self

    set_test_statistics = set_test_mean

    def _test_statistics(self, features: torch.Tensor):
        """Transductive domain normalisation (``center=``): support features are normalised with
        the support statistics, test features with those of the test features scored together
        (their domain), which removes a shift common to a whole domain (e.g. all sketches)
        without any label. ``set_test_mean`` fixes them for streams; a batch smaller than
        ``min_center_batch`` without it uses the support statistics (no domain shift assumed).
        """
        if getattr(self, "test_mean_", None) is not None:
            return self.test_mean_, getattr(self, "test_std_", None)
        if features.shape[0] >= max(2, self.min_center_batch):
            return domain_statistics(features, self.domain_norm)
        warnings.warn(
            f"normalising a batch of {features.shape[0]} test features (< {self.min_center_batch}) "
            "with the support statistics; call set_test_mean(features of many test images) for "
            "a stream",
            stacklevel=3,
        )
        return self.support_mean_, self.support_std_

    # ----------------------------------------------------------------- test-time refinement
    def refine_prototypes(self, features: torch.Tensor) -> torch.Tensor:
        """Prototypes moved towards the test domain (not in the paper), from normalised test
        features ``(N, D)`` and no label: ``refine`` steps of

            a_i = argmax_c u_ic;  m_c = mean of the unit test features assigned to c whose
            u_ic is in the top ``refine_fraction`` of those assigned to c;
            p_c <- unit(lambda * unit(p0_c) + (1 - lambda) * unit(m_c))

        (lambda = ``refine_keep``, p0 = the support prototypes, u = this detector's own
        similarities). Only the most confident share of each class moves its prototype, and
        every step stays anchored to the support prototype, so an unknown class in the test
        batch pulls little. A class no test image is assigned to keeps its prototype.

        Caveat (measured, BENCHMARKS.md section *Candidates the proxy rejected*): transductive,
        so it can fail where an unknown class is a large share of the test images: on the PACS
        multi-source Photo target (26% of the photos are of the unknown class "person") the
        AUROC falls from 0.73 to 0.41, while Art and Cartoon gain. Off by default.
        :meth:`calibrate` scores the support against the unrefined prototypes.
        """
        p0 = F.normalize(self.prototypes_, dim=1)
        x = F.normalize(features, dim=1)
        p = p0
        for _ in range(self.refine):
            with self._swapped_prototypes(p):
                conf, assigned = self.similarities_features(features).max(dim=1)
            m = p.clone()
            for c in range(p.shape[0]):
                rows = (assigned == c).nonzero().flatten()
                if len(rows):
                    k = max(1, round(self.refine_fraction * len(rows)))
                    m[c] = x[rows[conf[rows].topk(k).indices]].mean(0)
            p = F.normalize(self.refine_keep * p0
                            + (1 - self.refine_keep) * F.normalize(m, dim=1), dim=1)
        return p

    def _test_similarities(self, features) -> torch.Tensor:
        """u of test features: normalised (``center=``), against the refined prototypes when
        ``refine > 0`` (those fixed by :meth:`set_test_mean`, else refined on this batch)."""
        x = self._check_fitted(features)
        protos = None
        if self.refine:
            protos = getattr(self, "test_prototypes_", None)
            if protos is None:
                if x.shape[0] >= max(2, self.min_center_batch):
                    protos = self.refine_prototypes(x)
                else:
                    warnings.warn(
                        f"scoring a batch of {x.shape[0]} test features (< {self.min_center_batch})"
                        " against the unrefined support prototypes; call set_test_mean(features of "
                        "many test images) to refine them for a stream",
                        stacklevel=3,
                    )
        if protos is None:
            return self.similarities_features(x)
        with self._swapped_prototypes(protos):
            return self.similarities_features(x)

    # ----------------------------------------------------------------- scoring
    def similarities_features(self, features) -> torch.Tensor:
        """u: (N, K) similarity of each test feature to each class prototype."""
        raise NotImplementedError

    def normality_from_similarities(self, u: torch.Tensor) -> torch.Tensor:
        return u.max(dim=1).values

    def score_features(self, features) -> np.ndarray:
        u = self._test_similarities(features)
        return self.normality_from_similarities(u).numpy()

    def score(self, x) -> np.ndarray:
        """Normality of each test input: higher = more likely one of the known classes."""
        return self.score_features(self.features(x, desc="test features")[0])

    def _threshold(self, threshold: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        if getattr(self, "threshold_", None) is None:
            raise ValueError(
                "no threshold: pass threshold=... or call calibrate(support, tpr=...) first"
            )
        return float(self.threshold_)

    def predict_features(self, features, threshold: float | None = None) -> np.ndarray:
        """Nearest known class, or ``UNKNOWN`` (-1) where the normality is below ``threshold``.

        ``threshold=None`` uses ``threshold_`` set by :meth:`calibrate` (error if there is none).
        """
        threshold = self._threshold(threshold)
        u = self._test_similarities(features)
        normality = self.normality_from_similarities(u).numpy()
        pred = self.classes_[u.argmax(dim=1).numpy()]
        return np.where(normality >= threshold, pred, UNKNOWN)

    def predict(self, x, threshold: float | None = None) -> np.ndarray:
        threshold = self._threshold(threshold)  # fail before extracting features
        return self.predict_features(self.features(x, desc="test features")[0], threshold)

    def nearest_class_features(self, features) -> np.ndarray:
        u = self._test_similarities(features)
        return self.classes_[u.argmax(dim=1).numpy()]

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Normality and nearest known class from one similarity computation."""
        u = self._test_similarities(features)
        return self.normality_from_similarities(u).numpy(), self.classes_[u.argmax(dim=1).numpy()]

    # ----------------------------------------------------------------- calibration
    @contextmanager
    def _swapped_prototypes(self, prototypes: torch.Tensor):
        """Temporarily score against ``prototypes`` (any number of rows) instead of ``prototypes_``."""
        saved = self.prototypes_
        self.prototypes_ = prototypes
        try:
            yield
        finally:
            self.prototypes_ = saved

    def loo_scores_features(
        self, features, labels, block: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out normality of the support features the detector was fitted on (same
        rows, same order): :meth:`loo_similarities_features`, then the normality.

        Returns ``(scores, used)``: ``scores`` of the images in classes with >= 2 images,
        ``used`` the boolean mask of those images among ``features``.
        """
        u, used = self.loo_similarities_features(features, labels, block)
        return self.normality_from_similarities(u[torch.as_tensor(used)]).numpy(), used

    def loo_similarities_features(
        self, features, labels, block: int = 16
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Leave-one-out similarities ``u`` ``(N, K)`` of support features w.r.t. the fitted
        prototypes.

        For image i of class c (n_c images) the prototype of c becomes
        ``(n_c * p_c - f_i) / (n_c - 1)``; the other prototypes are unchanged. Works for any
        detector: the similarity of each image to its own LOO prototype is computed by swapping
        ``prototypes_`` for a block of LOO prototypes and keeping the diagonal (``block`` images
        at a time: ``block`` x more pairs than needed, ``N / block`` calls).

        Returns ``(u, used)``: ``used`` marks the images in classes with >= 2 images (the rows
        of ``u`` that are leave-one-out similarities).
        """
        features = self._check_fitted(features)
        labels = np.asarray(labels)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"{features.shape[0]} support features but {labels.size} labels")
        missing = sorted(set(labels.tolist()) - set(self.classes_.tolist()))
        if missing:
            raise ValueError(f"labels {missing} are not classes of the fitted detector")
        from tqdm.auto import tqdm

        idx = np.searchsorted(self.classes_, labels)
        u = self.similarities_features(features).clone()  # (N, K), full prototypes
        used = np.zeros(len(labels), dtype=bool)
        counts = np.bincount(idx, minlength=len(self.classes_))
        bar = tqdm(total=int(counts[counts >= 2].sum()), desc="leave-one-out calibration",
                   unit="img", disable=not getattr(self, "progress", False))
        protos64 = self.prototypes_.double()
        feats64 = features.double()
        for k in range(len(self.classes_)):
            members = np.flatnonzero(idx == k)
            n = len(members)
            if n < 2:
                continue
            used[members] = True
            for start in range(0, n, block):
                rows = torch.as_tensor(members[start : start + block])
                loo = ((n * protos64[k] - feats64[rows]) / (n - 1)).float()
                with self._swapped_prototypes(loo):
                    s = self.similarities_features(features[rows])  # (B, B)
                u[rows, k] = torch.diagonal(s)
                bar.update(len(rows))
        bar.close()
        return u, used

    def calibrate_features(self, features, labels, tpr: float = 0.95) -> "PrototypeDetector":
        """Fit on support features and set ``threshold_`` from their leave-one-out scores.

        ``threshold_`` is the ``ceil(tpr * m)``-th largest of the m LOO scores, so that at least
        ``tpr`` of the support images are accepted (recall of knowns >= ``tpr`` on the support
        set). Classes with a single image are skipped with a warning (error if none is left).
        Details in ``calibration_`` (tpr, n_images, skipped_classes, achieved_recall).
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        self.fit_features(features, labels)
        return self._calibrate_fitted(features, labels, float(tpr))

    def _calibrate_fitted(self, features, labels, tpr: float) -> "PrototypeDetector":
        labels = np.asarray(labels)
        counts = dict(zip(self.classes_.tolist(), self.class_counts_.tolist()))
        names = dict(zip(self.classes_.tolist(), self.class_names_))
        single = [names[c] for c, n in counts.items() if n < 2]
        if single and len(single) == len(counts):
            raise ValueError(
                "cannot calibrate: every support class has a single image, so no image can be "
                "left out (leave-one-out needs >= 2 images in a class)"
            )
        if single:
            warnings.warn(
                f"calibration skips class(es) with a single support image (leave-one-out "
                f"impossible): {', '.join(single)}",
                stacklevel=3,
            )
        scores, used = self.loo_scores_features(features, labels)
        m = len(scores)
        k = min(m, max(1, math.ceil(tpr * m - 1e-9)))
        threshold = float(np.sort(scores)[::-1][k - 1])
        self.threshold_ = threshold
        self.calibration_ = {
            "rule": "support leave-one-out",
            "tpr": tpr,
            "n_images": int(m),
            "skipped_classes": single,
            "achieved_recall": float((scores >= threshold).mean()),
        }
        self.loo_scores_ = scores
        return self

    def calibrate(self, support, labels: Sequence[int] | None = None, tpr: float = 0.95):
        """Fit on ``support`` (as :meth:`fit`) and set ``threshold_`` from leave-one-out scores.

        After this, ``predict(x)`` needs no threshold. See :meth:`calibrate_features`.
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        feats, labels = self._fit_input(support, labels)
        return self._calibrate_fitted(feats, labels, float(tpr))


class CosineDetector(PrototypeDetector):
    """Normality = max cosine similarity to the class prototypes."""

    name = "cosine"
    supports_refinement = True

    def similarities_features(self, features) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.prototypes_, dim=1).T


class CenteredCosineDetector(CosineDetector):
    """Max cosine after transductive centring (support on its mean, test on its mean)."""

    name = "cosine-centered"

    def __init__(self, **kwargs):
        kwargs.setdefault("center", True)
        super().__init__(**kwargs)


class StandardizedCosineDetector(CosineDetector):
    """Max cosine after transductive per-domain standardisation (mean and std per dimension:
    support per source domain where known, test on its own statistics)."""

    name = "cosine-standardized"

    def __init__(self, **kwargs):
        kwargs.setdefault("center", "standardize")
        super().__init__(**kwargs)


class EuclideanDetector(PrototypeDetector):
    """Normality = minus the Euclidean distance to the nearest class prototype."""

    name = "euclidean"

    def similarities_features(self, features) -> torch.Tensor:
        return -torch.cdist(features, self.prototypes_)


class ReSeNDDetector(PrototypeDetector):
    """ReSeND: u = relational similarity logits to each prototype; normality = max(softmax(u)).

    ``model`` is a :class:`RelationalModule`, a checkpoint path, or None for the checkpoint
    shipped with the package. ``chunk_pairs``: (test, prototype) pairs scored per batch
    (default 65536 on GPU, 4096 on CPU); memory stays bounded whatever the number of test images.
    ``normality``: "softmax" (the paper's max(softmax(u))) or "max-logit" (max(u)); default: the
    checkpoint's ``config.normality``. ``center``: domain normalisation; default: the one the
    checkpoint was trained with (``config.domain_norm``).

    ``neighbors=k`` (not in the paper; 0 = one prototype per class; default None = the
    checkpoint's ``config.neighbors``): also compare the test image with the ``k`` support images
    of class c nearest to it by cosine - several "prototypes" per class, which keeps the modes of
    a class that spans several domains. ``neighbor_weight=w`` (default: the checkpoint's
    ``config.neighbor_weight``) mixes the two: u_c = (1 - w) * logit(x, prototype_c) + w * mean
    logit(x, neighbour) over those k neighbours; w = 1 uses the neighbours only. Costs about ``k``
    x more pairs. :meth:`calibrate` leaves each support image out of its own neighbours too.

    ``refine``: steps of test-time prototype refinement (:meth:`refine_prototypes`; not in the
    paper; default 0 = off, see its caveat). Needs a model with
    ``input_norm="l2"`` (the relational score then depends on the prototype's direction only)
    and class prototypes only (``neighbors=0``). :meth:`calibrate` scores the support with the
    unrefined prototypes.
    """

    name = "resend"
    needs_two_classes = True

    def __init__(self, model: RelationalModule | str | os.PathLike | None = None,
                 chunk_pairs: int | None = None, normality: str | None = None,
                 neighbors: int | None = None, neighbor_weight: float | None = None,
                 refine: int = 0, **kwargs):
        if isinstance(model, RelationalModule):
            self.model = model
        else:
            from ..models.checkpoint import load_checkpoint

            self.model = load_checkpoint(model)
        kwargs.setdefault("backbone", self.model.config.backbone)
        super().__init__(**kwargs)
        bb = kwargs["backbone"]
        bb_name = bb if isinstance(bb, str) or bb is None else bb.name
        if bb_name not in (None, "identity") and bb_name != self.model.config.backbone:
            raise ValueError(
                f"the relational model was trained on {self.model.config.backbone!r} features, "
                f"not {bb_name!r}"
            )
        self.chunk_pairs = chunk_pairs
        from ..models.relational import NORMALITIES

        self.normality = normality or getattr(self.model.config, "normality", "softmax")
        if self.normality not in NORMALITIES:
            raise ValueError(f"normality must be one of {NORMALITIES}, got {self.normality!r}")
        if self.normality != "softmax":
            self.needs_two_classes = False  # max(u) is meaningful with a single class
        cfg = self.model.config
        k = int(getattr(cfg, "neighbors", 0) if neighbors is None else neighbors)
        if k < 0:
            raise ValueError(f"neighbors must be >= 1, or 0 for one prototype per class, got {k}")
        self.neighbors = k or None  # None: class prototypes only
        if neighbor_weight is not None and self.neighbors is None:
            raise ValueError("neighbor_weight mixes in the k nearest support images: it needs "
                             "neighbors=k (k >= 1)")
        w = float(getattr(cfg, "neighbor_weight", 1.0) if neighbor_weight is None
                  else neighbor_weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"neighbor_weight must be in [0, 1], got {w}")
        self.neighbor_weight = w
        self.model.eval()
        if kwargs.get("center") is None:  # the model's training decides (config.domain_norm)
            self.domain_norm = self.model.config.domain_norm
        if refine and self.model.config.input_norm != "l2":
            raise ValueError("test-time prototype refinement (refine > 0) needs a relational "
                             "model with input_norm='l2' (direction-only prototypes)")
        if refine and self.neighbors is not None:
            raise ValueError("refine > 0 refines class prototypes: it cannot be combined with "
                             f"neighbors={self.neighbors}" + (
                                 " (the checkpoint's default; pass neighbors=0)"
                                 if neighbors is None else ""))
        self.supports_refinement = True
        self._set_refinement(refine, self.refine_fraction, self.refine_keep)

    def fit_features(self, features, labels, domains=None) -> "ReSeNDDetector":
        super().fit_features(features, labels, domains=domains)
        if self.neighbors is not None:  # keep the (normalised) support for the k-NN mode
            idx = np.searchsorted(self.classes_, np.asarray(labels))
            self._knn_support = self._support_normalized
            self._knn_members = [torch.as_tensor(np.flatnonzero(idx == k))
                                 for k in range(len(self.classes_))]
        return self

    def loo_similarities_features(self, features, labels, block: int = 16):
        """Leave-one-out similarities: with ``neighbors=k`` each support image is also left out
        of its own class's nearest support images (the prototype part as in the base class)."""
        k = self.neighbors
        self.neighbors = None  # the prototype part: the base class's leave-one-out
        try:
            u, used = super().loo_similarities_features(features, labels, block)
        finally:
            self.neighbors = k
        if k is None:
            return u, used
        x = self._check_fitted(features)
        near = self._knn_similarities(x, exclude=torch.arange(x.shape[0]))
        w = self.neighbor_weight
        return (1 - w) * u + w * near, used

    @torch.inference_mode()
    def _knn_similarities(self, features: torch.Tensor,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
        """u_c = mean logit over the k support images of class c nearest by cosine.

        Each support and test image is projected to its token once (eq. 2); only the blocks
        run per (test image, neighbour) pair. Same function as ``model(f_i, f_j)``.
        ``exclude``: for each row of ``features``, a support row that may not be one of its
        neighbours (leave-one-out: the row itself).
        """
        model = self.model.to(self.device)
        support = self._knn_support
        cos = F.normalize(features, dim=1) @ F.normalize(support, dim=1).T  # (N, M)
        if exclude is not None:
            cos[torch.arange(cos.shape[0]), exclude] = float("-inf")
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            z_support = model.encode(support.to(self.device))  # (M, dim), once
            z_test = model.encode(features.to(self.device))  # (N, dim), once for every class
        u = torch.empty(features.shape[0], len(self._knn_members))
        rows = max(1, (self.chunk_pairs or 4096) // self.neighbors)
        for c, members in enumerate(self._knn_members):
            k = min(self.neighbors, len(members))
            top = cos[:, members].topk(k, dim=1)
            nearest = members[top.indices]  # (N, k) support rows
            valid = torch.isfinite(top.values)  # False: an excluded row (class of <= k images)
            for start in range(0, features.shape[0], rows):
                z_i = z_test[start:start + rows]
                near = nearest[start:start + rows]  # (n, k)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model.relate(z_i.repeat_interleave(k, 0),
                                          z_support[near.reshape(-1).to(self.device)])
                logits = logits.float().view(len(z_i), k)
                if model.config.cosine_skip:  # the skip term of forward(), on the same cosines
                    rows_cos = cos[start:start + rows].gather(1, near).to(self.device)
                    logits = logits + model.cosine_term(rows_cos).float()
                ok = valid[start:start + rows].to(logits.device)
                mean = logits.where(ok, 0).sum(1) / ok.sum(1).clamp_min(1)
                u[start:start + len(z_i), c] = mean.cpu()
        return u

    @torch.inference_mode()
    def similarities_features(self, features) -> torch.Tensor:
        if self.neighbors is not None and getattr(self, "_knn_support", None) is not None:
            near = self._knn_similarities(features)
            w = self.neighbor_weight
            if w >= 1.0:
                return near
            return (1 - w) * self._prototype_similarities(features) + w * near
        return self._prototype_similarities(features)

    @torch.inference_mode()
    def _prototype_similarities(self, features) -> torch.Tensor:
        """u_c = logit(x, prototype_c), every (test image, prototype) pair batched."""
        model = self.model.to(self.device)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            # test features stay where they are: pairwise_logits moves them chunk by chunk
            # pairs per chunk: large on GPU; on CPU small chunks stay in cache, as fast and
            # without the GBs of activations of 65536 pairs (measured in benchmarks/speed.py)
            chunk = self.chunk_pairs or (65536 if self.device.type == "cuda" else 4096)
            u = model.pairwise_logits(features, self.prototypes_.to(self.device), chunk)
        return u.float().cpu()

    def _on_fit(self) -> None:
        # fail at fit time, not at the first score, when the features come from another backbone
        want = self.model.config.feature_dim
        if self.prototypes_.shape[1] != want:
            got = self.prototypes_.shape[1]
            del self.prototypes_
            raise ValueError(
                f"support features have dimension {got}, the relational module expects {want} "
                f"(it was trained on {self.model.config.backbone!r} features)"
            )

    def normality_from_similarities(self, u: torch.Tensor) -> torch.Tensor:
        if self.normality == "max-logit":
            return u.max(dim=1).values
        return torch.softmax(u, dim=1).max(dim=1).values  # the paper's max(softmax(u))


DETECTORS = {
    "resend": ReSeNDDetector,
    "cosine": CosineDetector,
    "cosine-centered": CenteredCosineDetector,
    "cosine-standardized": StandardizedCosineDetector,
    "euclidean": EuclideanDetector,
}


def build_detector(method: str, model=None, **kwargs) -> PrototypeDetector:
    """Detector by name: ``resend`` (uses ``model``), ``cosine``, ``euclidean``."""
    if method not in DETECTORS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(DETECTORS)}")
    if method == "resend":
        return ReSeNDDetector(model=model, **kwargs)
    if model is not None:
        raise ValueError(f"--model is only used by the resend method, not {method!r}")
    return DETECTORS[method](**kwargs)


# the baselines of the paper (knn, mahalanobis, gram, ft-*) register themselves in DETECTORS
from . import baselines as _baselines  # noqa: E402,F401

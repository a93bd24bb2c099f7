"""The detector API shared by every method, in the spirit of pytorch-ood and scikit-learn.

Every detector follows the same protocol::

    det = ReSeNDDetector()            # or CosineDetector(), EuclideanDetector(), ...
    det.fit(support)                  # learns from the labelled support set only
    normality = det.score(test)       # higher = more likely a known class
    pred = det.predict(test, threshold)   # known class label, or -1 (UNKNOWN)

``fit``/``score``/``predict`` accept any input of
:func:`~resend_novelty.features.input_features` (image paths, a class-folder directory, an
:class:`~resend_novelty.data.ImageDataset`, a DataLoader of ``(images, labels)``, a tensor of
preprocessed images, or PIL images). ``fit_features``/``score_features``/``predict_features``
take cached backbone features, so that the backbone runs once and many detectors reuse its
output. Known classes are the labels present in the support set (``classes_``).

:class:`Detector` holds what does not depend on the method: the backbone and the feature
options, turning inputs into features, validating the support set up front, and thresholding.
A method implements ``fit_features``, ``score_features`` and ``nearest_class_features``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from ..backbones import Backbone, build_backbone
from ..features import (FeatureCache, InputFeatures, check_features, default_device,
                        input_features)

__all__ = ["UNKNOWN", "Detector", "fit_support"]

UNKNOWN = -1


def fit_support(detector, features, labels, domains=None):
    """``detector.fit_features(features, labels)``, passing ``domains=`` (the source domain of
    each support row) only when there are domains: detectors written without a ``domains``
    parameter keep working on single-source supports, and fail loudly on multi-source ones."""
    if domains is None:
        return detector.fit_features(features, labels)
    return detector.fit_features(features, labels, domains=domains)


class Detector:
    """Abstract novelty detector: fit on a labelled support set, score the normality of tests.

    Subclasses implement :meth:`fit_features`, :meth:`score_features` and
    :meth:`nearest_class_features`; ``name`` is the registry name, ``description`` one line for
    the command-line help.
    """

    name = "detector"
    description = ""
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
    ):
        self._backbone = backbone
        self.device = torch.device(device) if device is not None else default_device()
        self.cache = cache
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    # ----------------------------------------------------------------- backbone and inputs
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            raise ValueError("this detector has no backbone: use fit_features/score_features")
        if isinstance(self._backbone, str):
            self._backbone = build_backbone(self._backbone)
        return self._backbone

    def input_features(self, x, desc: str = "features") -> InputFeatures:
        """Features of ``x`` with its labels and class names where it carries them."""
        return input_features(x, self.backbone, cache=self.cache, batch_size=self.batch_size,
                              num_workers=self.num_workers, device=self.device,
                              engine=getattr(self, "engine", "auto"),
                              progress=self.progress, desc=desc)

    def features(self, x, desc: str = "features") -> tuple[torch.Tensor, np.ndarray | None]:
        """Backbone features of ``x`` (and its labels where ``x`` carries them)."""
        out = self.input_features(x, desc)
        return out.features, out.labels

    # ----------------------------------------------------------------- fit
    def fit(self, support, labels: Sequence[int] | None = None,
            domains: Sequence | None = None) -> "Detector":
        """Fit on support images (labels from ``labels=`` or from class folders).

        ``domains`` (one id per support image, e.g. "photo"/"sketch") is passed on to
        :meth:`fit_features`.
        """
        self._fit_input(support, labels, domains)
        return self

    def _fit_input(self, support, labels, domains=None) -> tuple[torch.Tensor, np.ndarray]:
        feats, found, classes = self.input_features(support, desc="support features")
        if labels is None:
            labels = found
        if labels is None:
            raise ValueError("the support set has no labels: pass labels= or class folders")
        fit_support(self, feats, labels, domains)
        if classes is not None and labels is found:
            self.class_names_ = [classes[int(c)] for c in self.classes_]
        return feats, np.asarray(labels)

    def _validate_support(self, features, labels, domains=None) -> tuple[torch.Tensor, np.ndarray]:
        """Checked support features ``(N, D)`` and integer ``labels``; sets ``classes_``."""
        features = check_features(torch.as_tensor(features, dtype=torch.float32), "support features")
        labels = np.asarray(labels)
        if features.ndim != 2:
            raise ValueError(f"support features must be (N, D), got {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(
                f"{features.shape[0]} support features but {labels.shape[0]} labels"
            )
        if features.shape[0] == 0:
            raise ValueError("the support set is empty: fit needs at least one labelled image")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.min() < 0:
            raise ValueError(f"support labels must be >= 0, got {int(labels.min())} (-1 is UNKNOWN, "
                             "the prediction for unknown images)")
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
                stacklevel=3,
            )
        self.classes_ = classes
        self.__dict__.pop("threshold_", None)  # a threshold of another fit is stale
        if domains is not None and np.asarray(domains).shape != labels.shape:
            raise ValueError(f"{labels.shape[0]} support labels but {np.asarray(domains).size} "
                             "domain ids")
        return features, labels

    def fit_features(self, features, labels, domains: Sequence | None = None) -> "Detector":
        """Fit on support features ``(N, D)`` and integer ``labels``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- scoring
    def score_features(self, features) -> np.ndarray:
        """Normality of each test feature: higher = more likely one of the known classes."""
        raise NotImplementedError

    def nearest_class_features(self, features) -> np.ndarray:
        """The closed-set prediction: the known class each test feature is nearest to."""
        raise NotImplementedError

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Normality and nearest known class of each test feature."""
        return self.score_features(features), self.nearest_class_features(features)

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

        ``threshold=None`` uses ``threshold_`` (set by ``calibrate``; error if there is none).
        """
        threshold = self._threshold(threshold)
        normality, pred = self.score_and_nearest_features(features)
        return np.where(normality >= threshold, pred, UNKNOWN)

    def predict(self, x, threshold: float | None = None) -> np.ndarray:
        threshold = self._threshold(threshold)  # fail before extracting features
        return self.predict_features(self.features(x, desc="test features")[0], threshold)

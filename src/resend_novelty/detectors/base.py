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

import functools
import inspect
import warnings
from typing import Sequence

import numpy as np
import torch

from ..backbones import Backbone, build_backbone
from ..features import (FeatureCache, InputFeatures, check_features, default_device,
                        input_features)

__all__ = ["UNKNOWN", "Detector", "fit_support", "clone"]

UNKNOWN = -1


def fit_support(detector, features, labels, domains=None):
    """``detector.fit_features(features, labels)``, passing ``domains=`` (the source domain of
    each support row) only when there are domains: detectors written without a ``domains``
    parameter keep working on single-source supports, and fail loudly on multi-source ones."""
    if domains is None:
        return detector.fit_features(features, labels)
    return detector.fit_features(features, labels, domains=domains)


def clone(detector: "Detector") -> "Detector":
    """A new, unfitted detector with the same constructor parameters (scikit-learn's ``clone``
    works too: :meth:`Detector.get_params` follows its rules)."""
    return type(detector)(**detector.get_params())


def _recording_init(init):
    """Wrap a detector ``__init__`` so that the outermost call records its arguments (defaults
    applied, ``**kwargs`` flattened) in ``_params``: what :meth:`Detector.get_params` returns."""

    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_params" in self.__dict__:  # a super().__init__ call: the outer one recorded
            return init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        params = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name == "self":
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:
                params.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                params[name] = value
        self.__dict__["_params"] = params
        try:
            return init(self, *args, **kwargs)
        except BaseException:
            self.__dict__.pop("_params", None)
            raise

    wrapper._records_params = True
    return wrapper


class Detector:
    """Abstract novelty detector: fit on a labelled support set, score the normality of tests.

    Subclasses implement :meth:`fit_features`, :meth:`score_features` and
    :meth:`nearest_class_features`; ``name`` is the registry name, ``description`` one line for
    the command-line help.

    Estimator conventions (scikit-learn's): :meth:`get_params` / :meth:`set_params` give and
    change the constructor parameters (:func:`clone` builds an unfitted copy), fitted
    attributes end in ``_``; :meth:`score_samples` is :meth:`score`, :meth:`decision_function`
    the normality minus the threshold (negative = flagged unknown).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_params", False):
            cls.__init__ = _recording_init(init)

    # ----------------------------------------------------------------- parameters
    @classmethod
    def _param_defaults(cls) -> dict:
        """Every constructor parameter of the class and its bases with its default (the most
        derived class's default wins)."""
        out: dict = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for name, p in inspect.signature(inspect.unwrap(init)).parameters.items():
                if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                out[name] = None if p.default is inspect.Parameter.empty else p.default
        return out

    def get_params(self, deep: bool = False) -> dict:
        """The constructor parameters of this detector, as given (defaults where not given)."""
        params = self._param_defaults()
        params.update(self.__dict__.get("_params", {}))
        return params

    def set_params(self, **params) -> "Detector":
        """Change constructor parameters (checked as by the constructor). The fitted state is
        dropped: fit again."""
        valid = self._param_defaults()
        bad = sorted(set(params) - set(valid))
        if bad:
            raise ValueError(f"invalid parameter(s) {bad} for {type(self).__name__}; valid: "
                             f"{sorted(valid)}")
        merged = {**self.get_params(), **params}
        type(self)(**merged)  # checked on a new instance first: a refused value changes nothing
        for name in [k for k in self.__dict__ if k.endswith("_") and not k.startswith("_")]:
            del self.__dict__[name]
        self.__dict__.pop("_params", None)
        self.__init__(**merged)
        return self

    name = "detector"
    description = ""
    # takes a relational checkpoint (``model=``): its name and SHA-256 go into detector files
    uses_model = False
    # trains a classifier head on the support set (the paper's fine-tuning baselines)
    fine_tunes = False
    # command-line options of the method: {argparse dest: constructor parameter}
    cli_params: dict[str, str] = {}
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

    def score_samples(self, x) -> np.ndarray:
        """scikit-learn's name of :meth:`score` (the normality; higher = more likely known)."""
        return self.score(x)

    def threshold_for_features(self, features) -> float:
        """The threshold the decision on these test features uses: ``threshold_`` (a method
        whose threshold depends on the images scored together overrides this)."""
        return self._threshold(None)

    def threshold_and_scores_features(self, features) -> tuple[float, np.ndarray | None]:
        """``(threshold_for_features, the left-out support scores it rests on or None)``."""
        return self.threshold_for_features(features), None

    def decision_function_features(self, features) -> np.ndarray:
        """Normality minus the threshold: >= 0 accepted as known, < 0 flagged unknown."""
        threshold = self.threshold_for_features(features)
        return self.score_features(features) - threshold

    def decision_function(self, x) -> np.ndarray:
        """Normality minus the threshold of each test input (< 0: flagged unknown)."""
        self._threshold(None)  # fail before extracting features
        return self.decision_function_features(self.features(x, desc="test features")[0])

    def _threshold(self, threshold: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        if getattr(self, "threshold_", None) is None:
            raise ValueError(
                "no threshold: pass threshold=... or call calibrate(support, tpr=...) first"
            )
        return float(self.threshold_)

    def predict_features(self, features, threshold: float | None = None,
                         names: bool = False) -> np.ndarray:
        """Nearest known class, or ``UNKNOWN`` (-1) where the normality is below ``threshold``.

        ``threshold=None`` uses the calibrated threshold (:meth:`threshold_for_features`; error
        if there is none). ``names=True``: class names (``class_names_``) and ``"unknown"``
        instead of class ids and -1.
        """
        if threshold is None:
            threshold = self.threshold_for_features(features)
        normality, pred = self.score_and_nearest_features(features)
        out = np.where(normality >= float(threshold), pred, UNKNOWN)
        return self._named(out) if names else out

    def _named(self, pred: np.ndarray) -> np.ndarray:
        """Class ids (or UNKNOWN) -> class names (or "unknown")."""
        lookup = dict(zip(np.asarray(self.classes_).tolist(), self.class_names))
        return np.array([lookup.get(int(p), "unknown") if p != UNKNOWN else "unknown"
                         for p in pred], dtype=object)

    @property
    def class_names(self) -> list[str]:
        """Names of the known classes (``class_names_`` where set, else the class ids)."""
        names = getattr(self, "class_names_", None)
        return list(names) if names is not None else [str(c) for c in self.classes_]

    def predict(self, x, threshold: float | None = None, names: bool = False) -> np.ndarray:
        """:meth:`predict_features` of the features of ``x``."""
        if threshold is None:
            self._threshold(None)  # fail before extracting features
        return self.predict_features(self.features(x, desc="test features")[0], threshold,
                                     names=names)

"""A fitted detector in one file: :func:`save_detector` and :func:`load_detector`.

The file is a safetensors file (tensors and a string-to-string metadata table, nothing
executable): fit once on a support folder, then score new images for weeks without the support
images. It holds

- the fitted tensors the detector class names in ``fitted_attributes`` (prototypes, the
  domain-normalised support features and their class index, class ids and counts, method
  specific tensors such as the Mahalanobis precision), the domain-normalisation statistics and
  the leave-one-out support scores, stored as ``fitted.<name>``;
- metadata (JSON): ``format`` (:data:`FORMAT`), ``package_version``, ``method`` and its
  ``options``, ``class_names``, ``threshold`` and ``threshold_rule`` (how it was chosen),
  ``backbone`` (name, feature-cache namespace, SHA-256 of its weights) and, for ``resend``,
  ``checkpoint`` (file name, SHA-256 of the file where known, SHA-256 of its tensors).

:func:`load_detector` rebuilds the detector and refuses a file written by another package
version, or whose backbone or relational checkpoint weights differ from those it was fitted
with (their SHA-256 are compared). Methods that fit more than prototype statistics (``ft-*``
train a head, ``gram`` keeps per-layer statistics of the images) cannot be saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..backbones import build_backbone
from ..integrity import sha256_file
from ..models import default_checkpoint_path, load_checkpoint
from .prototype import PrototypeDetector
from .registry import DETECTORS

__all__ = ["FORMAT", "SAVABLE_METHODS", "DetectorFileError", "save_detector", "load_detector",
           "read_detector_metadata", "state_sha256", "package_version"]

FORMAT = "resend-detector-v1"
# the prototype methods: their fitted state is class statistics of the support features
SAVABLE_METHODS = tuple(m for m, cls in DETECTORS.items() if issubclass(cls, PrototypeDetector))
_PREFIX = "fitted."


def package_version() -> str:
    """The installed version of resend-novelty ("unknown" in a bare source tree)."""
    try:
        return version("resend-novelty")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class DetectorFileError(ValueError):
    """A detector file is missing, not a detector file, or does not match this installation."""


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: constructor parameters that do not change the scores: given at load, never saved
RUNTIME_PARAMS = ("backbone", "model", "device", "cache", "batch_size", "num_workers",
                  "progress", "engine")


def _options(det: PrototypeDetector) -> dict:
    """The constructor parameters that change the scores (``get_params`` less
    :data:`RUNTIME_PARAMS`), the scoring policy (``per_image``) included: one declaration per
    option, the constructor's."""
    opts = {k: v for k, v in det.get_params().items() if k not in RUNTIME_PARAMS}
    bad = [k for k, v in opts.items() if not _is_json(v)]
    if bad:
        raise DetectorFileError(f"options {bad} of {det.name} cannot be written to a detector "
                                "file (not numbers, strings or lists)")
    return opts


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _checkpoint_info(model, checkpoint) -> dict:
    state = state_sha256(model)
    if checkpoint is None:  # the shipped checkpoint, if it is the one in use
        shipped = default_checkpoint_path()
        if state_sha256(load_checkpoint(shipped)) == state:
            checkpoint = shipped
    info = {"name": None, "sha256": None, "state_sha256": state, "shipped": False}
    if checkpoint is not None:
        info.update(name=os.path.basename(str(checkpoint)), sha256=sha256_file(checkpoint),
                    shipped=Path(checkpoint).resolve() == default_checkpoint_path(False).resolve())
    return info


def _threshold_rule(det) -> dict | None:
    """How ``threshold_`` was chosen: ``threshold_rule_`` if set, else from ``calibration_``."""
    if getattr(det, "threshold_", None) is None:
        return None
    rule = getattr(det, "threshold_rule_", None)
    if rule is None and getattr(det, "calibration_", None) is not None:
        cal = det.calibration_
        rule = {"source": cal.get("rule"), **{k: v for k, v in cal.items() if k != "rule"}}
    return rule or {"source": "given"}


def save_detector(detector: PrototypeDetector, path: str | os.PathLike, *,
                  checkpoint: str | os.PathLike | None = None, overwrite: bool = False,
                  extra: dict | None = None) -> str:
    """Write the fitted ``detector`` to ``path`` (a ``.safetensors`` file, atomically).

    ``checkpoint``: the relational checkpoint file of a ``resend`` detector, to record its name
    and SHA-256 (default: the shipped checkpoint when it is the one in use). ``overwrite``:
    replace an existing file (refused otherwise). ``extra``: more JSON metadata (``extra``
    key). Returns the path written.
    """
    name = getattr(detector, "name", type(detector).__name__)
    if name not in SAVABLE_METHODS or type(detector) is not DETECTORS.get(name):
        raise DetectorFileError(
            f"method {name!r} cannot be saved to a detector file (it fits more than class "
            f"statistics of the support features); savable methods: {', '.join(SAVABLE_METHODS)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise DetectorFileError(f"{path} exists: pass overwrite=True (CLI: --overwrite) to "
                                "replace it")
    tensors = {_PREFIX + k: v for k, v in detector.fitted_state().items()}
    bb = detector.backbone
    meta = {
        "format": FORMAT,
        "package_version": package_version(),
        "method": name,
        "options": _options(detector),
        "policy": detector.policy,
        "class_names": list(getattr(detector, "class_names_", [str(c) for c in detector.classes_])),
        "threshold": getattr(detector, "threshold_", None),
        "threshold_rule": _threshold_rule(detector),
        "backbone": {"name": bb.name, "cache_namespace": bb.cache_namespace,
                     "sha256": state_sha256(bb)},
        "checkpoint": (_checkpoint_info(detector.model, checkpoint) if detector.uses_model
                       else None),
        "extra": extra or {},
    }
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return str(path)


def read_detector_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a detector file, JSON values decoded; errors name the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise DetectorFileError(f"detector file not found: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            raw = dict(fh.metadata() or {})
    except Exception as exc:
        raise DetectorFileError(f"{path} is not a safetensors detector file ({exc})") from None
    if raw.get("format") != FORMAT:
        raise DetectorFileError(f"{path} is not a resend-novelty detector file "
                                f"(format={raw.get('format')!r}, expected {FORMAT!r})")
    out = {}
    for k, v in raw.items():
        if k in ("format", "package_version", "method"):
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError as exc:
            raise DetectorFileError(f"{path}: bad metadata: {k!r} is not JSON ({exc})") from None
    return out


def load_detector(path: str | os.PathLike, *, model=None, backbone=None, device=None,
                  cache=True, batch_size: int = 64, num_workers: int | None = None,
                  progress: bool = True, engine: str = "auto") -> PrototypeDetector:
    """The detector saved by :func:`save_detector`, ready to score (threshold included).

    ``model``: the relational checkpoint (path or module) of a ``resend`` file whose checkpoint
    is not the shipped one; ``backbone``: a backbone instance to use instead of building it by
    name. Both are checked against the SHA-256 recorded in the file. The other arguments are
    the run options of the detector (device, feature cache, batching, progress bars, inference
    engine). The scoring policy (``per_image``) and the threshold are the file's; change the
    policy with :meth:`~resend_novelty.detectors.PrototypeDetector.set_policy` (a
    leave-one-out threshold is calibrated again for it).
    """
    meta = read_detector_metadata(path)
    _check_metadata(path, meta)
    if meta["package_version"] != package_version():
        raise DetectorFileError(
            f"{path} was written by resend-novelty {meta['package_version']}, this is "
            f"{package_version()}: fit the detector again with this version (resend fit)")
    method = meta["method"]
    if method not in SAVABLE_METHODS:
        raise DetectorFileError(f"{path}: unknown method {method!r}")
    want = meta["backbone"]
    bb = backbone if backbone is not None else build_backbone(want["name"])
    if state_sha256(bb) != want["sha256"]:
        raise DetectorFileError(
            f"{path} was fitted with other {want['name']} backbone weights (sha256 "
            f"{want['sha256'][:12]}..., this installation's {state_sha256(bb)[:12]}...)")
    # files written before the shift gate / the raw weight existed were scored without them
    kwargs = dict({"shift_threshold": 0.0, "raw_weight": 0.0}, **meta["options"], backbone=bb,
                  device=device, cache=cache, batch_size=batch_size, num_workers=num_workers,
                  progress=progress, engine=engine)
    if DETECTORS[method].uses_model:
        kwargs["model"] = _load_model(path, meta["checkpoint"], model)
    unknown = sorted(set(meta["options"]) - set(DETECTORS[method]._param_defaults()))
    if unknown:
        raise DetectorFileError(f"{path}: unknown option(s) {unknown} for method {method!r}")
    try:
        det = DETECTORS[method](**kwargs)
    except (TypeError, ValueError) as exc:
        raise DetectorFileError(f"{path}: bad options ({exc})") from None
    with safe_open(str(path), framework="pt") as fh:
        state = {k[len(_PREFIX):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(_PREFIX)}
    _check_state(path, state, meta)
    det.load_fitted_state(state)
    if det.normalizer.active and getattr(det.normalizer, "support_mean_", None) is None:
        raise DetectorFileError(f"{path}: bad fitted state: no support_mean_ for its "
                                f"{det.normalizer.mode} normalisation")
    det.class_names_ = list(meta["class_names"])
    if meta["threshold"] is not None:
        det.threshold_ = float(meta["threshold"])
    det.threshold_rule_ = meta["threshold_rule"]
    det.metadata_ = meta
    return det


def _check_metadata(path, meta: dict) -> None:
    """Refuse detector metadata of the wrong kind before anything is built (one line, the file
    and the culprit named)."""
    def bad(what: str):
        raise DetectorFileError(f"{path}: bad metadata: {what}")

    for key in ("method", "options", "class_names", "backbone", "package_version"):
        if key not in meta:
            bad(f"no {key!r}")
    if not isinstance(meta["options"], dict):
        bad("'options' is not a table")
    names = meta["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        bad("'class_names' is not a list of names")
    bb = meta["backbone"]
    if not isinstance(bb, dict) or not all(isinstance(bb.get(k), str) for k in ("name", "sha256")):
        bad("'backbone' lacks a name and a sha256")
    t = meta.get("threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                          or not math.isfinite(t)):
        bad(f"'threshold' is not a finite number ({t!r})")
    if meta["method"] in SAVABLE_METHODS and DETECTORS[meta["method"]].uses_model and \
            not isinstance(meta.get("checkpoint"), dict):
        bad("'checkpoint' is missing")


def _check_state(path, state: dict, meta: dict) -> None:
    """Shapes and ranges of the fitted tensors, checked before they are used (a crafted index
    must not drive an allocation)."""
    def bad(what: str):
        raise DetectorFileError(f"{path}: bad fitted state: {what}")

    for key in ("classes_", "prototypes_", "support_features_", "support_index_"):
        if key not in state:
            bad(f"no {key}")
    protos, feats, index = state["prototypes_"], state["support_features_"], state["support_index_"]
    k = int(state["classes_"].shape[0]) if state["classes_"].ndim == 1 else -1
    if protos.ndim != 2 or protos.shape[0] != k or k < 1:
        bad(f"prototypes_ of shape {tuple(protos.shape)} for {k} classes")
    if feats.ndim != 2 or feats.shape[1] != protos.shape[1]:
        bad(f"support_features_ of shape {tuple(feats.shape)}")
    if index.ndim != 1 or index.shape[0] != feats.shape[0] or (
            index.numel() and (int(index.min()) < 0 or int(index.max()) >= k)):
        bad(f"support_index_ does not index {k} classes for {feats.shape[0]} support rows")
    if len(meta["class_names"]) != k:
        bad(f"{len(meta['class_names'])} class names for {k} classes")
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad(f"{key} holds NaN or infinite values")


def _load_model(path, info: dict, model):
    if model is None:
        if not info.get("shipped"):
            raise DetectorFileError(
                f"{path} was fitted with the relational checkpoint {info.get('name')!r} (not the "
                "shipped one): pass it (model=..., CLI --model)")
        model = default_checkpoint_path()
    module = model if isinstance(model, torch.nn.Module) else load_checkpoint(model)
    got = state_sha256(module)
    if got != info["state_sha256"]:
        raise DetectorFileError(
            f"{path} was fitted with another relational checkpoint ({info.get('name')}, tensors "
            f"sha256 {info['state_sha256'][:12]}...; given: {got[:12]}...)")
    return module

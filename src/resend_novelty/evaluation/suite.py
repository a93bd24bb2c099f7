"""The generalisation suite: seeded novelty episodes on several real data sets, for model selection.

Built from a data root only (``DATA/flowers12``, ``DATA/tiny_imagenet_200/train``, ``DATA/pacs``
and the official PACS lists), on cached backbone features. Three kinds of pool:

- :func:`flowers_pool`: flowers12 (12 species, real photos; support drawn from ``train/``, test =
  ``test/``), intra-domain and fine-grained;
- :func:`tiny_pool`: the Tiny-ImageNet classes held out of pretraining (the proxy's classes,
  :func:`~resend_novelty.evaluation.proxy.proxy_records`), the first ``per_class`` images of each
  in natural order: the first half as photos for supports, the second half as photos (intra-domain
  test) and in the sketch / cartoon / painting views of pretraining (cross-domain test; biased:
  the fine-tuned backbones and the relational module trained on those styles);
- PACS: each domain alone (intra-domain, the images of a class split in halves per episode) and
  the official single- and multi-source lists (:mod:`.settings`).

An episode (:class:`Episode`) is a set of support rows and test rows of one pool:
:func:`intra_episodes` draws known / unknown classes, ``support`` images per known class from the
support part and the test images of the episode classes from the test part, then
:func:`subsample_unknown_share` keeps a given share of unknown test images. Support and test
never share a row (nor a source image). Everything is seeded: the same arguments give the same
episodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import (STYLE_ORDER, DomainShiftView, reference_records, scan_class_folders,
                    split_validation)
from ..detectors import fit_support
from ..features import extract_features
from .lists import load_setting_lists
from .metrics import auroc
from .settings import get_setting

__all__ = ["FeaturePool", "Episode", "flowers_records", "tiny_records", "tiny_style_views",
           "intra_episodes", "list_episodes", "subsample_unknown_share", "split_halves",
           "cap_per_class", "score_episodes", "load_pools", "official_lists", "TINY_STYLES",
           "PACS_DOMAINS"]

PACS_DOMAINS = ("photo", "art_painting", "cartoon", "sketch")

TINY_STYLES = ("sketch", "cartoon", "painting")  # views 0, 1, 2 of data.STYLE_ORDER


@dataclass
class FeaturePool:
    """Rows of one data set: ``features`` (``{feature set name: (N, D) tensor}``, the same rows
    in every set), ``labels`` (class id per row), ``domain`` (name per row) and ``part``
    ("support": may be a support image, "test": may be a test image, "any": either, split per
    episode)."""

    name: str
    features: dict
    labels: np.ndarray
    domain: np.ndarray
    part: np.ndarray
    paths: list | None = None  # the image of each row, where known (resolved paths)

    def __post_init__(self):
        sizes = {k: v.shape[0] for k, v in self.features.items()}
        n = len(self.labels)
        if any(v != n for v in sizes.values()):
            raise ValueError(f"pool {self.name}: {n} labels but features of {sizes} rows")
        for what in ("labels", "domain", "part"):
            if len(getattr(self, what)) != n:
                raise ValueError(f"pool {self.name}: {n} features but "
                                 f"{len(getattr(self, what))} {what}")


@dataclass
class Episode:
    """Rows of a pool: ``support`` (with ``known`` classes) and ``test``; ``domains``: the source
    domain of each support row when the support is multi-source (else None)."""

    support: np.ndarray
    test: np.ndarray
    known: np.ndarray
    unknown: np.ndarray
    domains: np.ndarray | None = field(default=None)


# ------------------------------------------------------------------------------ records
def flowers_records(data_root) -> tuple[list, list]:
    """``(train records, test records)`` of ``DATA/flowers12`` (labels: species index, the same
    in both splits)."""
    root = Path(data_root) / "flowers12"
    train, classes = scan_class_folders(root / "train")
    test, _ = scan_class_folders(root / "test", class_names=classes)
    return train, test


def tiny_records(data_root, val_classes: int = 30, seed: int = 0, per_class: int = 30,
                 styled_per_class: int = 5) -> tuple[list, list, list, np.ndarray]:
    """The held-out Tiny-ImageNet classes (``split_validation(labels, val_classes, seed)``, the
    proxy's and pretraining's draw): ``(support photos, test photos, styled, held-out class
    ids)``. Per class (natural file order) the first ``per_class // 2`` images are support
    photos, the next ones test photos; ``styled``: the first ``styled_per_class`` test images of
    each class, rendered in every style of :data:`TINY_STYLES` (stylising is the slow part)."""
    records, _ = reference_records(str(Path(data_root) / "tiny_imagenet_200" / "train"))
    labels = np.array([r.label for r in records])
    _, val = split_validation(labels, val_classes, seed)
    support, test, styled, rank = [], [], [], {}
    half = per_class // 2
    for r in records:
        if r.label not in val:
            continue
        i = rank.get(r.label, 0)
        rank[r.label] = i + 1
        if i < half:
            support.append(r)
        elif i < per_class:
            test.append(r)
            if i < half + styled_per_class:
                styled.append(r)
    return support, test, styled, np.asarray(val)


def tiny_style_views() -> dict[str, int]:
    """``{style: view}`` of :class:`~resend_novelty.data.DomainShiftView` with STYLE_ORDER."""
    return {s: STYLE_ORDER.index(s) for s in TINY_STYLES}


# ------------------------------------------------------------------------------ episodes
def split_halves(labels: np.ndarray, rows: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` per class (``labels[rows]``) into two random halves: ``(first, second)``."""
    first, second = [], []
    for c in np.unique(labels[rows]):
        r = rng.permutation(rows[labels[rows] == c])
        first.append(r[: len(r) // 2])
        second.append(r[len(r) // 2:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def subsample_unknown_share(test: np.ndarray, is_unknown: np.ndarray, share: float | None,
                            rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """The largest subset of ``test`` rows (``is_unknown`` per row) of at most ``size`` rows
    whose unknown share is ``share`` (rounded to whole images); ``None`` keeps ``test``. Rows
    drawn at random, returned sorted."""
    if share is None:
        return test
    if not 0.0 < share < 1.0:
        raise ValueError(f"unknown share must be in (0, 1), got {share}")
    unk, kno = test[is_unknown], test[~is_unknown]
    if len(unk) == 0 or len(kno) == 0:
        raise ValueError("subsampling the unknown share needs known and unknown test images")
    total = min(len(unk) / share, len(kno) / (1 - share), float(size or np.inf))
    n_unk = min(len(unk), max(1, int(round(total * share))))
    n_kno = min(len(kno), max(1, int(round(total * (1 - share)))))
    return np.sort(np.concatenate([rng.choice(unk, n_unk, replace=False),
                                   rng.choice(kno, n_kno, replace=False)]))


def intra_episodes(pool: FeaturePool, n_known: int, n_unknown: int, support: int | None,
                   n_episodes: int, seed: int, share: float | None = None,
                   test_domain: str | None = None, support_domain: str | None = None,
                   test_per_class: int | None = None) -> list[Episode]:
    """Seeded episodes of ``pool``: ``n_known`` known and ``n_unknown`` unknown classes drawn
    from its classes; ``support`` images per known class (None = all) from the support rows;
    test = the test rows of the episode classes, subsampled to an unknown ``share``.

    Rows with ``part == "any"`` (e.g. one PACS domain) are split in halves per class and
    episode: support drawn from one half, test = the other. ``support_domain`` /
    ``test_domain`` restrict the support / test rows to one domain; ``test_per_class`` keeps at
    most that many test images per class (drawn per episode, before the share is applied).
    """
    classes = np.unique(pool.labels)
    if n_known + n_unknown > len(classes):
        raise ValueError(f"pool {pool.name}: {n_known} known + {n_unknown} unknown > "
                         f"{len(classes)} classes")
    if support is not None and support < 1:
        raise ValueError(f"support must be >= 1 image per class or None (all), got {support}")
    rng = np.random.default_rng([seed, 4243])
    s_ok = pool.part != "test"
    t_ok = pool.part != "support"
    if support_domain is not None:
        s_ok &= pool.domain == support_domain
    if test_domain is not None:
        t_ok &= pool.domain == test_domain
    out = []
    for _ in range(n_episodes):
        perm = rng.permutation(classes)
        known, unknown = np.sort(perm[:n_known]), np.sort(perm[n_known:n_known + n_unknown])
        episode_rows = np.isin(pool.labels, perm[:n_known + n_unknown])
        s_rows = np.flatnonzero(s_ok & episode_rows & np.isin(pool.labels, known))
        t_rows = np.flatnonzero(t_ok & episode_rows)
        either = np.flatnonzero(s_ok & t_ok & episode_rows)  # "any" rows: split in halves
        if len(either):
            a, b = split_halves(pool.labels, either, rng)
            s_rows = np.setdiff1d(s_rows, b)  # known classes: half a may be support
            t_rows = np.setdiff1d(t_rows, a)  # every episode class: half b is test
        if support is not None:
            picked = []
            for c in known:
                rows = s_rows[pool.labels[s_rows] == c]
                picked.append(rng.choice(rows, min(support, len(rows)), replace=False))
            s_rows = np.sort(np.concatenate(picked))
        t_rows = cap_per_class(t_rows, pool.labels, test_per_class, rng)
        t_rows = subsample_unknown_share(t_rows, ~np.isin(pool.labels[t_rows], known), share, rng)
        out.append(Episode(s_rows, t_rows, known, unknown))
    return out


def cap_per_class(rows: np.ndarray, labels: np.ndarray, cap: int | None,
                  rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``rows`` per class (``labels[rows]``), drawn at random; sorted."""
    if cap is None:
        return rows
    keep = [rng.choice(r, min(cap, len(r)), replace=False)
            for r in (rows[labels[rows] == c] for c in np.unique(labels[rows]))]
    return np.sort(np.concatenate(keep)) if keep else rows


def list_episodes(support: np.ndarray, test: np.ndarray, labels: np.ndarray, n_episodes: int,
                  seed: int, share: float | None = None, test_size: int | None = None,
                  domains: np.ndarray | None = None) -> list[Episode]:
    """Episodes of a fixed support / test split (e.g. an official list pair): the whole support
    (``domains``: its source domains, multi-source), and per episode ``test_size`` test rows
    drawn at random (None = all), with an unknown ``share`` where given (drawn from the whole
    test list). Known classes = the support's labels."""
    if len(np.intersect1d(support, test)):
        raise ValueError("support and test rows overlap")
    rng = np.random.default_rng([seed, 7717])
    known = np.unique(labels[support])
    unknown = np.setdiff1d(np.unique(labels[test]), known)
    out = []
    for _ in range(n_episodes):
        t = test
        if share is not None:  # from the whole test list: enough unknowns for any share
            t = subsample_unknown_share(t, ~np.isin(labels[t], known), share, rng, test_size)
        elif test_size is not None and test_size < len(t):
            t = np.sort(rng.choice(t, test_size, replace=False))
        out.append(Episode(np.asarray(support), t, known, unknown, domains))
    return out


def score_episodes(make_detector, features: torch.Tensor, labels: np.ndarray,
                   episodes: list[Episode]) -> list[float]:
    """AUROC (known = positive) of a fresh ``make_detector()`` per episode, fitted on the
    episode's support rows of ``features`` and scoring its test rows together."""
    out = []
    for ep in episodes:
        det = make_detector()
        fit_support(det, features[ep.support], labels[ep.support], ep.domains)
        scores = np.asarray(det.score_features(features[ep.test]))
        out.append(auroc(scores, np.isin(labels[ep.test], ep.known)))
    return out


# ------------------------------------------------------------------------------ pools
def _features(backbones: dict, paths: list[str], progress: bool, desc: str, view=None) -> dict:
    """``{name: features}`` of ``paths`` for each backbone of ``backbones`` (cached)."""
    out = {}
    for name, bb in backbones.items():
        kw = {}
        if view is not None:
            aug = DomainShiftView(view, bb.transform, STYLE_ORDER)
            kw = dict(transform=aug, namespace_suffix=aug.namespace_suffix)
        out[name] = extract_features(bb, paths, progress=progress, desc=f"{desc} [{name}]", **kw)
    return out


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def load_pools(data_root, backbones: dict, photo_backbones: dict | None = None,
               progress: bool = True, tiny_per_class: int = 30, tiny_styled: int = 5
               ) -> dict[str, FeaturePool]:
    """The suite's pools from ``data_root``: ``flowers12``, ``tiny`` (photos and
    :data:`TINY_STYLES` views) and ``pacs`` (every image of the four domains), with the features
    of every backbone of ``backbones`` (``{name: Backbone}``) and, for the photo-only pools
    (flowers12 and the tiny photos), also of ``photo_backbones``. Features come from the cache
    (extracted once)."""
    photo = {**backbones, **(photo_backbones or {})}
    pools = {}
    train, test = flowers_records(data_root)
    recs = train + test
    pools["flowers12"] = FeaturePool(
        "flowers12", _features(photo, [r.path for r in recs], progress, "flowers12"),
        np.array([r.label for r in recs]), np.full(len(recs), "photo"),
        np.array(["support"] * len(train) + ["test"] * len(test)))
    sup, tst, styled, _ = tiny_records(data_root, per_class=tiny_per_class,
                                       styled_per_class=tiny_styled)
    parts = [_features(photo, [r.path for r in sup + tst], progress, "tiny photo")]
    parts = [{k: v for k, v in parts[0].items() if k in backbones}]
    labels = [r.label for r in sup + tst]
    domain = ["photo"] * (len(sup) + len(tst))
    part = ["support"] * len(sup) + ["test"] * len(tst)
    for style, view in tiny_style_views().items():
        parts.append(_features(backbones, [r.path for r in styled], progress, f"tiny {style}",
                               view))
        labels += [r.label for r in styled]
        domain += [style] * len(styled)
        part += ["test"] * len(styled)
    pools["tiny"] = FeaturePool("tiny", _cat(parts), np.array(labels), np.array(domain),
                                np.array(part))
    if photo_backbones:  # the photo rows only, with every feature set
        n = len(sup) + len(tst)
        feats = _features(photo, [r.path for r in sup + tst], progress, "tiny photo")
        pools["tiny-photo"] = FeaturePool("tiny-photo", feats, np.array(labels[:n]),
                                          np.array(domain[:n]), np.array(part[:n]))
    recs, names = [], None
    for d in PACS_DOMAINS:
        r, classes = scan_class_folders(Path(data_root) / "pacs" / d, class_names=names)
        names = names or classes
        recs += [(x, d) for x in r]
    pools["pacs"] = FeaturePool(
        "pacs", _features(backbones, [r.path for r, _ in recs], progress, "pacs"),
        np.array([r.label for r, _ in recs]), np.array([d for _, d in recs]),
        np.full(len(recs), "any"), [str(Path(r.path).resolve()) for r, _ in recs])
    return pools


def official_lists(setting, data_root, pool: FeaturePool) -> dict:
    """``{target: (support rows, test rows, labels, support domains or None)}`` of an official
    list setting (e.g. ``get_setting("pacs-multi")``) as rows of ``pool`` (its ``paths``); the
    labels are those of the lists (every row of ``pool`` gets one: -1 where unlisted)."""
    setting = get_setting(setting) if isinstance(setting, str) else setting
    row = {p: i for i, p in enumerate(pool.paths)}
    out = {}
    for name, (support, test) in load_setting_lists(setting, data_root).items():
        labels = np.full(len(pool.paths), -1)
        rows = []
        for recs in (support, test):
            idx = np.array([row[str(Path(r.path).resolve())] for r in recs])
            labels[idx] = [r.label for r in recs]
            rows.append(idx)
        out[name] = (rows[0], rows[1], labels, setting.support_domains(support))
    return out

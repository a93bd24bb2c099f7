"""Benchmark settings of the paper, by name, and their evaluation.

A setting is a set of targets; each target has a support list (the known classes and their
images) and a test list. Known classes are the labels present in the support list; test samples
with other labels are unknown. Lists use the official format and are resolved under a data root
(``--data-root``, or ``$RESEND_DATA``).

The official lists of every setting except PACS ship inside the package (``resend_novelty/lists``,
copied from the authors' repository); the PACS lists are read from ``DIR/pacs_lists``. Before any
backbone runs, every image of every list is checked: missing images are counted and reported with
the folder they were looked for in (:func:`load_setting_lists`).

The backbone runs once per unique image (features are cached on disk); detectors then only
compute prototypes and scores, which takes seconds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.images import DataError, ImageRecord, read_list_file, resolve_list_path
from .metrics import closed_set_accuracy, novelty_report

__all__ = [
    "Target",
    "Setting",
    "SETTINGS",
    "get_setting",
    "register_setting",
    "resolve_data_root",
    "load_setting_lists",
    "missing_list_files",
    "setting_summary",
    "run_benchmark",
    "format_table",
]


@dataclass(frozen=True)
class Target:
    name: str
    support: str  # list file, relative to the setting's list directory
    test: str


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    list_dir: str  # relative to the data root, or to the package's lists/ when packaged=True
    targets: tuple[Target, ...]
    packaged: bool = False  # list files shipped inside the package
    layout: str = ""  # expected image layout under the data root, for users and error messages
    paper: dict = field(default_factory=dict)  # published ReSeND numbers {target: (auroc, fpr95)}
    note: str = ""
    image_root: str = ""  # folder under the data root in which list entries are resolved
    known_classes: int | None = None  # documented number of known classes
    total_classes: int | None = None  # documented number of classes (known + unknown)
    paper_ref: str = ""  # where the paper reports ReSeND on this setting
    unavailable: str = ""  # why a list file may be missing (said instead of a bare "not found")
    # multi-source: the source domain of a support image is the folder two levels above it
    # (<domain>/<class>/<file>); detectors with domain normalisation use it (fit_features domains=)
    support_domains_from_path: bool = False

    def support_domains(self, records) -> np.ndarray | None:
        """The source domain of each support record, or None for a single-source setting."""
        if not self.support_domains_from_path:
            return None
        return np.array([Path(r.path).parent.parent.name for r in records])

    def list_path(self, data_root: str | os.PathLike | None, rel: str,
                  lists_dir: str | os.PathLike | None = None) -> Path:
        """Where the list file ``rel`` is read from (``lists_dir`` overrides the default)."""
        if lists_dir is not None:
            return Path(lists_dir) / rel
        if self.packaged:
            from importlib import resources

            return Path(str(resources.files("resend_novelty") / "lists" / self.list_dir / rel))
        if data_root is None:
            raise DataError(f"benchmark {self.name}: its lists are under DIR/{self.list_dir}: "
                            "pass --data-root DIR or set RESEND_DATA")
        return Path(data_root) / self.list_dir / rel

    def image_dir(self, data_root: str | os.PathLike) -> Path:
        """The folder list entries are resolved in."""
        return Path(data_root) / self.image_root if self.image_root else Path(data_root)

    def list_files(self) -> list[str]:
        """The distinct list files of the setting, in target order."""
        return list(dict.fromkeys(f for t in self.targets for f in (t.support, t.test)))


SETTINGS: dict[str, Setting] = {}


def register_setting(setting: Setting) -> Setting:
    SETTINGS[setting.name] = setting
    return setting


register_setting(
    Setting(
        name="pacs-multi",
        title="PACS multi-source (leave one domain out)",
        list_dir="pacs_lists/PACS_DG",
        targets=tuple(
            Target(t, f"no_{t}.txt", f"{t}.txt")
            for t in ("ArtPainting", "Sketch", "Cartoon", "Photo")
        ),
        layout="DIR/pacs/<domain>/<class>/<file> and DIR/pacs_lists/PACS_DG/*.txt",
        paper={"avg": (0.765, 0.687)},
        support_domains_from_path=True,
        known_classes=6,
        total_classes=7,
    )
)
register_setting(
    Setting(
        name="pacs-single",
        title="PACS single-source (Photo -> other domains)",
        list_dir="pacs_lists/PACS_SS_DG",
        targets=tuple(
            Target(t, "Source.txt", f"{t}.txt") for t in ("ArtPainting", "Sketch", "Cartoon")
        ),
        layout="DIR/pacs/<domain>/<class>/<file> and DIR/pacs_lists/PACS_SS_DG/*.txt",
        paper={"avg": (0.685, 0.847)},
        known_classes=6,
        total_classes=7,
    )
)

# ---------------------------------------------------------------- settings with packaged lists
_DOMAINNET_LAYOUT = "DIR/DomainNet/{real,painting,sketch}/<class>/<file> (official DomainNet archives)"
_OFFICEHOME_LAYOUT = (
    "DIR/OfficeHome/{Art,Clipart,Product,Real_World}/<class>/<file> "
    "(official archive; rename 'Real World' to 'Real_World')"
)

register_setting(
    Setting(
        name="dtd",
        title="Texture (DTD), intra-domain",
        list_dir="DTD",
        packaged=True,
        targets=(Target("DTD", "in_distribution.txt", "out_distribution.txt"),),
        layout="DIR/dtd/images/<class>/<file> (the official dtd-r1.0.1 archive, extracted in DIR)",
        known_classes=23,
        total_classes=47,
        paper_ref="Table 1",
    )
)
for _domain, _folder in (("Real", "DomainNet_IN_OUT"), ("Painting", "DomainNet_Painting"),
                         ("Sketch", "DomainNet_Sketch")):
    register_setting(
        Setting(
            name=f"domainnet-{_domain.lower()}",
            title=f"DomainNet {_domain}, intra-domain",
            list_dir=_folder,
            packaged=True,
            targets=(Target(_domain, "in_distribution.txt", "out_distribution.txt"),),
            image_root="DomainNet",
            layout=_DOMAINNET_LAYOUT,
            known_classes=25,
            total_classes=50,
            paper_ref="Table 1",
        )
    )
_DN = ("Real", "Painting", "Sketch")
register_setting(
    Setting(
        name="domainnet-cross",
        title="DomainNet cross-domain (one source domain -> another target domain)",
        list_dir="DomainNet_DG",
        packaged=True,
        # Source_X holds X's images of the 25 known classes, Target_Y Y's test images of all 50;
        # X == Y are the intra-domain settings above (identical lists), so only X != Y here.
        targets=tuple(
            Target(f"{src}->{tgt}", f"Source_{src}.txt", f"Target_{tgt}.txt")
            for src in _DN for tgt in _DN if src != tgt
        ),
        image_root="DomainNet",
        layout=_DOMAINNET_LAYOUT,
        known_classes=25,
        total_classes=50,
        paper_ref="the paper's DomainNet cross-domain results",
    )
)
register_setting(
    Setting(
        name="officehome-single",
        title="Office-Home single-source (Real World -> other domains)",
        list_dir="OfficeHome_SS_DG",
        packaged=True,
        targets=tuple(Target(t, "Source.txt", f"{t}.txt") for t in ("Art", "Clipart", "Product")),
        layout=_OFFICEHOME_LAYOUT,
        known_classes=25,
        total_classes=65,
        paper_ref="Table 4",
    )
)
register_setting(
    Setting(
        name="officehome-multi",
        title="Office-Home multi-source (leave one domain out)",
        list_dir="OfficeHome_DG",
        packaged=True,
        targets=tuple(
            Target(t, f"no_{t}.txt", f"{t}.txt") for t in ("Art", "Clipart", "Product", "RealWorld")
        ),
        layout=_OFFICEHOME_LAYOUT,
        support_domains_from_path=True,
        known_classes=54,
        total_classes=65,
        paper_ref="Table 4",
    )
)
register_setting(
    Setting(
        name="multidatasets",
        title="Multi-Datasets (several source datasets -> DomainNet domains)",
        list_dir="MultiDatasets_DG",
        packaged=True,
        targets=tuple(
            Target(t, "Sources.txt", f"{t}.txt") for t in ("Clipart", "Painting", "Real", "Sketch")
        ),
        layout="DIR/DomainNet/{clipart,painting,real,sketch}/<class>/<file> for the targets, "
        "plus the datasets named in Sources.txt",
        known_classes=48,
        total_classes=68,
        paper_ref="Table 4",
        unavailable=(
            "the support list MultiDatasets_DG/Sources.txt of the official repository could not "
            "be obtained, so it is not shipped; if you have it, pass the folder holding it and "
            "the four target lists with --lists-dir"
        ),
    )
)


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(SETTINGS))}")
    return SETTINGS[name]


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    if data_root is None:
        data_root = os.environ.get("RESEND_DATA")
        if not data_root:
            raise DataError("no data root: pass --data-root DIR or set RESEND_DATA")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data root not found: {root}")
    return root


def missing_list_files(setting: Setting, data_root=None, lists_dir=None) -> list[Path]:
    """The list files of ``setting`` that do not exist (where they were looked for)."""
    return [
        p for p in (setting.list_path(data_root, rel, lists_dir) for rel in setting.list_files())
        if not p.is_file()
    ]


def _first_per_class(records: list[ImageRecord], n: int) -> list[ImageRecord]:
    counts: dict[int, int] = {}
    out = []
    for r in records:
        if counts.get(r.label, 0) < n:
            counts[r.label] = counts.get(r.label, 0) + 1
            out.append(r)
    return out


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return Path(path.anchor or ".")


def load_setting_lists(
    setting: Setting | str,
    data_root,
    *,
    lists_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    check_images: bool = True,
) -> dict[str, tuple[list[ImageRecord], list[ImageRecord]]]:
    """Read every target's support/test lists: ``{target: (support, test)}``.

    List entries are resolved under ``data_root`` (its ``setting.image_root`` sub-folder). All
    list files are read first; then (``check_images``) every image is checked, and if any is
    missing a :class:`DataError` says how many of how many, where they were looked for, the first
    missing ones with their list line, and the expected layout -- before any backbone runs.

    ``lists_dir`` reads the list files from that folder instead of the default location.
    ``max_per_class`` keeps only the first N images of each label of every list file (a quick
    check of a data layout; the numbers are then not those of the official protocol).
    """
    if isinstance(setting, str):
        setting = get_setting(setting)
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    root = resolve_data_root(data_root)
    missing_lists = missing_list_files(setting, root, lists_dir)
    if missing_lists:
        why = f"; {setting.unavailable}" if setting.unavailable else ""
        raise DataError(
            f"benchmark {setting.name} cannot run: list file(s) not found: "
            + ", ".join(str(p) for p in missing_lists) + why
        )
    image_dir = setting.image_dir(root)
    lists: dict[str, list[ImageRecord]] = {}
    for rel in setting.list_files():
        records = read_list_file(setting.list_path(root, rel, lists_dir), image_dir, check_exists=False)
        if max_per_class is not None:
            records = _first_per_class(records, max_per_class)
        lists[rel] = records
    if check_images:
        seen: dict[str, ImageRecord] = {}
        for records in lists.values():
            for r in records:
                seen.setdefault(r.path, r)
        missing = [r for p, r in seen.items() if not os.path.isfile(p)]
        if missing:
            first = "\n  ".join(f"{r.path} (from {r.source})" for r in missing[:3])
            per_list = ", ".join(
                f"{rel}: {n}/{len(recs)}"
                for rel, recs in lists.items()
                if (n := sum(1 for r in recs if not os.path.isfile(r.path)))
            )
            raise DataError(
                f"benchmark {setting.name}: {len(missing)} of {len(seen)} images missing under "
                f"{image_dir} (missing per list: {per_list}); first:\n  {first}\n"
                f"nearest existing folder of the first: {_nearest_existing(Path(missing[0].path))}\n"
                f"expected layout: {setting.layout or 'see the README, section Benchmark settings of the paper'}"
            )
    return {t.name: (lists[t.support], lists[t.test]) for t in setting.targets}


def setting_summary(setting: Setting | str, data_root=None, lists_dir=None,
                    check_images: bool = False) -> dict:
    """Sizes of a setting from its lists (no image is read).

    Returns ``{"name", "targets", "available", "reason", "n_support", "n_test", "known",
    "unknown"}``: distinct support / test images over all targets, known classes (labels of the
    support lists) and unknown classes present in the test lists (ranges ``"min-max"`` when
    they differ between targets). Unavailable lists give None sizes and the reason. With
    ``check_images`` (and a data root) ``"missing_images"`` counts the images not found.
    """
    if isinstance(setting, str):
        setting = get_setting(setting)
    out: dict = {"name": setting.name, "targets": len(setting.targets), "available": True,
                 "reason": "", "n_support": None, "n_test": None,
                 "known": setting.known_classes, "unknown": None}
    if setting.known_classes is not None and setting.total_classes is not None:
        out["unknown"] = setting.total_classes - setting.known_classes
    root = Path(data_root) if data_root is not None else None
    if root is None and not setting.packaged and lists_dir is None:
        out.update(available=False,
                   reason=f"needs --data-root (its lists are in DIR/{setting.list_dir})")
        return out
    missing = missing_list_files(setting, root, lists_dir)
    if missing:
        out.update(available=False, reason=setting.unavailable
                   or "list file(s) not found: " + ", ".join(map(str, missing)))
        return out
    # raw entries (no path resolution: fast); entries are unique paths within a setting's root
    lists = {rel: read_list_file(setting.list_path(root, rel, lists_dir), None, check_exists=False)
             for rel in setting.list_files()}
    support = {r.path for t in setting.targets for r in lists[t.support]}
    test = {r.path for t in setting.targets for r in lists[t.test]}
    known, unknown = [], []
    for t in setting.targets:
        k = {r.label for r in lists[t.support]}
        known.append(len(k))
        unknown.append(len({r.label for r in lists[t.test]} - k))

    def rng(v):
        return v[0] if min(v) == max(v) else f"{min(v)}-{max(v)}"

    out.update(n_support=len(support), n_test=len(test), known=rng(known), unknown=rng(unknown))
    if check_images and root is not None:
        image_dir = setting.image_dir(root)
        out["missing_images"] = sum(
            1 for rel in support | test if not os.path.isfile(resolve_list_path(image_dir, rel))
        )
        out["n_images"] = len(support | test)
    return out


def run_benchmark(
    setting: Setting | str,
    data_root,
    make_detector: Callable[[], "object"],
    features_fn: Callable[[list[str]], "object"] | None = None,
    progress: bool = True,
    *,
    lists_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    check_images: bool = True,
) -> dict:
    """Evaluate a detector on every target of ``setting``.

    ``make_detector()`` returns a fresh detector; it is first called after every list and image
    has been checked (:func:`load_setting_lists`, which also explains ``lists_dir`` and
    ``max_per_class``). ``features_fn(paths)`` returns backbone features (default: the
    detector's own cached extractor); with it, ``check_images=False`` allows the images to be
    absent (e.g. features exported on another machine). Returns a JSON-ready dict
    ``{"setting", "targets": {name: metrics}, "avg": {"auroc", "fpr95"}, "seconds"}`` (plus
    ``"max_per_class"`` when set).
    """
    from ..detectors.base import fit_support

    if isinstance(setting, str):
        setting = get_setting(setting)
    t0 = time.perf_counter()
    lists = load_setting_lists(setting, data_root, lists_dir=lists_dir, max_per_class=max_per_class,
                               check_images=check_images)
    all_paths = sorted({r.path for s, q in lists.values() for r in (*s, *q)})
    det0 = make_detector()
    if features_fn is None:
        feats = det0.features(all_paths, desc=f"{setting.name} features")[0]
    else:
        feats = features_fn(all_paths)
    index = {p: i for i, p in enumerate(all_paths)}
    results = {}
    for t in setting.targets:
        support, test = lists[t.name]
        det = make_detector()
        s_idx = [index[r.path] for r in support]
        q_idx = [index[r.path] for r in test]
        # source domains (multi-source): used by detectors that normalise features per domain
        fit_support(det, feats[s_idx], np.array([r.label for r in support]),
                    setting.support_domains(support))
        q = feats[q_idx]
        labels = np.array([r.label for r in test])
        is_known = np.isin(labels, det.classes_)
        if hasattr(det, "score_and_nearest_features"):  # one similarity pass for both
            scores, pred = det.score_and_nearest_features(q)
        else:
            scores, pred = det.score_features(q), det.nearest_class_features(q)
        rep = novelty_report(scores, is_known)
        acc = closed_set_accuracy(pred, labels, is_known)
        rep["closed_set_accuracy"] = None if math.isnan(acc) else acc
        rep["n_support"] = len(support)
        results[t.name] = rep
    avg = {}
    for key in ("auroc", "fpr95"):
        vals = [r[key] for r in results.values() if r[key] is not None]
        avg[key] = float(np.mean(vals)) if vals else None
    out = {
        "setting": setting.name,
        "targets": results,
        "avg": avg,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if max_per_class is not None:
        out["max_per_class"] = max_per_class
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_table(result: dict, method: str = "", paper: dict | None = None) -> str:
    """Markdown table: one row per target and the average (paper columns where known)."""
    head = "| target | AUROC | FPR95 |"
    sep = "|---|---|---|"
    if paper:
        head += " paper AUROC | paper FPR95 |"
        sep += "---|---|"
    rows = [f"**{result['setting']}** {method}".rstrip(), "", head, sep]
    for name, r in [*result["targets"].items(), ("avg", result["avg"])]:
        row = f"| {name} | {_fmt(r['auroc'])} | {_fmt(r['fpr95'])} |"
        if paper:
            p = paper.get(name)
            row += f" {_fmt(p[0]) if p else ''} | {_fmt(p[1]) if p else ''} |"
        rows.append(row)
    return "\n".join(rows)

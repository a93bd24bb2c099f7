"""Reading and checking the list files of a benchmark setting (:mod:`.settings`).

Before any backbone runs, every image of every list is checked: missing images are counted and
reported with the folder they were looked for in (:func:`load_setting_lists`).
:func:`setting_summary` sizes a setting from its lists alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data import DataError, ImageRecord, read_list_file, resolve_list_path
from .settings import Setting, get_setting

__all__ = ["resolve_data_root", "missing_list_files", "load_setting_lists", "setting_summary"]


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
                f"expected layout: {setting.layout or 'see docs/benchmarks.md, section Data layout under the data root'}"
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

"""The benchmark settings of the paper, by name (a registry).

A setting is a set of targets; each target has a support list (the known classes and their
images) and a test list. Known classes are the labels present in the support list; test samples
with other labels are unknown. Lists use the official format and are resolved under a data root
(``--data-root``, or ``$RESEND_DATA``; :mod:`.lists` reads and checks them, :mod:`.runner`
evaluates a detector on them).

The official lists of every setting except PACS ship inside the package (``resend_novelty/lists``,
copied from the authors' repository); the PACS lists are read from ``DIR/pacs_lists``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..data import DataError

__all__ = ["Target", "Setting", "SETTINGS", "register_setting", "get_setting"]


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

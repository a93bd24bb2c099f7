"""Benchmark registry: every setting of the paper runs end to end on its official lists.

No dataset images exist here except PACS, so each test writes tiny placeholder images at the
first few paths of each class of the setting's real lists (in a tmp data root) and runs the
benchmark on that subset (``max_per_class``) with the cosine detector on a tiny CNN.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_ROOT, make_image
from resend_novelty import evaluation as bm
from resend_novelty.evaluation import (
    SETTINGS,
    format_table,
    get_setting,
    load_setting_lists,
    run_benchmark,
    setting_summary,
)
from resend_novelty.cli.main import main
from resend_novelty.data import DataError
from resend_novelty.detectors import CosineDetector

PAPER_SETTINGS = [
    "dtd", "domainnet-real", "domainnet-painting", "domainnet-sketch", "domainnet-cross",
    "pacs-single", "pacs-multi", "officehome-single", "officehome-multi", "multidatasets",
]
RUNNABLE = [n for n in PAPER_SETTINGS if n != "multidatasets"]
N = 2  # images per class


def _color(label: int):
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def populate(setting, root: Path, n: int = N, lists_dir=None, skip=()) -> int:
    """Write a small image at every path of the first ``n`` per class of each list; returns #images."""
    lists = load_setting_lists(setting, root, lists_dir=lists_dir, max_per_class=n,
                               check_images=False)
    written = set()
    for support, test in lists.values():
        for r in (*support, *test):
            if r.path not in written and r.path not in skip:
                make_image(Path(r.path), _color(r.label), size=(24, 20), noise_seed=len(written))
                written.add(r.path)
    return len(written)


def data_root_for(setting, tmp_path: Path) -> Path:
    """A tmp data root; PACS settings also need DIR/pacs_lists (copied from the shared data)."""
    root = tmp_path / "data"
    root.mkdir()
    if not setting.packaged:
        src = DATA_ROOT / setting.list_dir
        if not src.is_dir():
            pytest.skip(f"{src} not available")
        shutil.copytree(src, root / setting.list_dir)
    return root


def raw_label_counts(list_file: Path) -> collections.Counter:
    return collections.Counter(
        int(line.rsplit(maxsplit=1)[1]) for line in list_file.read_text().splitlines() if line.strip()
    )


def make_detector_factory(backbone):
    calls = []

    def make():
        calls.append(1)
        return CosineDetector(backbone=backbone, device="cpu", num_workers=0, progress=False)

    make.calls = calls
    return make


# ------------------------------------------------------------------------------ the registry
def test_every_paper_setting_is_registered():
    assert set(PAPER_SETTINGS) <= set(SETTINGS)
    assert [t.name for t in get_setting("domainnet-cross").targets] == [
        "Real->Painting", "Real->Sketch", "Painting->Real", "Painting->Sketch",
        "Sketch->Real", "Sketch->Painting",
    ]
    assert [t.name for t in get_setting("officehome-multi").targets] == [
        "Art", "Clipart", "Product", "RealWorld"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_setting("domainnet")


@pytest.mark.parametrize("name", [n for n in PAPER_SETTINGS if SETTINGS[n].packaged])
def test_packaged_lists_exist_and_match_documented_classes(name):
    s = get_setting(name)
    present = [rel for rel in s.list_files() if s.list_path(None, rel).is_file()]
    missing = [rel for rel in s.list_files() if rel not in present]
    if name == "multidatasets":
        assert missing == ["Sources.txt"]
    else:
        assert missing == []
    for t in s.targets:
        test_labels = raw_label_counts(s.list_path(None, t.test))
        assert max(test_labels) < s.total_classes
        if t.support in present:
            known = set(raw_label_counts(s.list_path(None, t.support)))
            assert known == set(range(s.known_classes))
            assert set(test_labels) - known, f"{t.name}: no unknown class in the test list"
            assert set(test_labels) & known, f"{t.name}: no known class in the test list"
        else:
            assert any(lbl >= s.known_classes for lbl in test_labels)


def test_packaged_lists_are_the_official_files():
    shared = DATA_ROOT / "resend_lists"
    if not shared.is_dir():
        pytest.skip(f"{shared} not available")
    for s in SETTINGS.values():
        if not s.packaged:
            continue
        for rel in s.list_files():
            ref = shared / s.list_dir / rel
            if ref.is_file():
                assert s.list_path(None, rel).read_bytes() == ref.read_bytes(), (s.name, rel)


def test_summary_sizes():
    info = setting_summary("dtd")
    assert (info["n_support"], info["n_test"], info["known"], info["unknown"]) == (1952, 3688, 23, 24)
    info = setting_summary("officehome-multi")
    assert (info["known"], info["unknown"], info["targets"]) == (54, 11, 4)
    info = setting_summary("multidatasets")
    assert not info["available"] and "Sources.txt" in info["reason"]
    assert setting_summary("pacs-multi")["reason"].startswith("needs --data-root")


# ------------------------------------------------------------------ end to end on placeholders
@pytest.mark.parametrize("name", RUNNABLE)
def test_setting_runs_end_to_end(name, tmp_path, tiny_backbone):
    s = get_setting(name)
    root = data_root_for(s, tmp_path)
    populate(s, root)
    make = make_detector_factory(tiny_backbone)
    res = run_benchmark(s, root, make, progress=False, max_per_class=N)

    assert list(res["targets"]) == [t.name for t in s.targets]
    assert res["max_per_class"] == N
    for t in s.targets:
        r = res["targets"][t.name]
        sup = raw_label_counts(s.list_path(root, t.support))
        tst = raw_label_counts(s.list_path(root, t.test))
        assert r["n_support"] == sum(min(N, c) for c in sup.values())
        assert r["n_known"] == sum(min(N, c) for lbl, c in tst.items() if lbl in sup)
        assert r["n_unknown"] == sum(min(N, c) for lbl, c in tst.items() if lbl not in sup)
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["fpr95"] <= 1.0
    assert res["avg"]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in res["targets"].values()]))
    table = format_table(res, "(cosine)", s.paper)
    assert all(f"| {t.name} |" in table for t in s.targets) and "| avg |" in table
    json.dumps(res)  # JSON-ready


def test_missing_images_reported_before_any_backbone(tmp_path, tiny_backbone):
    s = get_setting("officehome-single")
    root = data_root_for(s, tmp_path)
    lists = load_setting_lists(s, root, max_per_class=N, check_images=False)
    deleted = [lists["Art"][1][0].path, lists["Art"][1][5].path, lists["Art"][0][0].path]
    total = populate(s, root, skip=set(deleted))
    make = make_detector_factory(tiny_backbone)
    with pytest.raises(DataError) as exc:
        run_benchmark(s, root, make, progress=False, max_per_class=N)
    msg = str(exc.value)
    assert f"3 of {total + 3} images missing under {root}" in msg
    assert deleted[0] in msg and "Source.txt" in msg
    assert "OfficeHome/{Art,Clipart,Product,Real_World}" in msg  # the expected layout
    assert make.calls == []


def test_missing_dataset_names_nearest_folder(tmp_path):
    s = get_setting("domainnet-sketch")
    root = tmp_path / "data"
    (root / "DomainNet").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        load_setting_lists(s, root)
    msg = str(exc.value)
    assert f"6252 of 6252 images missing under {root / 'DomainNet'}" in msg
    assert f"nearest existing folder of the first: {root / 'DomainNet'}" in msg


def test_multidatasets_is_unavailable_with_reason(tmp_path, tiny_backbone):
    make = make_detector_factory(tiny_backbone)
    with pytest.raises(DataError, match=r"cannot run: list file\(s\) not found: .*Sources\.txt; "
                                         r"the support list .* could not be obtained"):
        run_benchmark("multidatasets", tmp_path, make, progress=False)
    assert make.calls == []


def test_multidatasets_runs_with_user_lists_dir(tmp_path, tiny_backbone):
    """With the official folder (Sources.txt included) passed as lists_dir, the setting runs."""
    s = get_setting("multidatasets")
    lists_dir = tmp_path / "MultiDatasets_DG"
    lists_dir.mkdir()
    for t in s.targets:
        shutil.copy(s.list_path(None, t.test), lists_dir / t.test)
    (lists_dir / "Sources.txt").write_text(
        "".join(f"Other/{c}/{i}.jpg {c}\n" for c in range(s.known_classes) for i in range(3))
    )
    root = tmp_path / "data"
    root.mkdir()
    populate(s, root, lists_dir=lists_dir)
    res = run_benchmark(s, root, make_detector_factory(tiny_backbone), progress=False,
                        lists_dir=lists_dir, max_per_class=N)
    assert list(res["targets"]) == ["Clipart", "Painting", "Real", "Sketch"]
    assert all(r["n_support"] == N * s.known_classes for r in res["targets"].values())
    assert res["avg"]["auroc"] is not None


def test_max_per_class_validated(tmp_path):
    with pytest.raises(ValueError, match="max_per_class"):
        load_setting_lists("dtd", tmp_path, max_per_class=0)


# ------------------------------------------------------------------------------------- CLI
def test_cli_list(capsys, tmp_path):
    assert main(["benchmark", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(PAPER_SETTINGS) <= set(lines)
    assert "| 1952 | 3688 | 23 | 24 |" in lines["dtd"]
    assert "unavailable" in lines["multidatasets"] and "Sources.txt" in lines["multidatasets"]

    assert main(["benchmark", "--list", "--data-root", str(tmp_path)]) == 0
    lines = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")}
    assert "| 5640 of 5640 | images missing |" in lines["dtd"]


def test_cli_reports_missing_images_without_building_a_backbone(capsys, tmp_path, monkeypatch):
    import resend_novelty.cli.benchmark as cmd

    def no_backbone(args):
        raise AssertionError("the backbone must not be built before the images are checked")

    monkeypatch.setattr(cmd, "detector_factory", no_backbone)
    rc = main(["benchmark", "officehome-multi", "--data-root", str(tmp_path), "--method", "cosine"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"11604 of 11604 images missing under {tmp_path}" in err
    assert "OfficeHome/Clipart/Telephone/00014.jpg" in err


def test_cli_runs_a_setting(capsys, tmp_path, monkeypatch, tiny_backbone):
    import resend_novelty.cli.benchmark as cmd

    monkeypatch.setattr(cmd, "detector_factory", lambda args: make_detector_factory(tiny_backbone))
    s = get_setting("dtd")
    root = data_root_for(s, tmp_path)
    populate(s, root)
    out_json = tmp_path / "res.json"
    rc = main(["benchmark", "dtd", "--data-root", str(root), "--method", "cosine",
               "--max-per-class", str(N), "--json", str(out_json), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| DTD |" in out and "| avg |" in out and "not the official protocol" in out
    res = json.loads(out_json.read_text())
    assert res["method"] == "cosine" and res["targets"]["DTD"]["n_support"] == N * 23


def test_pacs_lists_still_read_from_data_root():
    assert get_setting("pacs-multi").list_path("/d", "no_Sketch.txt") == Path(
        "/d/pacs_lists/PACS_DG/no_Sketch.txt")
    assert bm.get_setting("pacs-single").paper == {"avg": (0.685, 0.847)}
    assert bm.get_setting("pacs-multi").paper == {"avg": (0.765, 0.687)}

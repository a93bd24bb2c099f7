"""``resend benchmark``: a named setting of the paper, every target, with the average."""

from __future__ import annotations

import os

from ..evaluation import SETTINGS, format_table, get_setting, run_benchmark, setting_summary
from ..report import write_json
from .common import add_detector_options, detector_factory, check_output


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="run a benchmark setting of the paper (pacs-multi, officehome-single, dtd, ...)",
        description=(
            "Evaluate on every target of a named setting of the paper and print a markdown table "
            "of AUROC and FPR95 per target with the average. The official list files ship with "
            "the package (PACS: DIR/pacs_lists); images are looked for under --data-root and "
            "all of them are checked before the backbone runs. Settings: "
            + ", ".join(SETTINGS) + ". See 'resend benchmark --list' for their sizes and "
            "docs/benchmarks.md (section 'Data layout under the data root') for the layout each "
            "expects."
        ),
    )
    p.add_argument("setting", nargs="?", help="setting name (see --list)")
    p.add_argument(
        "--list", action="store_true",
        help="list the settings with their targets, #support/#test images, known/unknown "
        "classes, and (with a data root) how many images are missing; then exit",
    )
    p.add_argument("--data-root", default=None,
                   help="directory holding the datasets (and pacs_lists/) (default: $RESEND_DATA)")
    p.add_argument(
        "--lists-dir", default=None, metavar="DIR",
        help="read the setting's list files from DIR instead of the shipped ones (same file "
        "names, e.g. the official MultiDatasets_DG folder with its Sources.txt)",
    )
    p.add_argument(
        "--max-per-class", type=int, default=None, metavar="N",
        help="use only the first N images of each class of every list: a quick check of a data "
        "layout; the numbers are then NOT the official protocol's",
    )
    p.add_argument("--json", default=None, metavar="OUT",
                   help='write {"targets": {name: {"auroc", "fpr95", ...}}, "avg": {...}} to OUT')
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file (refused otherwise)")
    add_detector_options(p)
    return p


def _print_list(data_root, lists_dir) -> None:
    check = data_root is not None and os.path.isdir(data_root)
    head = "| setting | targets | #support | #test | known | unknown |"
    sep = "|---|---|---|---|---|---|"
    if check:
        head += " missing images |"
        sep += "---|"
    rows = [head + " status |", sep + "---|"]
    for s in SETTINGS.values():
        info = setting_summary(s, data_root if check else None, lists_dir, check_images=check)

        def v(key):
            return "?" if info.get(key) is None else str(info[key])

        row = (f"| {s.name} | {info['targets']} | {v('n_support')} | {v('n_test')} | "
               f"{v('known')} | {v('unknown')} |")
        if check:
            row += (f" {info['missing_images']} of {info['n_images']} |"
                    if "missing_images" in info else " ? |")
        if not info["available"]:
            needs_root = info["reason"].startswith("needs --data-root")
            status = info["reason"] if needs_root else f"unavailable: {info['reason']}"
        elif info.get("missing_images"):
            status = "images missing"
        else:
            status = "ready" if check else "lists ok"
        rows.append(row + f" {status} |")
    print("\n".join(rows))
    if not check:
        print("\n(pass --data-root DIR or set RESEND_DATA to size the PACS settings and count "
              "missing images)")


def run(args) -> int:
    for flag, path in (("--json", args.json), ):
        if path:  # checked before any work
            check_output(path, flag=flag, overwrite=args.overwrite)
    data_root = args.data_root or os.environ.get("RESEND_DATA") or None
    if args.list or not args.setting:
        _print_list(data_root, args.lists_dir)
        return 0
    setting = get_setting(args.setting)
    factory = None

    def make_detector():
        # built lazily: run_benchmark checks every list and image before the first call, so a
        # missing image is reported before any backbone is loaded
        nonlocal factory
        if factory is None:
            factory = detector_factory(args)
        return factory()

    result = run_benchmark(
        setting, data_root, make_detector, progress=not args.quiet,
        lists_dir=args.lists_dir, max_per_class=args.max_per_class,
    )
    result["method"] = args.method
    result["per_image"] = bool(getattr(args, "per_image", False))
    # the paper's numbers are ReSeND's: shown next to the resend method only
    paper = setting.paper if args.method == "resend" and not args.max_per_class else None
    mode = ", per image" if result["per_image"] else ""
    print(format_table(result, f"({args.method}{mode})", paper))
    if args.max_per_class:
        print(f"\n(first {args.max_per_class} images per class only: not the official protocol)")
    print(f"\n{result['seconds']:.1f} s")
    if args.json:
        write_json(args.json, result)
    return 0

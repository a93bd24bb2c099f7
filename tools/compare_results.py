"""Compare two result files of ``resend benchmark --json`` (or ``resend eval --json``) number by number.

    python tools/compare_results.py before.json after.json [--atol 1e-6]

Every numeric field of both files is compared (wall-clock fields ``seconds`` are ignored); the
script prints the largest difference and exits 1 when a field differs by more than ``--atol`` or
exists in one file only. Used to show that a refactor leaves benchmark numbers unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys

IGNORED = {"seconds"}


def flatten(value, prefix: str = "") -> dict:
    """``{"a/b[0]": leaf}`` of a JSON value."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k not in IGNORED:
                out.update(flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--atol", type=float, default=1e-6, help="largest allowed difference (default 1e-6)")
    args = p.parse_args(argv)
    a, b = (flatten(json.load(open(f))) for f in (args.before, args.after))
    bad = sorted(set(a) ^ set(b))
    worst, numeric = 0.0, 0
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            numeric += 1
            worst = max(worst, abs(x - y))
            if abs(x - y) > args.atol:
                bad.append(k)
        elif x != y:
            bad.append(k)
    print(f"{numeric} numeric fields compared; largest difference {worst:.3g}")
    for k in bad:
        print(f"differs: {k}: {a.get(k)!r} vs {b.get(k)!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

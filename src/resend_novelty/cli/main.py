"""Command-line interface ``resend``: a thin layer over the typed library API.

Each sub-command lives in ``resend_novelty.cli.<module>`` and exposes
``add_parser(subparsers, name)`` (returns its parser) and ``run(args) -> int``; it converts the
parsed options into typed arguments of library functions. argparse is used here and nowhere
else in the package.

Imports: ``import resend_novelty`` already loads the library core (torch included), so lazy
imports would not make ``resend --help`` faster; every command imports the library names it
uses at module level, from the packages (``from ..detectors import build_detector``). Only
heavy optional plotting (matplotlib) is imported inside the library function that draws.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys

from .. import __version__
from ..data import DataError, printable

# sub-command name -> module under resend_novelty.cli
COMMANDS = {
    "eval": "evaluate",
    "benchmark": "benchmark",
    "features": "features",
    "pretrain": "pretrain",
    "score": "score",
    "fit": "fit",
    "osdg": "osdg",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resend",
        description=(
            "ReSeND semantic novelty detection (Cappio Borlino et al., ECCV 2022): decide which "
            "test images belong to classes absent from a labelled support set, across visual "
            "domains, without fine-tuning."
        ),
    )
    parser.add_argument("--version", action="version", version=f"resend-novelty {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f".{module}", __package__)
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe (resend ... | head) shows here, not at exit
        return rc
    except BrokenPipeError:  # the reader stopped reading: not an error of the command
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (DataError, ValueError, RuntimeError) as exc:
        print(f"resend {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:  # an optional extra that is not installed (e.g. [lite2])
        print(f"resend {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # a corrupt feature cache
        print(f"resend {args.command}: error: feature cache: {_one_line(exc)} (pass --cache-dir "
              "elsewhere or --no-cache)", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable / read-only / missing paths, a file for a folder, ...
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"resend {args.command}: error: {printable(where)}{_one_line(exc.strerror or exc)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"resend {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc) -> str:
    """An error message as one printable line (no terminal escape codes from file names)."""
    text = str(exc) or type(exc).__name__
    return " | ".join(printable(line) for line in text.splitlines() if line.strip()) or text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

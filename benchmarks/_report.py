"""Shared by the benchmark scripts: write a named section of BENCHMARKS.md (between
<!-- BEGIN name --> / <!-- END name --> markers, :func:`resend_novelty.report.update_section`)
and describe the machine a number was measured on.

Every benchmark script owns its sections, so scripts can be rerun in any order without
clobbering each other's numbers; ``$RESEND_BENCHMARKS_MD`` names another file to write them
to. Scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``:
``from _report import ...`` needs nothing more.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from resend_novelty.report import update_section as write_section

# $RESEND_BENCHMARKS_MD writes the sections into another file (benchmarks/all.py --benchmarks-md)
BENCHMARKS_MD = Path(os.environ.get("RESEND_BENCHMARKS_MD")
                     or Path(__file__).resolve().parent.parent / "BENCHMARKS.md")


def machine() -> str:
    """The accelerator (or CPU core count), CPU model and torch version of this machine."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU only, {os.cpu_count()} cores"
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", cpu)
        cpu_name = model.group(1).strip() if model else platform.processor()
    except OSError:
        cpu_name = platform.processor()
    return f"{dev} ({cpu_name}); torch {torch.__version__}"


def load_note() -> str:
    """The 1-minute load average of this machine now, for a section's machine line (how busy
    the cores were when the measurement began)."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown"
    return f"load average (1 min) {os.getloadavg()[0]:.1f} at the start"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) section ``name`` of BENCHMARKS.md (or ``path``) with ``markdown``."""
    write_section(name, markdown, path)

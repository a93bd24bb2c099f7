"""Write a named section of BENCHMARKS.md (between <!-- BEGIN name --> / <!-- END name --> markers).

Every benchmark script owns its sections, so scripts can be rerun in any order without
clobbering each other's numbers.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    import torch

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


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Named sections of a markdown file (BENCHMARKS.md), rewritten in place.

A section is the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; every writer
owns its sections, so writers can run in any order without clobbering each other's text. A
section may itself hold parts, each after a ``<!-- {label} {key} -->`` line, so that parts
measured by different runs are kept side by side (:func:`write_section_parts`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

__all__ = ["update_section", "section_parts", "write_section_parts"]


def update_section(name: str, markdown: str, path: str | os.PathLike) -> None:
    """Replace (or append) section ``name`` of ``path`` with ``markdown``; atomic."""
    path = Path(path)
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


def section_parts(section: str, path: str | os.PathLike, label: str) -> dict[str, str]:
    """``{key: text}`` of the parts of ``section`` in ``path`` ({} without file or section)."""
    path = Path(path)
    if not path.exists():
        return {}
    text = path.read_text()
    m = re.search(re.escape(f"<!-- BEGIN {section} -->") + r"(.*?)" + re.escape(f"<!-- END {section} -->"),
                  text, flags=re.S)
    if not m:
        return {}
    blocks = re.split(r"^<!-- " + re.escape(label) + r" ([^\s>]+) -->\n", m.group(1), flags=re.M)
    return {blocks[i]: blocks[i + 1].strip() for i in range(1, len(blocks) - 1, 2)}


def write_section_parts(section: str, new: dict[str, str], path: str | os.PathLike, label: str,
                        order: Sequence[str], head: str = "") -> str:
    """Write the parts in ``new`` into ``section``, keeping the other parts already there.

    Parts are written in ``order`` (keys not in it are dropped) after ``head``; returns the
    section's markdown.
    """
    parts = section_parts(section, path, label)
    parts.update(new)
    body = [head] if head else []
    for key in order:
        if key in parts:
            body += [f"<!-- {label} {key} -->", parts[key]]
    md = "\n\n".join(body)
    update_section(section, md, path)
    return md

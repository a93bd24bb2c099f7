"""benchmarks/all.py run as a script on a synthetic BENCHMARKS-like file with a stand-in step
script (``--scripts``): the header, the order of the sections, the dropped sections, and the
resumption (a finished step is skipped; a changed script, ``--force`` or a failure reruns it).
No real benchmark runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resend_novelty.integrity import sha256_file
from resend_novelty.models import default_checkpoint_path

ALL = Path(__file__).resolve().parents[2] / "benchmarks" / "all.py"

OLD = """# Benchmarks

**Old preface.** Which sections are stale, as a work diary.

<!-- BEGIN speed -->
## Speed

<!-- speed part a -->

### (a) scoring

numbers a
<!-- END speed -->

<!-- BEGIN backbones -->
## Backbones (a past selection step)
<!-- END backbones -->

<!-- BEGIN pacs -->
## PACS (old numbers)
<!-- END pacs -->

<!-- BEGIN paper-table5 -->
## Paper Table 5
<!-- END paper-table5 -->

<!-- BEGIN paper-table2 -->
## Paper Table 2

Command: `python benchmarks/paper_tables.py --data-root ../shared/data --only table2`
<!-- END paper-table2 -->
"""

FAKE = """\
import os
import re
import sys
from pathlib import Path

counter = Path(os.environ["FAKE_COUNTER"])
counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
if os.environ.get("FAKE_FAIL"):
    sys.exit(3)
md = Path(os.environ["RESEND_BENCHMARKS_MD"])
block = ("<!-- BEGIN pacs -->\\n## PACS (fresh)\\n\\nargs: " + " ".join(sys.argv[1:])
         + "\\n\\nCommand: `python benchmarks/pacs.py`  \\nMachine: test\\n<!-- END pacs -->")
md.write_text(re.sub(r"<!-- BEGIN pacs -->.*?<!-- END pacs -->", lambda m: block,
                     md.read_text(), flags=re.S))
"""


@pytest.fixture()
def bench(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "pacs.py").write_text(FAKE)
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(OLD)
    counter = tmp_path / "count"
    results = tmp_path / "all.json"

    def run(*extra, fail=False):
        env = {**os.environ, "FAKE_COUNTER": str(counter)}
        env.pop("FAKE_FAIL", None)
        if fail:
            env["FAKE_FAIL"] = "1"
        cmd = [sys.executable, str(ALL), "--data-root", "DATA", "--scripts", str(scripts),
               "--benchmarks-md", str(md), "--results", str(results), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    def count():
        return int(counter.read_text()) if counter.exists() else 0

    return dict(run=run, count=count, md=md, results=results, script=scripts / "pacs.py")


def test_header_order_and_dropped_sections(bench):
    proc = bench["run"]("--only", "pacs")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert bench["count"]() == 1
    text = bench["md"].read_text()
    sha = sha256_file(default_checkpoint_path())
    head = text.split("<!-- BEGIN")[0]
    assert head.startswith("# Benchmarks\n")
    assert f"from the shipped checkpoint `resend_lite0_lite1.safetensors`, SHA-256 `{sha}`" in head
    assert "python benchmarks/all.py --data-root ../shared/data" in head
    assert "\nMachine: " in head and "Not reproduced: paper Table 5" in head
    assert "Old preface" not in text and "session" not in head.lower()
    # only the stand-in step ran: the other kept sections are named as not yet regenerated
    stale = head.split("not yet regenerated with it (run the command below): ")[1]
    assert stale.split(".\n")[0].split(", ") == ["paper-table2", "speed"]
    missing = head.split("Not in this file yet (the command below adds them): ")[1]
    assert missing.split(".\n")[0].split(", ") == ["paper-table3", "osdg-pacs", "generalisation",
                                                    "shift-gaps",
                                                    "selection", "selection-per-image",
                                                    "thresholds", "threshold-promise",
                                                    "deploy-routes"]
    # the paper's order, then the project's; sections not in the list are gone
    pos = [text.index(f"<!-- BEGIN {n} -->") for n in ("pacs", "paper-table2", "speed")]
    assert pos == sorted(pos)
    assert "BEGIN backbones" not in text and "BEGIN paper-table5" not in text
    assert "Backbones (a past selection step)" not in text
    assert "## PACS (fresh)" in text and "old numbers" not in text
    assert "args: --data-root DATA" in text and "<!-- speed part a -->" in text
    rec = json.loads(bench["results"].read_text())["steps"]["pacs"]
    assert rec["checkpoint_sha256"] == sha
    assert rec["script_sha256"] == sha256_file(bench["script"])
    assert rec["argv"] == ["--data-root", "DATA"] and rec["seconds"] >= 0


def test_resumption(bench):
    assert bench["run"]("--only", "pacs").returncode == 0
    proc = bench["run"]("--only", "pacs")  # finished with these hashes: skipped
    assert proc.returncode == 0 and bench["count"]() == 1
    assert "skipped 1" in proc.stdout
    listing = bench["run"]("--only", "pacs", "--list")
    assert listing.returncode == 0 and " done " in listing.stdout
    bench["script"].write_text(FAKE + "# changed\n")  # another script: rerun
    assert bench["run"]("--only", "pacs").returncode == 0 and bench["count"]() == 2
    assert bench["run"]("--only", "pacs", "--force").returncode == 0 and bench["count"]() == 3
    md = bench["md"]  # a section edited by hand is not the one the step wrote: rerun
    md.write_text(md.read_text().replace("## PACS (fresh)", "## PACS (edited)"))
    assert bench["run"]("--only", "pacs").returncode == 0 and bench["count"]() == 4
    assert "## PACS (fresh)" in md.read_text()
    # a failed step is not recorded and runs again next time
    bench["script"].write_text(FAKE + "# changed again\n")
    failed = bench["run"]("--only", "pacs", fail=True)
    assert failed.returncode == 1 and "FAILED" in failed.stdout + failed.stderr
    rec = json.loads(bench["results"].read_text())["steps"]["pacs"]
    assert rec["script_sha256"] != sha256_file(bench["script"])
    assert bench["run"]("--only", "pacs").returncode == 0 and bench["count"]() == 6


def test_unknown_step(bench):
    proc = bench["run"]("--only", "pacs,nope", "--list")
    assert proc.returncode != 0 and "nope" in proc.stderr

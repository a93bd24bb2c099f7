"""Regenerate BENCHMARKS.md in one resumable command.

    python benchmarks/all.py --data-root ../shared/data
    python benchmarks/all.py --data-root ../shared/data --list          # the steps, their state
    python benchmarks/all.py --data-root ../shared/data --only pacs,speed

Runs every benchmark script that writes a section of BENCHMARKS.md, one step at a time, each as
``python benchmarks/<script>.py <args>`` (this interpreter, the repository root as working
folder, the environment passed through, so ``RESEND_CACHE`` chooses the feature cache). Each
step's output goes to ``runs/benchmarks/logs/<step>.log``.

Resumable: a finished step is recorded in ``--results`` (JSON) with the SHA-256 of the shipped
checkpoint file, of the step's script (and of the helper modules it imports), its arguments,
its seconds and the machine. A step whose record matches the current files and whose section
(or speed part) is in BENCHMARKS.md is skipped; an interrupted run continues with the first
step not finished. Scripts that keep finished cells of their own (the generalisation suite,
the selection) get a results file per checkpoint (``runs/benchmarks/<step>/<sha>.json``), so an
interrupted step resumes inside too. ``--force`` reruns the selected steps from scratch (their
per-checkpoint files are removed first).

Then BENCHMARKS.md is rewritten: a header (what the file is, the checkpoint and its SHA-256, the
command, the machine), then the sections in the paper's order (Tables 1-4) and this project's
own after them; sections not in :data:`ORDER` are removed. The file is written atomically.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
DEFAULT_RESULTS = "runs/benchmarks/all.json"
COMMAND = "python benchmarks/all.py --data-root ../shared/data"
FT = "efficientnet_lite0_ft+efficientnet_lite1_ft"


@dataclass(frozen=True)
class Step:
    """One script run. ``args`` follow ``--data-root DATA``; ``{state}`` = the step's results
    file for the current checkpoint, ``{cache}`` = ``$RESEND_CACHE`` (an option whose value
    is ``{cache}`` is left out when it is not set). ``marker``: text that must be in the
    section for the step to count as present (default: the section itself)."""

    name: str
    section: str
    script: str
    args: tuple[str, ...] = ()
    minutes: float = 1.0  # estimate on 2 idle CPU cores, features cached
    helpers: tuple[str, ...] = ()
    marker: str | None = None


# the paper's order (Table 1 .. Table 4), then this project's own sections
ORDER = ("pacs", "paper-table2", "paper-table3", "osdg-pacs", "generalisation", "shift-gaps",
         "selection", "selection-per-image", "thresholds", "threshold-promise", "deploy-routes",
         "speed")

STEPS = (
    Step("pacs", "pacs", "pacs.py", minutes=3),
    Step("table2", "paper-table2", "paper_tables.py", ("--only", "table2"), minutes=3),
    Step("table3", "paper-table3", "paper_tables.py", ("--only", "table3"), minutes=25),
    Step("osdg", "osdg-pacs", "osdg_pacs.py",
         ("--methods", "resend", "cosine", "--detector-backbone", FT), minutes=5),
    Step("generalisation", "generalisation", "generalisation.py", ("--results", "{state}"),
         minutes=10),
    Step("shift-gaps", "shift-gaps", "shift_gaps.py", minutes=1, helpers=("generalisation.py",)),
    Step("selection", "selection", "select_default.py", ("--results", "{state}"), minutes=10,
         helpers=("generalisation.py",)),
    Step("selection-per-image", "selection-per-image", "select_default.py",
         ("--which", "per-image", "--results", "{state}"), minutes=17,
         helpers=("generalisation.py",)),
    Step("thresholds", "thresholds", "thresholds.py", minutes=4),
    Step("threshold-promise", "threshold-promise", "threshold_promise.py", minutes=20),
    Step("deploy-routes", "deploy-routes", "deploy_routes.py", minutes=3),
    Step("speed-a", "speed", "speed.py", ("--parts", "a", "--quiet"), minutes=1,
         marker="<!-- speed part a -->"),
    Step("speed-b", "speed", "speed.py", ("--parts", "b", "--quiet"), minutes=2,
         marker="<!-- speed part b -->"),
    Step("speed-c", "speed", "speed.py", ("--parts", "c", "--quiet"), minutes=2,
         marker="<!-- speed part c -->"),
    Step("speed-d", "speed", "speed.py", ("--parts", "d", "--quiet"), minutes=3,
         marker="<!-- speed part d -->"),
    Step("speed-e", "speed", "speed.py", ("--parts", "e", "--quiet", "--e-torch-cache", "{cache}"),
         minutes=6, helpers=("_speed_engine.py",), marker="<!-- speed part e -->"),
    Step("speed-f", "speed", "speed.py", ("--parts", "f", "--quiet"), minutes=4,
         helpers=("_speed_scale.py",), marker="<!-- speed part f -->"),
)

NOT_REPRODUCED = (
    "Not reproduced: paper Table 5 (relational module vs hand-designed aggregation) and Fig. 5 "
    "(MSE vs BCE loss). They pretrain relational modules anew (five runs in all) on Tiny-ImageNet "
    "reference features that are not in the feature cache (10,000 photos and 4,800 stylised "
    "views for each of the recipe's two backbones), which does not fit in this regeneration on "
    "2 CPU cores; `python benchmarks/paper_tables.py --data-root ../shared/data --only table5 "
    "fig5` runs them.")

_SECTION = re.compile(r"<!-- BEGIN (?P<name>[^\s>]+) -->\n?(?P<body>.*?)\n?<!-- END (?P=name) -->",
                      re.S)


# ------------------------------------------------------------------------------ BENCHMARKS.md
def sections(text: str) -> dict[str, str]:
    """``{name: whole block, markers included}`` of the BEGIN/END sections of ``text``."""
    return {m["name"]: m.group(0) for m in _SECTION.finditer(text)}


def assemble(text: str, header: str, order=ORDER) -> str:
    """``header``, then the sections of ``text`` in ``order`` (missing ones are left out;
    sections not in ``order`` and everything outside the sections are dropped)."""
    have = sections(text)
    blocks = [have[name] for name in order if name in have]
    return "\n\n".join([header.strip(), *blocks]) + "\n"


def step_output(step: Step, text: str) -> str | None:
    """What ``step`` wrote into BENCHMARKS.md ``text``: its section, or with a ``marker`` the
    part from the marker to the next part marker (None if absent)."""
    block = sections(text).get(step.section)
    if block is None or step.marker is None:
        return block
    if step.marker not in block:
        return None
    part = block.split(step.marker, 1)[1]
    return step.marker + "\n" + re.split(r"<!-- \S+ part \S+ -->|<!-- END ", part)[0].strip()


def text_sha256(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def header(checkpoint: str, sha256: str, machines: list[str], stale: list[str],
           missing: list[str] = (), command: str = COMMAND,
           not_reproduced: str = NOT_REPRODUCED) -> str:
    """The head of BENCHMARKS.md; ``stale``: sections in the file not yet rerun with this
    checkpoint; ``missing``: sections of :data:`ORDER` not in the file yet."""
    what = ("Measured results of `resend-novelty`: the paper's PACS benchmarks (ReSeND, ECCV "
            "2022, [arXiv:2207.08699](https://arxiv.org/abs/2207.08699): Tables 1-4, in that "
            "order), then this project's own checks (the generalisation suite, the selections of "
            "the default scoring, transductive and per image, thresholds in the target domain, "
            "speed). Each section is "
            "written by one script under `benchmarks/` and ends with its command and the machine "
            "it ran on. Settings and data layout: [docs/benchmarks.md](docs/benchmarks.md); how "
            "each shipped choice was selected, with dates: "
            "[docs/model-card.md](docs/model-card.md).")
    ckpt = f"the shipped checkpoint `{checkpoint}`, SHA-256 `{sha256}`"
    if stale:
        numbers = (f"Every number below is from {ckpt}, except in the sections not yet "
                   f"regenerated with it (run the command below): {', '.join(stale)}.")
    else:
        numbers = (f"Every number below is from {ckpt} (the baselines and the speed parts that "
                   "time a backbone or the trainer alone do not read it).")
    lines = ["# Benchmarks", "", what, "", numbers, ""]
    if missing:
        lines += [f"Not in this file yet (the command below adds them): {', '.join(missing)}.", ""]
    if not_reproduced:
        lines += [not_reproduced, ""]
    lines += ["Regenerate (resumable: finished steps are recorded in "
              f"`{DEFAULT_RESULTS}` and skipped; `RESEND_CACHE` chooses the feature cache):", "",
              "```bash", command, "```", ""]
    if machines:
        lines += ["Machine: " + "; ".join(dict.fromkeys(machines)) + "."]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ steps
def file_sha256(path: Path) -> str | None:
    """SHA-256 of the file (None if it does not exist: never equal to a recorded hash)."""
    from resend_novelty.integrity import sha256_file

    return sha256_file(path) if Path(path).is_file() else None


def step_hashes(step: Step, script_dir: Path) -> dict:
    """``{"script_sha256": the script's SHA-256, "helpers_sha256": {file name: SHA-256} of the
    helper modules it imports}``."""
    return {"script_sha256": file_sha256(script_dir / step.script),
            "helpers_sha256": {name: file_sha256(script_dir / name) for name in step.helpers}}


def state_file(step: Step, checkpoint_sha: str) -> str:
    """The step's own results file for this checkpoint (relative to the repository root)."""
    return f"runs/benchmarks/{step.name}/{checkpoint_sha[:16]}.json"


def step_argv(step: Step, data_root: str, checkpoint_sha: str,
              cache: str | None) -> list[str]:
    out = ["--data-root", data_root]
    args = list(step.args)
    i = 0
    while i < len(args):
        a = args[i]
        if i + 1 < len(args) and args[i + 1] == "{cache}":
            if cache:
                out += [a, cache]
            i += 2
            continue
        out.append(a.replace("{state}", state_file(step, checkpoint_sha)))
        i += 1
    return out


def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("steps"), dict):
            return data
    return {"steps": {}}


def is_finished(step: Step, record: dict | None, checkpoint_sha: str, hashes: dict,
                argv: list[str] | None, md_text: str) -> bool:
    """Whether ``record`` is of a run with this checkpoint, these scripts and (unless None)
    these arguments, and the step's text in ``md_text`` is still the one that run wrote."""
    out = text_sha256(step_output(step, md_text))
    return (record is not None and record.get("checkpoint_sha256") == checkpoint_sha
            and hashes.get("script_sha256") is not None
            and all(record.get(k) == v for k, v in hashes.items())
            and (argv is None or record.get("argv") == argv)
            and out is not None and record.get("output_sha256") == out)


def select(steps, only: str | None) -> list[Step]:
    """The steps named in ``only`` (step or section names, comma-separated), in run order."""
    if not only:
        return list(steps)
    names = {n.strip() for n in only.split(",") if n.strip()}
    known = {s.name for s in steps} | {s.section for s in steps}
    unknown = sorted(names - known)
    if unknown:
        raise SystemExit(f"--only: unknown step or section {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    return [s for s in steps if s.name in names or s.section in names]


def run_steps(steps, *, data_root: str, results_path: Path, checkpoint_sha: str, md_path: Path,
              script_dir: Path = BENCH_DIR, cwd: Path = REPO, force: bool = False,
              env: dict | None = None, machine: str = "", python: str = sys.executable,
              progress: bool = True) -> dict:
    """Run the steps not finished yet; returns ``{"ran", "skipped", "failed"}`` (step names).

    Each finished step is recorded in ``results_path`` at once (atomically), so an interrupted
    run keeps it."""
    from tqdm.auto import tqdm

    from resend_novelty.report import write_json

    env = dict(os.environ if env is None else env)
    cache = env.get("RESEND_CACHE") or None
    results = load_results(results_path)
    logs = results_path.parent / "logs"
    out = {"ran": [], "skipped": [], "failed": []}
    bar = tqdm(steps, desc="benchmarks", unit="step", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step.name)
        argv = step_argv(step, data_root, checkpoint_sha, cache)
        hashes = step_hashes(step, script_dir)
        record = results["steps"].get(step.name)
        text = md_path.read_text() if md_path.is_file() else ""
        if not force and is_finished(step, record, checkpoint_sha, hashes, argv, text):
            out["skipped"].append(step.name)
            continue
        if force and "{state}" in step.args:
            (cwd / state_file(step, checkpoint_sha)).unlink(missing_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{step.name}.log"
        script = script_dir / step.script
        try:
            script = script.relative_to(cwd)  # benchmarks/<script>.py, as the sections say
        except ValueError:
            pass
        cmd = [python, str(script), *argv]
        tqdm.write(f"[{step.name}] {' '.join(['python', *cmd[1:]])}  (log: {log})")
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            tqdm.write(f"[{step.name}] FAILED (exit {proc.returncode}, {seconds:.0f} s):\n  "
                       + "\n  ".join(tail))
            out["failed"].append(step.name)
            continue
        written = step_output(step, md_path.read_text() if md_path.is_file() else "")
        if written is None:
            tqdm.write(f"[{step.name}] FAILED: it wrote no {step.marker or step.section} into "
                       f"{md_path.name} (log: {log})")
            out["failed"].append(step.name)
            continue
        results = load_results(results_path)  # merge with what another run may have written
        results["steps"][step.name] = {
            "section": step.section, "checkpoint_sha256": checkpoint_sha, **hashes,
            "argv": argv, "output_sha256": text_sha256(written), "seconds": round(seconds, 1),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine}
        write_json(results_path, results)
        out["ran"].append(step.name)
        tqdm.write(f"[{step.name}] done in {seconds:.0f} s")
    return out


def stale_sections(steps, results: dict, checkpoint_sha: str, md_text: str,
                   script_dir: Path = BENCH_DIR, data_root: str | None = None,
                   cache: str | None = None, order=ORDER) -> list[str]:
    """Sections of ``order`` in ``md_text`` with a step not finished with this checkpoint and
    these scripts (or whose part is missing)."""
    bad = []
    present = sections(md_text)
    for name in (n for n in order if n in present):
        for step in (s for s in steps if s.section == name):
            argv = step_argv(step, data_root, checkpoint_sha, cache) if data_root else None
            if not is_finished(step, results["steps"].get(step.name), checkpoint_sha,
                               step_hashes(step, script_dir), argv, md_text):
                bad.append(name)
                break
    return bad


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds pacs/, pacs_lists/, "
                   "tiny_imagenet_200/, flowers12/ (passed to every script as given; the scripts "
                   "run in the repository root)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help="run only these steps or sections (see --list); the others keep their "
                   "sections")
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    p.add_argument("--force", action="store_true", help="rerun the selected steps even if "
                   "finished with this checkpoint")
    p.add_argument("--results", default=DEFAULT_RESULTS,
                   help="finished steps (JSON; default %(default)s in the repository)")
    p.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), metavar="PATH",
                   help="the file to regenerate (default: BENCHMARKS.md of the repository); the "
                   "scripts get it as $RESEND_BENCHMARKS_MD")
    p.add_argument("--scripts", default=str(BENCH_DIR), metavar="DIR",
                   help="folder of the step scripts (default: benchmarks/; e.g. a test's stand-ins)")
    args = p.parse_args(argv)

    from _report import machine

    from resend_novelty.models import default_checkpoint_path

    ckpt = default_checkpoint_path()
    ckpt_sha = file_sha256(ckpt)
    results_path, md_path, script_dir = (Path(a).absolute() for a in (
        REPO / DEFAULT_RESULTS if args.results == DEFAULT_RESULTS else args.results,
        args.benchmarks_md, args.scripts))
    cache = os.environ.get("RESEND_CACHE") or None
    steps = select(STEPS, args.only)
    if args.list:
        results = load_results(results_path)
        text = md_path.read_text() if md_path.is_file() else ""
        print(f"checkpoint {ckpt.name} sha256 {ckpt_sha}")
        total = 0.0
        for s in steps:
            a = step_argv(s, args.data_root, ckpt_sha, cache)
            done = is_finished(s, results["steps"].get(s.name), ckpt_sha,
                               step_hashes(s, script_dir), a, text)
            total += 0 if done else s.minutes
            print(f"{s.name:15s} {s.section:15s} ~{s.minutes:4.0f} min  "
                  f"{'done' if done else 'to run':7s} python benchmarks/{s.script} {' '.join(a)}")
        print(f"to run: ~{total:.0f} min (estimates on 2 idle CPU cores, features cached)")
        print(NOT_REPRODUCED)
        return 0

    print(f"checkpoint {ckpt.name} sha256 {ckpt_sha}", flush=True)
    print(NOT_REPRODUCED, flush=True)
    env = {**os.environ, "RESEND_BENCHMARKS_MD": str(md_path)}
    res = run_steps(steps, data_root=args.data_root, results_path=results_path,
                    checkpoint_sha=ckpt_sha, md_path=md_path, script_dir=script_dir,
                    force=args.force, env=env, machine=machine())
    results = load_results(results_path)
    text = md_path.read_text() if md_path.is_file() else ""
    stale = stale_sections(STEPS, results, ckpt_sha, text, script_dir=script_dir,
                           data_root=args.data_root, cache=cache)
    missing = [n for n in ORDER if n not in sections(text)]
    machines = [r.get("machine", "") for r in results["steps"].values()
                if r.get("checkpoint_sha256") == ckpt_sha and r.get("machine")]
    write_atomic(md_path, assemble(text, header(ckpt.name, ckpt_sha, machines, stale, missing)))
    print(f"ran {len(res['ran'])}, skipped {len(res['skipped'])} (finished before), failed "
          f"{len(res['failed'])}" + (f": {', '.join(res['failed'])}" if res["failed"] else "")
          + f"; {md_path.name} rewritten"
          + (f"; not yet regenerated: {', '.join(stale)}" if stale else "")
          + (f"; not in the file yet: {', '.join(missing)}" if missing else ""))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

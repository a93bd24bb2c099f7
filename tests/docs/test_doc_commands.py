"""Every command in README.md and docs/*.md runs as written (issue #23).

The pages follow these conventions (the test relies on them):

- shell commands are in ```bash blocks, one command per line (``\\`` continuations and ``#``
  comments allowed); Python examples meant to run are in ```python blocks; output samples and
  fragments go in ```text blocks;
- short examples use, relative to the current directory, ``support/`` (sub-folders ``cat``,
  ``dog``, ``bird`` with ``1.jpg`` .. ``4.jpg`` each), ``new_images/`` (``1.jpg`` .. ``6.jpg``),
  outputs under ``out/`` and a fitted detector ``out/detector.safetensors``;
- anything on the benchmark data uses ``--data-root ../shared/data`` literally.

Each shell command is one of

- SETUP (``python3 -m venv``, ``pip ...``, ``. .venv/bin/activate``, ``git clone``): checked by
  ``.ci/run`` on a fresh clone; here only: the README's first two commands are the two set-up
  chains and its test chain is exactly the command of ``.ci/run``;
- LONG (the benchmark data ``../shared/data``, ``torchrun``, a GPU, ``benchmarks/``,
  ``tools/finetune_backbones.py``, ``tools/make_shipped_checkpoint.py`` without ``--rescore``):
  parsed, not run: ``resend ...`` / ``python -m resend_novelty.cli ...`` by the real argparse
  parser of the CLI, ``python benchmarks/X.py`` / ``python tools/X.py``: the script exists and
  its ``--help`` exits 0; every ``--flag`` written must be in the help text;
- SHORT (everything else): run in a temporary directory holding generated images, in the
  page's order (a later command may use an earlier one's output), exit code 0. A command with
  shell syntax runs with bash; a plain ``resend ARGS`` runs as ``resend_novelty.cli.main(ARGS)``
  in a forked child of a process that imported the library once (what the console script runs,
  without its ~8 s of imports). ``out/detector.safetensors`` is provided if the page reads it
  before making it; absolute paths are refused (the examples work in the current directory).

Python blocks run in the same directory (as ``python FILE`` would: the file as ``__main__``),
in order with the shell commands; those on the benchmark data or a GPU only have their imports
executed. All runs share one feature cache, so the ONNX export of the shipped backbones happens
once. No network is used.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PAGE_IDS = [p.name if [q.name for q in PAGES].count(p.name) == 1 else p.relative_to(REPO).as_posix()
            for p in PAGES]  # docs/README.md next to README.md: ids by path
MAX_README_LINES = 250
COMMAND_TIMEOUT_S = 240  # the first command also exports the backbones' ONNX graphs

SETUP_PREFIXES = ("python3 -m venv", "python -m venv", "pip ", "pip3 ", ". .venv/bin/activate",
                  "source .venv/bin/activate", "git clone")
LONG_MARKERS = ("../shared/data", "torchrun", "tools/finetune_backbones.py", "benchmarks/")
GPU_RE = re.compile(r"\bcuda\b|CUDA_VISIBLE_DEVICES|--gpus?\b|nproc[_-]per[_-]node", re.I)
PY_LONG_RE = re.compile(r"\.\./shared/data|[\"']cuda")
SHELL_STATE_RE = re.compile(r"^(export\s+\w+=|\w+=\S*$|cd\s)")  # kept for later commands
OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}
# fence languages that would hide a command from this test
WRONG_LANGS = {"sh", "shell", "console", "zsh", "shell-session", "shellsession", "terminal",
               "py", "python3", "pycon", "ipython", "py3"}
CLASSES = ("cat", "dog", "bird")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------

@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    body: list[str]


@dataclass
class Item:
    """One thing to check: a shell command or a Python block."""

    kind: str  # "setup" | "long" | "short" | "python" | "python-long"
    text: str
    line: int

    def where(self, page: Path) -> str:
        return f"{rel(page)}:{self.line}"


def rel(page: Path) -> str:
    """README.md, docs/scoring.md, ..."""
    try:
        return page.resolve().relative_to(REPO.resolve()).as_posix()
    except ValueError:
        return str(page)


def slug(page: Path) -> str:
    return re.sub(r"[^\w.-]", "_", rel(page))


FENCE_RE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


def fenced_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3).lower()
        start, body, i = i + 1, [], i + 1
        while i < len(lines):
            close = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[i])
            if close and close.group(1)[0] == fence[0] and len(close.group(1)) >= len(fence):
                break
            line = lines[i]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            i += 1
        blocks.append(Block(lang, start, body))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The page without its fenced blocks (each line of a block blanked, so lines still count)."""
    lines = text.splitlines()
    for b in fenced_blocks(text):
        for k in range(b.line - 1, min(b.line + len(b.body) + 1, len(lines))):
            lines[k] = ""
    return "\n".join(lines)


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of a bash block: continuations joined, comments and blank lines dropped."""
    out, buf, first = [], "", None
    for k, raw in enumerate(block.body):
        line = raw.rstrip()
        if first is None:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            first = block.line + 1 + k
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        out.append((first, buf.strip()))
        buf, first = "", None
    if buf.strip():
        out.append((first, buf.strip()))
    return out


def tokens(command: str) -> list[str]:
    """Shell words of a command, comments dropped and operators (&&, |, ;) as their own words."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def segments(words: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in words:
        if w in OPERATORS:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(w)
    if cur:
        out.append(cur)
    return out


def code_text(command: str) -> str:
    """The command without its comments (for classification)."""
    try:
        return " ".join(tokens(command))
    except ValueError:  # unbalanced quotes: reported by the run / parse
        return command


def classify(command: str) -> str:
    code = code_text(command)
    try:
        parts = [" ".join(s) for s in segments(tokens(command))]
    except ValueError:
        parts = [command]
    if any(p.startswith(SETUP_PREFIXES) for p in parts):
        return "setup"
    if any(m in code for m in LONG_MARKERS) or GPU_RE.search(code):
        return "long"
    if "tools/make_shipped_checkpoint.py" in code and "--rescore" not in code:
        return "long"
    return "short"


def page_items(page: Path) -> list[Item]:
    items = []
    for b in fenced_blocks(page.read_text()):
        if b.lang == "bash":
            items += [Item(classify(c), c, line) for line, c in shell_commands(b)]
        elif b.lang == "python":
            code = "\n".join(b.body)
            kind = "python-long" if PY_LONG_RE.search(code) else "python"
            items.append(Item(kind, code, b.line))
    return items


# ---------------------------------------------------------------------------------------------
# parsing long commands
# ---------------------------------------------------------------------------------------------

WRAPPERS_WITH_VALUE = {"nice": {"-n"}, "timeout": {"-s", "-k", "--signal", "--kill-after"}}


def strip_wrappers(words: list[str]) -> list[str]:
    """``nice -n 10 A=1 time python x.py`` -> ``python x.py``."""
    w = list(words)
    while w:
        head = w[0]
        if re.match(r"^\w+=", head) or head in ("time", "nohup", "env", "exec", "command"):
            w = w[1:]
        elif head == "nice":
            w = w[1:]
            while w and w[0].startswith("-"):
                w = w[2:] if w[0] == "-n" else w[1:]
        elif head == "timeout":
            w = w[1:]
            while w and w[0].startswith("-"):
                w = w[2:] if w[0] in WRAPPERS_WITH_VALUE["timeout"] else w[1:]
            w = w[1:]  # the duration
        else:
            break
    return w


def invocation(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("cli", "", argv) for resend, ("script", path, argv) for a Python script, else None."""
    w = strip_wrappers(words)
    if not w:
        return None
    head = os.path.basename(w[0])
    if head == "resend":
        return ("cli", "", w[1:])
    if re.fullmatch(r"python[\d.]*", head) or head == "torchrun":
        rest = w[1:]
        while rest:
            if rest[0] == "-m" and len(rest) > 1:
                module = rest[1]
                if module in ("resend_novelty.cli", "resend_novelty"):
                    return ("cli", "", rest[2:])
                if module in ("torch.distributed.run", "torch.distributed.launch"):
                    rest = rest[2:]
                    continue
                return None  # another module (pytest, venv, pip, ...)
            if rest[0] == "-c":
                return None
            if rest[0].endswith(".py"):
                return ("script", rest[0], rest[1:])
            # interpreter / torchrun options: skip the option (and its value, when it takes one)
            if rest[0] in ("-X", "-W") or (head == "torchrun" and rest[0].startswith("--")
                                           and "=" not in rest[0] and len(rest) > 1
                                           and not rest[1].startswith("-")
                                           and not rest[1].endswith(".py")):
                rest = rest[2:]
            else:
                rest = rest[1:]
        return None
    return None


def flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if re.match(r"^--[A-Za-z]", a)]


def missing_flags(argv: list[str], help_text: str) -> list[str]:
    return [f for f in flags(argv)
            if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]


@lru_cache(maxsize=None)
def cli_parser():
    from resend_novelty.cli import build_parser

    return build_parser()


def parse_cli(argv: list[str]) -> str | None:
    """None if ``resend ARGV`` parses (and every --flag is in the help), else the error."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            ns = cli_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None) or not ({"-h", "--help", "--version"} & set(argv)):
            return f"argparse exit {exc.code}: {err.getvalue().strip() or out.getvalue().strip()}"
        return None
    from resend_novelty.evaluation import SETTINGS

    setting = getattr(ns, "setting", None)
    if ns.command in ("benchmark", "osdg") and setting and setting not in SETTINGS:
        return f"no benchmark setting {setting!r} (resend benchmark --list): {sorted(SETTINGS)}"
    sub = ns.command
    help_text = cli_help(sub)
    miss = missing_flags(argv, help_text)
    return f"flags not in `resend {sub} --help`: {miss}" if miss else None


@lru_cache(maxsize=None)
def cli_help(sub: str | None) -> str:
    out = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(io.StringIO()):
        cli_parser().parse_args(([sub] if sub else []) + ["--help"])
    return out.getvalue()


def _script_help(script: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL, env=base_env())
    return proc.returncode, proc.stdout + proc.stderr


@lru_cache(maxsize=None)
def all_script_helps() -> dict[str, tuple[int, str]]:
    """``python SCRIPT --help`` of every existing script any page names, run once each, in
    parallel (each is one single-threaded interpreter start-up)."""
    scripts = set()
    for page in PAGES:
        for item in page_items(page):
            if item.kind in ("long", "setup"):
                with contextlib.suppress(ValueError):
                    for seg in segments(tokens(item.text)):
                        inv = invocation(seg)
                        if inv and inv[0] == "script" and (REPO / inv[1]).is_file():
                            scripts.add(inv[1])
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(sorted(scripts), pool.map(_script_help, sorted(scripts))))


def script_help(script: str) -> tuple[int, str]:
    """(exit code, output) of ``python SCRIPT --help``, run from the repo root."""
    helps = all_script_helps()
    return helps[script] if script in helps else _script_help(script)


def check_script(script: str, argv: list[str]) -> str | None:
    if not (REPO / script).is_file():
        return f"{script} does not exist (paths are relative to the repository root)"
    rc, text = script_help(script)
    if rc != 0:
        return f"`python {script} --help` exited {rc}:\n{tail(text)}"
    miss = missing_flags(argv, text)
    return f"flags not in `python {script} --help`: {miss}" if miss else None


def check_parses(command: str) -> list[str]:
    try:
        words = tokens(command)
    except ValueError as exc:
        return [f"not a valid shell command ({exc})"]
    errors = []
    for seg in segments(words):
        inv = invocation(seg)
        if inv is None:
            continue
        kind, script, argv = inv
        err = parse_cli(argv) if kind == "cli" else check_script(script, argv)
        if err:
            errors.append(err)
    return errors


def check_python_imports(code: str) -> str | None:
    """Compile a Python block and execute its import statements (names must exist)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return f"SyntaxError: {exc}"
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    src = "\n".join(ast.unparse(n) for n in imports)
    try:
        exec(compile(src, "<imports>", "exec"), {})
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return f"imports fail: {type(exc).__name__}: {exc}\n{src}"
    return None


# ---------------------------------------------------------------------------------------------
# running short commands
# ---------------------------------------------------------------------------------------------

def base_env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "MPLBACKEND": "Agg"})
    if cache is not None:
        env["RESEND_CACHE"] = str(cache)
    return env


def tail(text: str, n: int = 3000) -> str:
    """The end of an output, progress-bar redraws (carriage returns) collapsed."""
    lines = [ln.split("\r")[-1] for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if ln.strip())
    return text if len(text) <= n else "..." + text[-n:]


def run(argv: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, str, str, float]:
    """Run in its own process group (killed whole on timeout); rc None = timed out."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return rc, out, err, time.monotonic() - t0


# A process that imports the library once and forks a child per `resend ...` command or Python
# block: the child runs exactly what the console script / `python FILE` runs
# (resend_novelty.cli.main(argv) / the file as __main__), in the page's directory, with its
# stdin on /dev/null and its output in files. Importing torch, torchvision and the CLI takes most
# of a short command's time (about 8 of 12 s on 2 cores), so this keeps the test fast.
SERVER = r"""
import importlib, json, os, runpy, signal, sys, time, traceback

from resend_novelty.cli import build_parser, main
build_parser()  # imports every sub-command's module (torchvision, the training code, ...)
# not onnxruntime: imported before fork(), it leaves children hanging at exit
for name in ("matplotlib.pyplot", "sklearn.mixture", "safetensors.torch"):
    try:
        importlib.import_module(name)
    except Exception:
        pass


def child(req):
    os.setsid()
    os.chdir(req["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags, 0o644), fd)
    try:
        if req["kind"] == "cli":
            sys.argv = ["resend", *req["argv"]]
            return int(main(req["argv"]) or 0)
        sys.argv = [req["path"]]
        runpy.run_path(req["path"], run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(req)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            # no interpreter shutdown: destructors of native thread pools inherited through
            # fork() can wait forever. Every write of the library is complete by now (the
            # feature cache commits each insert, files are closed).
            os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            rc = None
            break
        time.sleep(0.05)
    print(json.dumps({"rc": rc}), flush=True)
"""


class Runner:
    """Runs `resend ARGS` and Python files through SERVER; falls back to a plain subprocess."""

    def __init__(self, base: Path, env: dict):
        self.base, self.env, self.proc, self.n = base, env, None, 0
        script = base / "doc_runner_server.py"
        script.write_text(SERVER)
        try:
            self.proc = subprocess.Popen([sys.executable, str(script)], cwd=base, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            if self.proc.stdout.readline().strip() != "ready":
                self.close()
        except OSError:
            self.proc = None

    def _request(self, req: dict, fallback: list[str], cwd: Path, timeout: float):
        if self.proc is None or self.proc.poll() is not None:
            return run(fallback, cwd, self.env, timeout)
        self.n += 1
        out, err = self.base / f"run{self.n}.out", self.base / f"run{self.n}.err"
        req.update(cwd=str(cwd), out=str(out), err=str(err), timeout=timeout)
        t0 = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            rc = json.loads(self.proc.stdout.readline())["rc"]
        except (OSError, ValueError):  # the server died: plain subprocesses from now on
            self.close()
            return run(fallback, cwd, self.env, timeout)
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return rc, read(out), read(err), time.monotonic() - t0

    def cli(self, argv: list[str], cwd: Path, timeout: float):
        return self._request({"kind": "cli", "argv": argv}, ["resend", *argv], cwd, timeout)

    def python(self, path: Path, cwd: Path, timeout: float):
        return self._request({"kind": "python", "path": str(path)}, [sys.executable, str(path)],
                             cwd, timeout)

    def close(self):
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


SHELL_CHARS = set("$`<>*?[]{}~|&;()!\\'\"")


def simple_resend(command: str) -> list[str] | None:
    """ARGS of a plain `resend ARGS` (no shell syntax to interpret), else None."""
    try:
        words = tokens(command)
    except ValueError:
        return None
    if not words or words[0] != "resend" or any(SHELL_CHARS & set(w) for w in words):
        return None
    return words[1:]


def write_jpeg(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(path, "JPEG")


class Workspace:
    """Generated images, one feature cache for every run, a working directory per page."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / "data"
        self.cache = base / "cache"
        self.blocks = base / "blocks"
        self.blocks.mkdir(parents=True)
        rng = np.random.default_rng(23)
        for c in CLASSES:
            for i in range(1, 5):
                write_jpeg(self.data / "support" / c / f"{i}.jpg", rng)
        for i in range(1, 7):
            write_jpeg(self.data / "new_images" / f"{i}.jpg", rng)
        self.env = base_env(self.cache)
        self.runner = Runner(base, self.env)
        self._detector: Path | None = None

    def page_dir(self, page: Path) -> Path:
        d = self.base / "pages" / slug(page)
        shutil.copytree(self.data, d)
        return d

    def detector(self) -> Path:
        """``resend fit --support support/ --out out/detector.safetensors``, made once."""
        if self._detector is None:
            target = self.base / "detector" / "detector.safetensors"
            rc, out, err, _ = self.runner.cli(["fit", "--support", "support/", "--out",
                                               str(target), "--quiet"], self.data, COMMAND_TIMEOUT_S)
            if rc != 0:
                raise RuntimeError(f"could not fit the example detector out/detector.safetensors "
                                   f"(exit {rc}):\n{tail(out)}\n{tail(err)}")
            self._detector = target
        return self._detector

    def prepare(self, cwd: Path, text: str) -> None:
        """Example inputs the command uses but no earlier command of the page made."""
        if reads_detector(text) and not (cwd / "out/detector.safetensors").exists():
            (cwd / "out").mkdir(exist_ok=True)
            shutil.copy(self.detector(), cwd / "out/detector.safetensors")
        if "tools/" in text and not (cwd / "tools").exists():
            # copies, so that a tool writing next to itself (make_shipped_checkpoint.py --rescore
            # rewrites src/resend_novelty/weights/) writes into the temporary directory
            shutil.copytree(REPO / "tools", cwd / "tools",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copytree(REPO / "src" / "resend_novelty" / "weights",
                            cwd / "src" / "resend_novelty" / "weights")


def reads_detector(text: str) -> bool:
    """Whether a command / block uses out/detector.safetensors as an input (not as its output)."""
    return any("out/detector.safetensors" in line
               and not re.search(r"--out[=\s]+\S*out/detector\.safetensors", line)
               and "save" not in line for line in text.splitlines())


def absolute_paths(item: Item) -> list[str]:
    """Absolute paths of a short command / block: the examples work in the current directory."""
    if item.kind == "python":
        try:
            tree = ast.parse(item.text)
            parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
            found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                     and isinstance(n.value, str) and id(n) not in parts]
        except SyntaxError:
            return []
    else:
        try:
            found = [w.split("=", 1)[-1] for w in tokens(item.text)]
        except ValueError:
            return []
    return [p for p in found if re.match(r"^/[\w.~-]", p) and not p.startswith("/dev/")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("doc_commands"))
    yield ws
    ws.runner.close()


def failure(item: Item, page: Path, rc, out: str, err: str, seconds: float) -> str:
    status = f"timed out after {COMMAND_TIMEOUT_S} s" if rc is None else f"exit {rc}"
    text = item.text if len(item.text) < 600 else item.text[:600] + " ..."
    return (f"--- {item.where(page)} ({status}, {seconds:.0f} s)\n{text}\n"
            f"[stdout]\n{tail(out, 1500)}\n[stderr]\n{tail(err)}\n")


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_readme_setup_commands_are_first_and_match_ci():
    commands = [(ln, c) for b in fenced_blocks(README.read_text()) if b.lang == "bash"
                for ln, c in shell_commands(b)]
    assert len(commands) >= 2, "README.md needs the two set-up commands in its first ```bash blocks"
    first_two = [c for _, c in commands[:2]]
    assert all(classify(c) == "setup" and "python3 -m venv" in c for c in first_two), (
        f"the first two README commands must be the set-up chains, got {first_two}")
    ci = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")
          and not ln.startswith(("set ", "cd ", "#!"))]
    assert ci, ".ci/run has no command"
    ci_command = " ".join(ci[-1].split())
    tests = [" ".join(c.split()) for c in first_two if "pytest" in c]
    assert tests == [ci_command], (
        f"README's test command must be exactly the command of .ci/run:\n  .ci/run: {ci_command}\n"
        f"  README:  {tests}")
    install = [c for c in first_two if "pytest" not in c]
    assert install and "pip install" in install[0], f"no install chain among {first_two}"


def test_readme_length():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_session_wording(page):
    bad = []
    for k, line in enumerate(page.read_text().splitlines(), 1):
        if re.search(r"session", line.replace("InferenceSession", ""), re.I):
            bad.append(f"{rel(page)}:{k}: {line.strip()}")
    assert not bad, "work-diary wording ('session'; only InferenceSession is fine):\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_fence_languages(page):
    bad = [f"{rel(page)}:{b.line}: ```{b.lang}" for b in fenced_blocks(page.read_text())
           if b.lang in WRONG_LANGS]
    assert not bad, "use ```bash / ```python (tested) or ```text (not run):\n" + "\n".join(bad)


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    out |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", path.read_text()))
    return frozenset(out)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links(page):
    text = re.sub(r"`[^`\n]*`", "", prose(page.read_text()))  # no links inside code
    bad = []
    for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        if re.match(r"^[a-zA-Z][\w+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if REPO.resolve() not in (dest, *dest.parents):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO.resolve())}")
    bad = list(dict.fromkeys(bad))
    assert not bad, f"broken relative links in {rel(page)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_long_commands_parse(page):
    """Commands on the benchmark data / a GPU / benchmarks/: parsed, not run."""
    errors = []
    for item in page_items(page):
        if item.kind in ("long", "setup"):
            errors += [f"--- {item.where(page)}\n{item.text}\n{e}\n" for e in check_parses(item.text)]
        elif item.kind == "python-long":
            err = check_python_imports(item.text)
            if err:
                errors.append(f"--- {item.where(page)} (python)\n{err}\n")
    assert not errors, f"{len(errors)} command(s) of {rel(page)} do not parse:\n" + "\n".join(errors)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_short_commands_run(page, workspace):
    """Short shell commands and Python blocks of the page, in order, on generated images."""
    items = [i for i in page_items(page) if i.kind in ("short", "python")]
    if not items:
        return
    cwd = workspace.page_dir(page)
    state: list[str] = []  # cd / export lines, replayed before later commands
    failures = []
    for item in items:
        outside = absolute_paths(item)
        if outside:  # not run: it would read or write outside the temporary directory
            failures.append(f"--- {item.where(page)} (not run)\n{item.text}\nabsolute paths "
                            f"{outside}: use support/, new_images/, out/ (relative)\n")
            continue
        try:
            workspace.prepare(cwd, item.text)
        except RuntimeError as exc:
            failures.append(f"--- {item.where(page)} (not run)\n{item.text}\n{exc}\n")
            continue
        args = None if state else simple_resend(item.text)
        if item.kind == "python":
            script = workspace.blocks / f"{slug(page)}_{item.line}.py"
            script.write_text(item.text + "\n")
            rc, out, err, seconds = workspace.runner.python(script, cwd, COMMAND_TIMEOUT_S)
        elif args is not None:
            rc, out, err, seconds = workspace.runner.cli(args, cwd, COMMAND_TIMEOUT_S)
        else:
            rc, out, err, seconds = run(["bash", "-c", "\n".join([*state, item.text])], cwd,
                                        workspace.env, COMMAND_TIMEOUT_S)
        print(f"{item.where(page)} {item.kind}: exit {rc}, {seconds:.1f} s")
        if rc != 0:
            failures.append(failure(item, page, rc, out, err, seconds))
        elif item.kind == "short" and SHELL_STATE_RE.match(item.text):
            state.append(item.text)
    assert not failures, (f"{len(failures)} of {len(items)} short command(s) of {rel(page)} "
                          f"fail (run in {cwd}):\n" + "\n".join(failures))

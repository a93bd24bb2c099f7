"""The package's shape: one layer per folder, data flowing one way (README, section "Layout").

Static checks on the source tree (no import is executed): no import circle among the package's
modules, every import goes to the module's own folder or to a lower layer, no module over 500
lines, argparse only in ``cli/``, and no ``sys.path`` manipulation in benchmarks/, tools/ or tests/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "resend_novelty"

# low to high: a module may import its own layer or a lower one, never a higher one
LAYERS = ["integrity", "data", "backbones", "features", "models", "transforms", "detectors",
          "evaluation", "training", "osdg", "report", "cli"]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Package modules imported by module ``name`` (anywhere in the file, functions included)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES and m != name}


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_circle():
    graph = {m: _imports(m) for m in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_go_down_the_layers():
    bad = []
    for m in MODULES:
        own = _layer(m)
        if own is None:  # resend_novelty/__init__.py: the public API, may import every layer
            continue
        for n in _imports(m):
            other = _layer(n)
            if other is None and n == "resend_novelty":
                if not m.endswith(("cli.main", "cli")):  # __version__
                    bad.append(f"{m} imports the top-level package")
                continue
            if other not in LAYERS or own not in LAYERS:
                bad.append(f"{m} -> {n}: layer not in the list")
            elif LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{m} ({own}) imports {n} ({other}), a higher layer")
    assert not bad, "\n".join(bad)


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert folders <= set(LAYERS), f"folders without a place in LAYERS: {sorted(folders - set(LAYERS))}"


def test_no_module_over_500_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_argparse_only_in_cli():
    users = [m for m, p in MODULES.items()
             if _layer(m) != "cli" and "argparse" in {a for node in ast.walk(ast.parse(p.read_text()))
                                                     for a in _names(node)}]
    assert not users, f"argparse imported outside cli/: {users}"


def _names(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module.split(".")[0]]
    return []


@pytest.mark.parametrize("folder", ["benchmarks", "tools", "tests"])
def test_no_sys_path_manipulation(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "path"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                offenders.append(str(path.relative_to(ROOT)))
                break
            if isinstance(node, ast.Attribute) and node.attr == "spec_from_file_location":
                offenders.append(str(path.relative_to(ROOT)))
                break
    assert not offenders, f"sys.path / file-path imports in: {offenders}"

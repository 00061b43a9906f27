"""The package's shape: its imports form no cycle, the library never imports the command line,
and README.md's layout names every module.

The import graph is read from the source (every ``import``, at module level or inside a
function), so that an import made only when a function runs counts as much as one made at
import time. The library is everything installed as ``psi_geoopt`` except the command line:
``psi_geoopt.cli``, ``psi_geoopt.__main__`` and ``psi_geoopt.experiments`` (data, models,
training loop, demo, compare, bench).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest

import psi_geoopt

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"psi_geoopt": ROOT / "psi_geoopt", "psi_geoopt.theory": ROOT / "theory"}
COMMAND_LINE = ("psi_geoopt.cli", "psi_geoopt.__main__", "psi_geoopt.experiments")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modules of this package that ``name`` imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")
                parent = parent[: len(parent) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_graph_sees_the_package():
    assert {"psi_geoopt", "psi_geoopt.manifold", "psi_geoopt.theory.verify"} <= set(MODULES)
    assert "psi_geoopt.manifold" in GRAPH["psi_geoopt"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_cycle(name):
    assert name not in _reachable(name), f"{name} imports itself through {sorted(GRAPH[name])}"


LIBRARY = sorted(name for name in MODULES if not name.startswith(COMMAND_LINE))


@pytest.mark.parametrize("name", LIBRARY)
def test_library_does_not_import_the_command_line(name):
    reached = sorted(t for t in _reachable(name) if t.startswith(COMMAND_LINE))
    assert not reached, f"{name} imports {reached}"


def test_the_library_imports_without_the_command_line_dependencies(without_cli_extra):
    code = (
        "import sys, psi_geoopt, psi_geoopt.optim, psi_geoopt.theory.verify;"
        "print(sorted(m for m in sys.modules if m.startswith(('psi_geoopt.cli', "
        "'psi_geoopt.experiments'))))"
    )
    result = without_cli_extra(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_one_version():
    assert importlib.metadata.version("psi-geoopt") == psi_geoopt.__version__


def _docstring_lines(node: ast.AST) -> int:
    """Lines of the docstrings of ``node`` and of every function and class inside it."""
    lines = 0
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = inner.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines += first.end_lineno - first.lineno + 1
    return lines


def _definitions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield f"{name}.{node.name}", node


MAX_CLASS_LINES = 250
MAX_FUNCTION_CODE_LINES = 100
LARGE_CLASSES = {"psi_geoopt.manifold.PSIManifold"}  # one operation per method, with its math


def test_classes_and_functions_stay_small():
    """No class over 250 lines (but the manifold, a method per operation) and no function over
    100 lines of code (docstrings aside), so that each can be held in one's head."""
    too_large = []
    for name, node in _definitions():
        lines = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            if lines > MAX_CLASS_LINES and name not in LARGE_CLASSES:
                too_large.append(f"class {name}: {lines} lines")
        elif lines - _docstring_lines(node) > MAX_FUNCTION_CODE_LINES:
            too_large.append(f"function {name}: {lines - _docstring_lines(node)} lines of code")
    assert not too_large, too_large


def test_the_readme_layout_names_every_module_and_folder():
    """The layout block of README.md's "Development" section names every module of the
    package and of ``theory/`` (as a word: ``rsgd.py`` or ``rsgd``) and every top-level folder."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    layout = re.search(r"^```\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)
    words = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", layout))
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in MODULES.values()
        if path.stem not in ("__init__", "__main__") and path.stem not in words
    )
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout: the tracked folders are unknown")
    folders = {line.split("/")[0] for line in files.stdout.splitlines() if "/" in line}
    missing += sorted(f"{name}/" for name in folders if f"{name}/" not in layout)
    assert not missing, f"README.md's layout does not name: {', '.join(missing)}"

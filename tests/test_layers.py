"""The layering contract (pyproject.toml [tool.importlinter]: reference_model <- fusion_export <- engines <- benchmarks
<- fusion_export_cli) holds, breaks on a planted back-import, and no module imports itself back through others."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("reference_model", "fusion_export", "engines", "benchmarks", "fusion_export_cli")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
needs_lint = pytest.mark.skipif(LINT is None, reason="needs import-linter (the test extra)")


def lint(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--no-cache", "--no-logo"], cwd=folder, capture_output=True, text=True, timeout=120)


@needs_lint
def test_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_lint
def test_a_planted_back_import_breaks_it(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "fusion_export" / "precision.py", "a") as f:  # a lazy import is a dependency too
        f.write("\n\ndef _planted():\n    from engines.backends import open_backend  # noqa: F401\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert "fusion_export is not allowed to import engines" in result.stdout


def _module_graph() -> dict[str, set[str]]:
    """Every import between the packages' modules (function-level ones included), by resolved module name."""
    files = {}
    for name in PACKAGES:
        for path in (ROOT / name).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):  # a package's own __init__
                    graph[module].add(target)
    return graph


def test_no_file_level_import_cycle():
    graph, index, low, stack, on_stack, cycles = _module_graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []

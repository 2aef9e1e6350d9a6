"""Import rules of the package graph (docs/architecture.md), read from the source with ``ast``, so an import
inside a function counts as much as one at the top of a file. Every failure names the offending file:line.

- the three programs (exporter, edge_agent, central) never import each other;
- the contract (tokenline) imports none of our other packages; runtime imports only tokenline; sql only tokenline;
- no import circles between our modules;
- torch is the exporter's alone;
- the contract imports only numpy, pydantic and pyyaml (besides the standard library) when it is imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenline", "runtime", "sql", "exporter", "edge_agent", "central")
PROGRAMS = ("exporter", "edge_agent", "central")
# which of our packages each package may import (besides itself)
MAY_IMPORT: Dict[str, Set[str]] = {"tokenline": set(), "runtime": {"tokenline"}, "sql": {"tokenline"}}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (ours) or top-level name (third party)
    path: Path
    line: int
    lazy: bool  # inside a function or class body

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _resolve(source: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[source].name == "__init__.py"
    base = source.split(".")[: len(source.split(".")) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(tree: ast.AST, lazy: bool = False) -> Iterator[tuple]:
    for child in ast.iter_child_nodes(tree):
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, lazy
        yield from _walk(child, inner)


def _imports() -> List[Import]:
    out = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, lazy in _walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = _resolve(mod, node)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for name in names:
                target = name if name.split(".")[0] not in PACKAGES else _ours(name)
                out.append(Import(mod, target, path, node.lineno, lazy))
    return out


def _ours(name: str) -> str:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return name


IMPORTS = _imports()


def _top(name: str) -> str:
    return name.split(".")[0]


def _report(bad: List[Import], rule: str) -> str:
    return f"{rule}:\n" + "\n".join(f"  {i.where()}: {i.source} imports {i.target}{' (lazily)' if i.lazy else ''}"
                                      for i in bad)


def test_the_source_was_read() -> None:
    assert {"tokenline.wire", "runtime.runners", "edge_agent.agent", "central.ingest", "exporter.cli"} <= set(MODULES)
    assert any(i.lazy for i in IMPORTS) and len(IMPORTS) > 200
    edges = _edges()
    assert "exporter.trt.compat" in edges["exporter.export"]  # imported inside check_trt
    assert {"exporter.checkpoints.focus", "exporter.checkpoints.hf"} <= edges["exporter.checkpoints.registry"]
    assert "exporter.trt.cli" in edges["exporter.cli"]


def test_programs_never_import_each_other() -> None:
    bad = [i for i in IMPORTS if _top(i.source) in PROGRAMS and _top(i.target) in PROGRAMS
           and _top(i.target) != _top(i.source)]
    assert not bad, _report(bad, "the programs exporter, edge_agent and central must not import each other")


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_lower_packages_import_only_what_is_below_them(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    bad = [i for i in IMPORTS if _top(i.source) == package and _top(i.target) in PACKAGES
           and _top(i.target) not in allowed]
    assert not bad, _report(bad, f"{package} may import only {sorted(allowed)} of our packages")


def _circles(edges: Dict[str, Set[str]]) -> List[Set[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[Set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for i in IMPORTS:
        if _top(i.target) in PACKAGES and i.target in MODULES and i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    return edges


def test_no_import_circles() -> None:
    circles = _circles(_edges())
    lines = []
    for c in circles:
        lines.append("  circle: " + " <-> ".join(sorted(c)))
        lines += [f"    {i.where()}: {i.source} imports {i.target}" for i in IMPORTS
                  if i.source in c and i.target in c and i.source != i.target]
    assert not circles, "import circles between our modules:\n" + "\n".join(lines)


def test_torch_is_the_exporters_alone() -> None:
    bad = [i for i in IMPORTS if _top(i.target) == "torch" and _top(i.source) != "exporter"]
    assert not bad, _report(bad, "only the exporter may import torch")


def _stdlib() -> Optional[Set[str]]:
    return set(getattr(sys, "stdlib_module_names", ())) or None


def test_the_contract_imports_only_numpy_pydantic_and_yaml_at_import_time() -> None:
    std = _stdlib()
    if std is None:
        pytest.skip("sys.stdlib_module_names needs Python 3.10+")
    allowed = std | {"numpy", "pydantic", "yaml", "__future__"} | set(PACKAGES)
    bad = [i for i in IMPORTS if _top(i.source) == "tokenline" and not i.lazy and _top(i.target) not in allowed]
    assert not bad, _report(bad, "tokenline imports only numpy, pydantic and pyyaml at import time (others lazily)")


def test_edge_side_imports_neither_torch_nor_the_other_programs_when_run() -> None:
    """Complements the source rules: what a real interpreter has loaded after importing the edge side."""
    code = ("import sys, edge_agent.cli, edge_agent.agent, runtime.runners, runtime.engine, tokenline.wire, "
            "tokenline.topics; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'exporter', 'central')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

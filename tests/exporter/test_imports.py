"""The exporter's own import graph, read from the source (lazy imports included): no circles; the command line
with its TensorRT subcommands loads without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def exporter_imports() -> Dict[str, Set[str]]:
    """module -> the exporter modules it imports anywhere in its body (``from pkg import sub`` counts as pkg.sub
    when sub is a module; a submodule's implicit import of its parent package does not count)."""
    modules = {_module_name(p): p for p in (ROOT / "exporter").rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
                deps.update(subs or {node.module})
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[name] = deps - {name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_reader_sees_lazy_imports_and_submodules() -> None:
    graph = exporter_imports()
    assert "exporter.trt.compat" in graph["exporter.export"]  # imported inside check_trt
    assert {"exporter.checkpoints.focus", "exporter.checkpoints.hf"} <= graph["exporter.checkpoints.registry"]
    assert "exporter.trt.cli" in graph["exporter.cli"]


def test_no_import_circles_in_the_exporter() -> None:
    assert cycles(exporter_imports()) == []


def test_trt_subcommands_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import exporter.cli\n"
        "exporter.cli.build_parser().parse_args(['check-trt', 'model.onnx'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

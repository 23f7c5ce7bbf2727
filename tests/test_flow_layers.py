"""The runtime's place in the layers: flow and stages sit in no import circle, flow imports
nothing above it, and the runtime asks its engine segments, never their engines."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
ABOVE_FLOW = ("pipeline_dsl.serve", "pipeline_dsl.commands", "pipeline_dsl.cli", "pipeline_dsl.runner",
              "pipeline_dsl.benchmark")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def import_graph() -> nx.DiGraph:
    files = list((ROOT / "pipeline_dsl").rglob("*.py")) + list((ROOT / "stages").glob("*.py"))
    names = {module_name(f): f for f in files}
    g = nx.DiGraph()
    for name, f in names.items():
        g.add_node(name)
        for target in imports_of(f):
            if target in names and target != name:
                g.add_edge(name, target)
    return g


def test_no_import_circle_passes_through_flow_or_stages():
    g = import_graph()
    for comp in nx.strongly_connected_components(g):
        if len(comp) > 1:
            mine = [m for m in comp if m.startswith(("pipeline_dsl.flow", "stages"))]
            assert not mine, f"import circle through {sorted(comp)}"


def test_flow_imports_nothing_above_it():
    g = import_graph()
    for m in g:
        if m.startswith("pipeline_dsl.flow"):
            above = [t for t in g.successors(m) if t.startswith(ABOVE_FLOW)]
            assert not above, f"{m} imports {above}"


def test_the_runtime_never_reaches_into_an_engine():
    """Only segment.py holds the Engine; everything else in flow asks the EngineSegment."""
    for f in (ROOT / "pipeline_dsl" / "flow").glob("*.py"):
        if f.name == "segment.py":
            continue
        reach = [node.lineno for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Attribute) and node.attr in ("engine", "runner", "executor")]
        assert not reach, f"{f.name} reaches into an engine at lines {reach}"


def test_there_is_one_build_runtime_and_it_lives_in_flow():
    assert not (ROOT / "pipeline_dsl" / "runtime.py").exists()
    from pipeline_dsl.flow import build_runtime, load_graph

    assert build_runtime.__module__ == load_graph.__module__ == "pipeline_dsl.flow"

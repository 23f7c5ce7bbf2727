"""The import graph of agp's own modules (pipeline_dsl/ and stages/), read from the source.

    g = import_graph()                 # networkx.DiGraph: module -> module it imports, edge `line`
    layers = read_layers()             # [(number, name, [pattern, ...])] from docs/architecture.md
    layer_of("pipeline_dsl.flow.router", layers)   # -> the number of its layer

Every import counts, at a module's top or inside a function. `from pkg import name` is an
arrow to `pkg.name` when that is a module, to the module `pkg/__init__.py` re-exports `name`
from when it does (a re-export is no circle of its own), and to `pkg` itself otherwise.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the tree (build outputs left out)."""
    files = [*(root / "pipeline_dsl").rglob("*.py"), *(root / "stages").rglob("*.py")]
    out = {}
    for f in files:
        parts = list(f.relative_to(root).with_suffix("").parts)
        if "build" in parts or "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _absolute(node: ast.ImportFrom, package: str) -> str:
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def import_nodes(path: Path) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """Every import statement of the file, at its top or nested, in ast.walk's order: read and
    walked once however many checks look at them."""
    return tuple(n for n in ast.walk(_parse(path)) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _reexports(package: str, files: dict[str, Path]) -> dict[str, str]:
    """{name: module it comes from} for the names a package's __init__ imports at its top."""
    out = {}
    for node in _parse(files[package]).body:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for a in node.names:
                out[a.asname or a.name] = base
    return out


def imports_of(name: str, files: dict[str, Path]) -> list[tuple[str, int]]:
    """(module imported, line) for every import in module `name`, resolved as the docstring says."""
    path = files[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in import_nodes(path):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for a in node.names:
                package_init = base in files and files[base].name == "__init__.py" and base != name
                source = _reexports(base, files).get(a.name) if package_init else None
                if f"{base}.{a.name}" in files:
                    out.append((f"{base}.{a.name}", node.lineno))
                elif source in files and source != name:
                    out.append((source, node.lineno))
                else:
                    out.append((base, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    files = module_files(root)
    g = nx.DiGraph()
    for name in files:
        g.add_node(name)
        for target, line in imports_of(name, files):
            if target in files and target != name:
                g.add_edge(name, target, line=line)
    return g


def read_layers(doc: Path = DOC) -> list[tuple[int, str, list[str]]]:
    """The rows of the layer table under '## Layers': (number, layer, module patterns)."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|([^|]*)\|", line)
        if m:
            rows.append((int(m.group(1)), m.group(2).strip(), re.findall(r"`([\w.*]+)`", m.group(3))))
    return rows


def layer_of(module: str, layers) -> int | None:
    """The layer whose pattern names `module` (`pkg.*`: the package and all below it); the
    longest pattern wins, so a sub-package can sit in a layer of its own."""
    best, best_len = None, -1
    for number, _, patterns in layers:
        for p in patterns:
            hit = (module == p[:-2] or module.startswith(p[:-1])) if p.endswith(".*") else module == p
            if hit and len(p) > best_len:
                best, best_len = number, len(p)
    return best

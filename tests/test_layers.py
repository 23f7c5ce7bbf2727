"""Imports only go downward: the tree's import graph against the layer table of
docs/architecture.md ("Layers"), lazy imports inside functions included."""
from __future__ import annotations

import ast
import textwrap

import networkx as nx
import pytest

from import_graph import ROOT, import_graph, import_nodes, layer_of, module_files, read_layers


@pytest.fixture(scope="module")
def tree():
    """The tree's import graph, built once for the checks that read it (none changes it)."""
    return import_graph()


def upward_arrows(g: nx.DiGraph, layers) -> list[str]:
    out = []
    for a, b, line in g.edges(data="line"):
        la, lb = layer_of(a, layers), layer_of(b, layers)
        if la is not None and lb is not None and lb > la:
            out.append(f"{a} (layer {la}) imports {b} (layer {lb}) at line {line}")
    return sorted(out)


def circles(g: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_the_layer_table_is_numbered_lowest_first_and_names_only_modules_that_exist():
    layers = read_layers()
    assert [n for n, _, _ in layers] == list(range(1, len(layers) + 1))
    files = module_files()
    for _, name, patterns in layers:
        for p in patterns:
            assert (p[:-2] if p.endswith(".*") else p) in files, f"layer '{name}' names {p}: no such module"


def test_every_module_has_a_layer():
    layers = read_layers()
    assert [m for m in sorted(module_files()) if layer_of(m, layers) is None] == []


def test_no_module_imports_a_higher_layer(tree):
    assert upward_arrows(tree, read_layers()) == []


def test_no_import_circle(tree):
    assert circles(tree) == []


def test_the_check_sees_an_upward_import_inside_a_function_and_a_circle(tmp_path):
    """The guard itself: a lazy import of the runtime from the planner is an upward arrow, and
    two modules of one layer importing each other are a circle."""
    for name, body in {
        "pipeline_dsl/__init__.py": "from .diagnostics import Diagnostic\n",
        "pipeline_dsl/diagnostics.py": "class Diagnostic: ...\n",
        "pipeline_dsl/units.py": "from pipeline_dsl import modes\n",
        "pipeline_dsl/modes.py": "from pipeline_dsl.units import parse\n",
        "pipeline_dsl/plan.py": "def f():\n    from pipeline_dsl.flow import runtime\n",
        "pipeline_dsl/flow/__init__.py": "from .runtime import Runtime\n",
        "pipeline_dsl/flow/runtime.py": "from pipeline_dsl import Diagnostic\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(body), encoding="utf-8")
    (tmp_path / "stages").mkdir()
    layers = [(1, "front end", ["pipeline_dsl", "pipeline_dsl.diagnostics", "pipeline_dsl.units",
                                "pipeline_dsl.modes"]),
              (2, "plan", ["pipeline_dsl.plan"]), (3, "flow", ["pipeline_dsl.flow.*"])]
    g = import_graph(tmp_path)
    assert upward_arrows(g, layers) == [
        "pipeline_dsl.plan (layer 2) imports pipeline_dsl.flow.runtime (layer 3) at line 2"]
    assert circles(g) == [["pipeline_dsl.modes", "pipeline_dsl.units"]]
    # flow.runtime takes Diagnostic through the package's re-export: an arrow to diagnostics
    assert set(g.successors("pipeline_dsl.flow.runtime")) == {"pipeline_dsl.diagnostics"}


def private_imports(root=None) -> list[str]:
    """`from M import _name` where M is another module of the tree: a reach into its privates
    (a dunder such as __version__ is public)."""
    out = []
    for name, path in module_files(root or ROOT).items():
        for node in import_nodes(path):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    ("pipeline_dsl", "stages"))):
                out += [f"{name} imports {a.name} from {'.' * node.level}{node.module or ''}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return sorted(out)


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports() == []
    (tmp_path / "pipeline_dsl").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline_dsl" / "a.py").write_text("from .b import _hidden, shown\nfrom . import __version__\n")
    assert private_imports(tmp_path) == ["pipeline_dsl.a imports _hidden from .b"]

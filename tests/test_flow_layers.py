"""The runtime's contracts: it asks its engine segments, never their engines, and there is one
build_runtime (tests/test_layers.py holds flow, like every module, to its layer)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

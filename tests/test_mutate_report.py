"""tools/mutate_report.py: a survivor counts as documented only when docs/testing.md names it whole."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mutmut")          # the `mutate` extra


def report():
    path = Path(__file__).resolve().parents[1] / "tools" / "mutate_report.py"
    spec = importlib.util.spec_from_file_location("mutate_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_survivor_is_documented_by_its_whole_name_full_or_short():
    is_documented = report().is_documented
    page = "- `protocol.x__sampling__mutmut_12`, `pipeline_dsl.flow.router.xǁRouterǁchoose__mutmut_2` — reasons"
    assert is_documented("pipeline_dsl.serve.protocol.x__sampling__mutmut_12", page)
    assert not is_documented("pipeline_dsl.serve.protocol.x__sampling__mutmut_1", page)   # a prefix of _12
    assert not is_documented("pipeline_dsl.serve.protocol.x__sampling__mutmut_123", page)
    assert is_documented("pipeline_dsl.flow.router.xǁRouterǁchoose__mutmut_2", page)
    assert not is_documented("pipeline_dsl.flow.router.xǁRouterǁchoose__mutmut_20", page)

"""A stage inside a bounded loop that sends one item along several edges staying in the loop
copies it each time round, so a request's items grow geometrically with the turns: `check` warns
at that stage, with the loop's path, the edges and the bound max_turns puts on the copies. The
tool loop's split by item type (Requests back, Generated out), a condition that picks one edge,
and a copy sent out of the loop multiply nothing, and get no warning."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import pipeline_dsl
from pipeline_dsl.diagnostics import WARNING

ROOT = Path(__file__).resolve().parent.parent

HEAD = """\
pipeline p {
    stage request : requests {}
    stage batch   : dynamic_batch {}
    stage encode  : encode {}
    stage kv      : kv_lookup {}
    stage gen     : generate {}
    stage tool    : python { fn = "hooks:calculator"  max_turns = 3  returns = any }
    stage out     : respond {}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> tool
    tool -> out
"""


@pytest.fixture
def fan_warnings(tmp_path):
    (tmp_path / "hooks.py").write_text("def calculator(item):\n    return item\n")

    def warnings(body: str) -> list:
        path = tmp_path / "t.agp"
        path.write_text(HEAD + textwrap.indent(textwrap.dedent(body), "    ") + "}\n")
        _, diags = pipeline_dsl.load(str(path))
        assert not [d for d in diags if d.is_error], [d.render() for d in diags]
        return [d for d in diags if "multiply" in d.message]
    return warnings


def test_two_edges_of_the_bounding_stage_back_into_the_loop_are_a_warning_with_the_bound(fan_warnings):
    (w,) = fan_warnings("""
        stage a : route
        stage b : route
        tool -> a
        tool -> b
        a -> batch
        b -> batch
    """)
    assert w.severity == WARNING and (w.pos.line, w.pos.col) == (7, 11)         # stage tool
    assert w.message == ("items can multiply round the loop tool -> a -> batch -> encode -> kv -> gen -> tool: "
                         "'tool' sends each item along 2 edges that stay in the loop (tool -> a, tool -> b), "
                         "and every copy goes round again")
    # tool copies on each of its 3 calls; the 4th arrival leaves by tool -> out
    assert "up to 8 (2^3) items (max_turns = 3 on 'tool')" in w.hint
    assert [n[0] for n in w.notes] == ["edge tool -> a", "edge tool -> b", "the loop's bound: max_turns = 3"]
    assert [(p.line, p.col) for _, p in w.notes] == [(17, 5), (18, 5), (7, 67)]       # the bound: max_turns = 3


def test_a_fan_out_elsewhere_in_the_loop_is_bounded_by_turns_plus_one(fan_warnings):
    """a stage that is not the bound may copy on the way in and after each call: max_turns + 1 times."""
    (w,) = fan_warnings("""
        stage a : route
        stage b : route
        tool -> a
        a -> batch
        a -> b
        b -> batch
    """)
    assert w.message.startswith("items can multiply round the loop a -> batch -> ") and "'a' sends each item along 2 " \
        "edges that stay in the loop (a -> batch, a -> b)" in w.message
    assert "up to 16 (2^4) items" in w.hint


def test_a_conditional_edge_beside_an_unconditional_one_can_copy_too(fan_warnings):
    (w,) = fan_warnings("""
        stage a : route
        stage b : route
        tool -> a
        tool -> b when turn > 1
        a -> batch
        b -> batch
    """)
    assert "(tool -> a, tool -> b)" in w.message


@pytest.mark.parametrize("body", [
    "tool -> batch",                                          # Requests back, Generated out: one way each
    "stage a : route\nstage b : route\ntool -> a when turn < 2\ntool -> b otherwise\na -> batch\nb -> batch",
    # a's copy of a Request to side leaves the loop (side answers it)
    'stage a : route\nstage side : python { fn = "hooks:calculator"  returns = generated }\n'
    "tool -> a\na -> batch\na -> side -> out",
])
def test_one_way_round_the_loop_is_no_warning(fan_warnings, body):
    assert fan_warnings(body) == []


def test_no_example_gets_the_warning():
    for path in sorted(ROOT.glob("examples/**/*.agp")):
        _, diags = pipeline_dsl.load(str(path))
        assert not [d for d in diags if "multiply" in d.message], path


def test_a_conditional_edge_to_the_stage_an_unconditional_one_reaches_is_no_copy(fan_warnings):
    """tool -> a and tool -> a when …: one connected pair, so one copy goes to a, not two."""
    assert fan_warnings("stage a : route\ntool -> a\ntool -> a when turn > 1\na -> batch") == []

"""`turn` counts an item's calls of stages with max_turns (its loops), so a comparison on it on an
edge that no loop comes before is settled before any item arrives: `check` warns at the
comparison, and stays silent inside a loop and after one."""
from __future__ import annotations

import textwrap

import pipeline_dsl
from pipeline_dsl.diagnostics import WARNING

HEAD = """\
pipeline p {
    stage request : requests {}
    stage batch   : dynamic_batch {}
    stage encode  : encode {}
    stage kv      : kv_lookup {}
    stage gen     : generate {}
    stage out     : respond {}
    stage late    : respond {}
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen
"""


def _diags(body: str) -> list:
    prog, diags = pipeline_dsl.loads(HEAD + textwrap.indent(textwrap.dedent(body), "    ") + "}\n", "t.agp")
    return diags


def test_turn_on_an_edge_no_loop_reaches_is_a_positioned_warning():
    diags = _diags("""\
        request -> batch
        gen -> late when turn > 1
        gen -> out otherwise
        """)
    assert len(diags) == 1
    d = diags[0]
    assert d.severity == WARNING
    assert (d.pos.line, d.pos.col) == (13, 22)            # at `turn > 1`
    assert "no loop comes before gen -> late" in d.message
    assert "`turn` is always 0" in d.message and "`turn > 1` never holds" in d.message


def test_turn_that_always_holds_outside_a_loop_is_said_so():
    diags = _diags("""\
        request -> batch
        gen -> out when turn == 0 or prompt_tokens > 9
        gen -> late otherwise
        """)
    assert [d.message.split(" and ")[-1] for d in diags] == ["`turn == 0` always holds"]


def test_turn_inside_a_loop_and_after_it_is_silent():
    diags = _diags("""\
        stage tool  : python { fn = "json:loads"  max_turns = 3  returns = any }
        stage guard : python { fn = "json:loads"  returns = generated }
        request -> batch
        gen -> tool when turn < 3
        gen -> guard otherwise
        tool -> batch
        tool -> guard
        guard -> out when turn > 1
        guard -> late otherwise
        """)
    assert [d.message for d in diags] == []


def test_turn_on_an_edge_into_a_loop_from_before_it_is_a_warning():
    """The edge leads into the loop, but no loop comes before it: turn is still always 0 there."""
    diags = _diags("""\
        stage route : route {}
        stage tool  : python { fn = "json:loads"  max_turns = 3  returns = any }
        request -> route
        route -> batch when turn > 0
        route -> batch otherwise
        gen -> tool
        tool -> batch
        tool -> out
        tool -> late
        """)
    diags = [d for d in diags if "`turn" in d.message]     # not: both route edges lead to batch, tool's to 2 responds
    assert [(d.severity, d.pos.line, d.pos.col) for d in diags] == [(WARNING, 15, 25)]
    assert "no loop comes before route -> batch" in diags[0].message
    assert "`turn > 0` never holds" in diags[0].message

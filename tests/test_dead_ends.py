"""A missing way out to `respond` is reported once, at the dead end the author would fix,
with a note naming the stages it strands — not once per stage upstream of it."""

from __future__ import annotations

import pipeline_dsl
from pipeline_dsl.diagnostics import render_all

HEAD = """\
pipeline p {
    model = "smollm2-135m-instruct"
    stage request : requests {}
"""

ENGINE = """\
    stage {b} : dynamic_batch {{}}
    stage {e} : encode {{}}
    stage {k} : kv_lookup {{}}
    stage {g} : generate {{}}
    {b} -> {e} when full
    {b} -> {e} when timeout
    {e} -> {k} -> {g}
"""


def engine(suffix: str = "") -> str:
    return ENGINE.format(b="batch" + suffix, e="encode" + suffix, k="kv" + suffix, g="gen" + suffix)


def diagnostics(body: str):
    prog, diags = pipeline_dsl.loads(HEAD + body + "}\n", "t.agp")
    return prog, [d for d in diags if d.is_error]


def no_path(diags):
    return [d for d in diags if "no path to a respond stage" in d.message]


def test_a_chain_missing_its_edge_into_respond_is_one_error_at_the_last_stage():
    prog, diags = diagnostics(engine() + """\
    stage out : respond {}
    request -> batch
    """)
    [dead] = no_path(diags)
    assert dead.message == "stage 'gen' has no path to a respond stage"
    assert (dead.pos.line, dead.pos.col) == (7, 11)
    assert dead.notes == (("the 4 stages before it reach no respond stage either: "
                           "'request', 'batch', 'encode', 'kv'", None),)
    assert dead.hint == "add an edge `gen -> out` (or towards another respond stage), or remove 'gen'"
    # the respond stage nothing leads to is still its own error, at the other end of the edge
    assert [d.message for d in diags if d not in no_path(diags)] == \
        ["stage 'out' is unreachable: no path from 'request' leads to it"]
    assert "2 errors" in render_all(diags, prog.sources)


def test_a_fan_out_into_one_dead_end_is_one_error():
    prog, diags = diagnostics(engine() + """\
    stage a : system_prompt { text = "a" }
    stage b : system_prompt { text = "b" }
    stage out : respond {}
    request -> a -> batch
    request -> b -> batch
    """)
    [dead] = no_path(diags)
    assert dead.message == "stage 'gen' has no path to a respond stage"
    assert dead.notes[0][0].startswith("the 6 stages before it reach no respond stage either: ")


def test_a_fan_out_with_one_dead_branch_names_only_that_branch():
    _, diags = diagnostics(engine() + engine("2") + """\
    stage out : respond {}
    request -> batch
    request -> batch2
    gen -> out
    """)
    [dead] = no_path(diags)
    assert dead.message == "stage 'gen2' has no path to a respond stage"
    # 'request' answers through gen: it is not stranded
    assert dead.notes == (("the 3 stages before it reach no respond stage either: "
                           "'batch2', 'encode2', 'kv2'", None),)


def test_two_independent_dead_ends_are_two_errors():
    _, diags = diagnostics(engine() + engine("2") + """\
    stage r : route {}
    stage out : respond {}
    request -> r
    r -> batch when prompt_tokens > 10
    r -> batch2 otherwise
    """)
    assert [d.message for d in no_path(diags)] == ["stage 'gen' has no path to a respond stage",
                                                   "stage 'gen2' has no path to a respond stage"]
    assert [d.notes[0][0] for d in no_path(diags)] == [
        "the 5 stages before it reach no respond stage either: 'request', 'batch', 'encode', 'kv', 'r'",
        "the 5 stages before it reach no respond stage either: 'request', 'batch2', 'encode2', 'kv2', 'r'"]


def test_a_long_stranded_list_is_cut_and_counted():
    stages = "".join(f"    stage s{i} : route {{}}\n" for i in range(12))
    _, diags = diagnostics(stages + "    stage out : respond {}\n    request -> "
                           + " -> ".join(f"s{i}" for i in range(12)) + "\n")
    [dead] = no_path(diags)
    assert dead.message == "stage 's11' has no path to a respond stage"
    assert dead.notes[0][0].endswith("'s6' and 4 more")
    assert dead.notes[0][0].startswith("the 12 stages before it ")
    # a route may send Requests, which respond cannot take: no edge to copy is suggested
    assert dead.hint == "add an edge from 's11' towards a respond stage, or remove it"


def test_a_stranded_list_as_long_as_the_cut_is_listed_whole_with_no_count():
    stages = "".join(f"    stage s{i} : route {{}}\n" for i in range(8))
    _, diags = diagnostics(stages + "    stage out : respond {}\n    request -> "
                           + " -> ".join(f"s{i}" for i in range(8)) + "\n")
    [dead] = no_path(diags)
    assert dead.notes[0][0] == ("the 8 stages before it reach no respond stage either: 'request', "
                                + ", ".join(f"'s{i}'" for i in range(7)))


def test_a_loop_with_no_way_out_is_one_error_at_the_loop():
    _, diags = diagnostics(engine() + """\
    stage a : route {}
    stage b : route {}
    stage out : respond {}
    request -> batch
    gen -> a -> b -> a
    """)
    [dead] = no_path(diags)
    assert dead.message == "the loop a -> b -> a has no path to a respond stage"
    assert (dead.pos.line, dead.pos.col) == (11, 11)
    assert len(dead.notes[0][0].split(",")) == 5     # request, batch, encode, kv, gen
    # the unbounded cycle is still reported by its own check
    assert any(d.message == "cycle: a -> b -> a" for d in diags)


def test_a_bounded_loop_without_an_exit_is_reported_by_the_loop_check_alone():
    _, diags = diagnostics(engine() + """\
    stage tool : python { fn = "json:loads"  max_turns = 2  returns = any }
    stage out : respond {}
    request -> batch
    gen -> tool -> batch
    """)
    assert no_path(diags) == []
    assert [d.message for d in diags if "bounds a loop" in d.message] == \
        ["stage 'tool' bounds a loop (max_turns = 2) but has no edge out of it"]


def test_other_errors_stay_beside_the_dead_end():
    _, diags = diagnostics(engine().replace("generate {}", "generate { temprature = 0.5 }") + """\
    stage out : respond {}
    stage twice : route {}
    request -> batch
    """)
    messages = [d.message for d in diags]
    assert "unknown parameter 'temprature' for stage kind 'generate'" in messages
    assert "stage 'out' is unreachable: no path from 'request' leads to it" in messages
    # a stage with no edge at all is one error, not "unreachable" and "no path to a respond stage"
    assert "stage 'twice' is not connected: no edge enters or leaves it" in messages
    assert [d.message for d in no_path(diags)] == ["stage 'gen' has no path to a respond stage"]
    assert len(diags) == 4


def test_stages_tied_only_to_each_other_are_one_error_at_the_first():
    _, diags = diagnostics(engine() + """\
    stage x : route {}
    stage y : route {}
    stage out : respond {}
    request -> batch
    gen -> out
    x -> y
    """)
    [err] = diags
    assert err.message == "stages 'x', 'y' are connected only to each other: no edge ties them to the pipeline"
    assert (err.pos.line, err.pos.col) == (11, 11)

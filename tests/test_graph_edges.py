"""Edges of pipeline_dsl/graph.py that mutation testing (make mutate) left untested: the
attributes of the built graph, how kv_lookup stages share the KV budget, outputs() and
flow_types() (what each stage carries and receives), and whole `agp check` outputs of
small graphs (cycles, ports, routes, segments, reachability)."""

from __future__ import annotations

import dataclasses
import textwrap

import networkx as nx
import pytest

import pipeline_dsl
from pipeline_dsl import ast
from pipeline_dsl.checker import check_pipeline
from pipeline_dsl.diagnostics import SourcePos, render_all
from pipeline_dsl.graph import (Segment, build_graph, check_program, check_segments, flow_types, item_types, outputs,
                                 segments_of)
from stages import builtin
from stages.registry import Port, Registry, StageKind

KIB, MIB = 1 << 10, 1 << 20


def load(text: str):
    prog, diags = pipeline_dsl.loads(textwrap.dedent(text), "t.agp")
    return prog, diags


def check(text: str) -> str:
    """What `agp check` prints for the text (empty when clean)."""
    prog, diags = load(text)
    return render_all(diags, prog.sources)


def graph(text: str, registry=None) -> nx.DiGraph:
    prog, _ = load(text)
    return build_graph(prog.pipelines[0], registry)


def hand_graph(nodes: dict, edges: list) -> nx.DiGraph:
    """A DiGraph as build_graph makes it, with only what flow_types reads (kind, params)."""
    g = nx.DiGraph()
    for n, (kind, params) in nodes.items():
        g.add_node(n, kind=kind, params=params)
    g.add_edges_from(edges)
    return g


def frozen(d: dict) -> dict:
    return {n: set(v) for n, v in d.items()}


# ---------------------------------------------------------------- build_graph's attributes

SEED = """\
pipeline p {
    model = "smollm2-135m-instruct"
    threads = 2
    stage request : requests      {}
    stage batch   : dynamic_batch {}
    stage encode  : encode        {}
    stage kv      : kv_lookup     {}
    stage gen     : generate      {}
    stage out     : respond       {}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}
"""


def test_seed_graph_has_name_settings_position_and_given_settings_and_where_they_are_set():
    g = graph(SEED)
    assert g.graph == {
        "name": "p",
        "base": None,
        "settings": {"model": "smollm2-135m-instruct", "mode": "balanced", "device": "auto", "threads": 2,
                     "dtype": "auto", "kv_budget": None},
        "pos": SourcePos("t.agp", 1, 10, 1, 11),
        "given_settings": ["model", "threads"],
        "setting_pos": {"model": SourcePos("t.agp", 2, 13, 2, 36), "threads": SourcePos("t.agp", 3, 15, 3, 16)},
    }


def test_seed_graph_edges_merge_the_batchers_two_labels_into_one_edge_without_a_single_condition():
    g = graph(SEED)
    assert dict(g.edges["batch", "encode"]) == {
        "condition": None, "conditions": [("label", "full"), ("label", "timeout")],
        "pos": SourcePos("t.agp", 11, 5, 11, 20)}
    assert dict(g.edges["request", "batch"]) == {
        "condition": None, "conditions": [None], "pos": SourcePos("t.agp", 10, 5, 10, 21)}
    assert g.nodes["batch"]["routes"] == [("encode", ("label", "full")), ("encode", ("label", "timeout"))]


def test_one_conditional_edge_keeps_its_condition():
    g = graph("""\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage request : requests {}
            stage r : route {}
            stage batch : dynamic_batch {}
            stage encode : encode {}
            stage kv : kv_lookup {}
            stage gen : generate {}
            stage out : respond {}
            request -> r
            r -> batch when prompt_tokens > 100
            r -> gen otherwise
            batch -> encode -> kv -> gen -> out
        }
        """)
    assert dict(g.edges["r", "batch"]) == {
        "condition": ("cmp", "prompt_tokens", ">", 100), "conditions": [("cmp", "prompt_tokens", ">", 100)],
        "pos": SourcePos("t.agp", 11, 5, 11, 15)}
    assert g.edges["r", "gen"]["condition"] == ("otherwise",)


def test_a_repeated_conditional_edge_of_a_resolved_pipeline_merges_into_one_with_that_condition():
    prog, _ = load(SEED)
    r, _ = check_pipeline(prog.pipelines[0])
    full = next(e for e in r.edges if e.condition == ("label", "full"))
    timeout = next(e for e in r.edges if e.condition == ("label", "timeout"))
    edges = tuple(e for e in r.edges if e.src != "batch") + (full, full)
    g = build_graph(dataclasses.replace(r, edges=edges))
    assert g.edges["batch", "encode"]["condition"] == ("label", "full")
    assert g.edges["batch", "encode"]["conditions"] == [("label", "full")]
    edges = tuple(e for e in r.edges if e.src != "batch") + (full, full, timeout)
    g = build_graph(dataclasses.replace(r, edges=edges))
    assert g.edges["batch", "encode"]["condition"] is None
    assert g.edges["batch", "encode"]["conditions"] == [("label", "full"), ("label", "timeout")]


def _registry_with(*kinds: StageKind) -> Registry:
    return Registry(builtin.BUILTIN_KINDS + kinds, load_entry_points=False)


SHOUT = StageKind(name="shout", doc="upper-cases the answer", inputs=(Port("generated", "Generated"),),
                  outputs=(Port("generated", "Generated"),), resource="host", impl="stages.impl:Route")


def test_build_graph_of_an_ast_pipeline_looks_kinds_up_in_the_given_registry():
    text = SEED.replace("stage out", "stage loud : shout {}\n    stage out").replace("gen -> out", "gen -> loud -> out")
    prog, _ = load(text)
    assert isinstance(prog.pipelines[0], ast.Pipeline)
    g = build_graph(prog.pipelines[0], _registry_with(SHOUT))
    assert (g.nodes["loud"]["kind"], g.nodes["loud"]["resource"]) == ("shout", "host")
    assert build_graph(prog.pipelines[0]).nodes["loud"]["kind"] is None    # the default registry lacks it


def test_build_graph_refuses_what_is_neither_a_pipeline_nor_resolved():
    with pytest.raises(TypeError) as e:
        build_graph({"name": "p"})
    assert str(e.value) == "build_graph takes an ast.Pipeline or a checker.Resolved, not dict"


# ---------------------------------------------------------------- the KV budget shared by kv_lookup stages

ENGINES = """\
pipeline p {
    model = "smollm2-135m-instruct"
    SETTINGS
    stage request : requests {}
    stage r : route {}
    stage b1 : dynamic_batch {}
    stage e1 : encode {}
    stage k1 : kv_lookup { K1 }
    stage g1 : generate {}
    stage b2 : dynamic_batch {}
    stage e2 : encode {}
    stage k2 : kv_lookup { K2 }
    stage g2 : generate {}
    stage out : respond {}
    request -> r
    r -> b1 when prompt_tokens > 100
    r -> b2 otherwise
    b1 -> e1 -> k1 -> g1 -> out
    b2 -> e2 -> k2 -> g2 -> out
}
"""

THIRD = """\
    stage b3 : dynamic_batch {}
    stage e3 : encode {}
    stage k3 : kv_lookup { K3 }
    stage g3 : generate {}
    stage out : respond {}
    request -> r
    r -> b3 when prompt_tokens > 1000
"""


def engines(settings="", k1="", k2="", k3=None) -> str:
    text = ENGINES.replace("SETTINGS", settings).replace("K1", k1).replace("K2", k2)
    if k3 is not None:
        text = text.replace("    stage out : respond {}\n    request -> r\n", THIRD.replace("K3", k3))
        text = text.replace("b2 -> e2 -> k2 -> g2 -> out\n",
                            "b2 -> e2 -> k2 -> g2 -> out\n    b3 -> e3 -> k3 -> g3 -> out\n")
    return text


def budgets(text: str) -> dict:
    g = graph(text)
    return {n: d["params"]["budget"] for n, d in g.nodes(data=True) if d["kind"] == "kv_lookup"}


def test_engines_pipeline_is_clean():
    assert check(engines()) == ""
    assert check(engines(k3="")) == ""


def test_one_kv_lookup_keeps_the_modes_budget():
    assert budgets(SEED) == {"kv": 256 * MIB}
    assert budgets(SEED.replace("threads = 2", "mode = efficient")) == {"kv": 64 * MIB}


def test_one_kv_lookup_takes_the_pipelines_kv_budget():
    assert budgets(SEED.replace("threads = 2", "kv_budget = 100MiB")) == {"kv": 100 * MIB}


def test_two_kv_lookups_split_the_modes_budget_of_one_engine():
    assert budgets(engines()) == {"k1": 128 * MIB, "k2": 128 * MIB}
    assert budgets(engines("mode = performance")) == {"k1": 512 * MIB, "k2": 512 * MIB}


def test_three_kv_lookups_get_whole_bytes_of_an_uneven_split():
    got = budgets(engines(k3=""))
    assert got == {"k1": (256 * MIB) // 3, "k2": (256 * MIB) // 3, "k3": (256 * MIB) // 3}
    assert all(type(v) is int for v in got.values())


def test_two_kv_lookups_split_the_pipelines_kv_budget():
    assert budgets(engines("kv_budget = 100MiB")) == {"k1": 50 * MIB, "k2": 50 * MIB}


def test_an_explicit_budget_is_kept_and_taken_off_the_rest_of_kv_budget():
    assert budgets(engines("kv_budget = 100MiB", k2="budget = 30MiB")) == {"k1": 70 * MIB, "k2": 30 * MIB}
    assert budgets(engines("kv_budget = 100MiB", k1="budget = 10MiB", k3="")) == {
        "k1": 10 * MIB, "k2": 45 * MIB, "k3": 45 * MIB}


def test_an_explicit_budget_beside_the_modes_budget_is_taken_off_it():
    assert budgets(engines(k1="budget = 56MiB")) == {"k1": 56 * MIB, "k2": 200 * MIB}


def test_every_budget_explicit_leaves_them_as_they_are():
    assert budgets(engines("kv_budget = 100MiB", k1="budget = 1MiB", k2="budget = 2MiB")) == {
        "k1": 1 * MIB, "k2": 2 * MIB}


def test_a_share_below_64kib_is_raised_to_64kib_and_one_above_is_kept():
    assert budgets(engines("kv_budget = 1MiB", k2="budget = 924KiB")) == {"k1": 100 * KIB, "k2": 924 * KIB}
    assert budgets(engines("kv_budget = 1MiB", k2="budget = 1000KiB")) == {"k1": 64 * KIB, "k2": 1000 * KIB}
    assert budgets(engines("kv_budget = 1MiB", k2="budget = 2MiB")) == {"k1": 64 * KIB, "k2": 2 * MIB}


def test_kv_budget_too_small_for_the_other_pools_is_reported_whole():
    assert check(engines("kv_budget = 1MiB", k2="budget = 1000KiB")) == textwrap.dedent("""\
        t.agp:12:37: error: the kv_lookup budgets (1000KiB) leave 24KiB of kv_budget = 1MiB for 1 other KV pool
           12 |     stage k2 : kv_lookup { budget = 1000KiB }
              |                                     ^^^^^^^
          = help: raise kv_budget or lower the budgets of the kv_lookup stages

        1 error
        """)


# ---------------------------------------------------------------- outputs()

PY, ROUTE, BATCH, RESPOND = builtin.PYTHON, builtin.ROUTE, builtin.DYNAMIC_BATCH, builtin.RESPOND
REQ, GEN = frozenset({"Request"}), frozenset({"Generated"})
BOTH = REQ | GEN


@pytest.mark.parametrize("params, received, sent", [
    ({}, REQ, REQ),                                          # no returns: the type it got
    ({"returns": None}, GEN, GEN),
    ({"returns": "same"}, BOTH, BOTH),
    ({"returns": "request"}, GEN, REQ),
    ({"returns": "generated"}, REQ, GEN),
    ({"returns": "any"}, REQ, BOTH),
    ({"returns": "request", "max_turns": 3}, REQ, REQ),      # past its bound an item leaves as it came
    ({"returns": "request", "max_turns": 3}, GEN, BOTH),
    ({"returns": "generated", "max_turns": 3}, REQ, BOTH),
    ({"returns": "generated", "max_turns": None}, REQ, GEN),
    ({"returns": "same", "max_turns": 2}, frozenset({"Batch"}), frozenset()),
])
def test_outputs_of_a_python_stage(params, received, sent):
    assert outputs(PY, params, received) == sent


def test_outputs_of_other_kinds():
    assert outputs(None, {}, BOTH) == frozenset()
    assert outputs(ROUTE, {}, REQ | frozenset({"Batch"})) == REQ
    assert outputs(BATCH, {}, frozenset()) == frozenset({"Batch"})
    assert outputs(RESPOND, {}, GEN) == frozenset()


# ---------------------------------------------------------------- flow_types()

def test_a_route_carries_only_what_its_successors_carry_however_the_stages_are_ordered():
    # r1 is looked at before r2 shrinks to Generated: it must be looked at again
    g = hand_graph({"r1": ("route", {}), "r2": ("route", {}), "out": ("respond", {})},
                   [("r1", "r2"), ("r2", "out")])
    carry, receives = flow_types(g)
    assert frozen(carry) == {"r1": {"Generated"}, "r2": {"Generated"}, "out": {"Generated"}}
    assert frozen(receives) == {"r1": set(), "r2": set(), "out": set()}


def test_a_long_route_chain_shrinks_back_to_its_start():
    names = [f"r{i}" for i in range(6)]
    g = hand_graph({**{n: ("route", {}) for n in names}, "out": ("respond", {})},
                   list(zip(names, names[1:] + ["out"])))
    carry, _ = flow_types(g)
    assert all(carry[n] == GEN for n in names)


def test_engine_stages_carry_only_what_their_successors_take():
    g = hand_graph({"request": ("requests", {}), "b": ("dynamic_batch", {}), "e": ("encode", {}),
                    "k": ("kv_lookup", {}), "gen": ("generate", {}),
                    "b2": ("dynamic_batch", {}), "e2": ("encode", {}), "k2": ("kv_lookup", {}),
                    "gen2": ("generate", {})},
                   [("request", "b"), ("b", "e"), ("e", "k"), ("k", "gen"), ("request", "b2"), ("e2", "k2"),
                    ("k2", "gen2")])
    carry, receives = flow_types(g)
    assert frozen(carry) == {"request": set(), "b": set(), "e": set(), "k": set(), "gen": set(),
                             "b2": set(), "e2": set(), "k2": set(), "gen2": set()}
    assert frozen(receives) == {n: set() for n in g}


def test_the_seed_chain_carries_and_receives_each_type_in_turn():
    carry, receives = flow_types(graph(SEED))
    assert frozen(carry) == {"request": set(), "batch": {"Request"}, "encode": {"Batch"}, "kv": {"Tokens"},
                             "gen": {"CachedTokens"}, "out": {"Generated"}}
    assert frozen(receives) == {"request": set(), "batch": {"Request"}, "encode": {"Batch"}, "kv": {"Tokens"},
                                "gen": {"CachedTokens"}, "out": {"Generated"}}


def test_a_sink_keeps_every_type_it_accepts():
    # a kind without outputs ends a pipeline: what it would pass on does not matter
    sink = StageKind(name="drain", doc="takes anything", inputs=(Port("items", "Request|Generated"),),
                     passthrough=True)
    g = hand_graph({"d": ("drain", {})}, [])
    carry, _ = flow_types(g, _registry_with(sink))
    assert carry["d"] == BOTH


def test_a_kind_registered_under_an_engine_name_must_send_on_all_it_emits():
    # the engine kinds are checked by name: every type they send (not only items) must go on
    odd = StageKind(name="generate", doc="a passthrough generate", inputs=(Port("x", "Request|Tokens"),),
                    outputs=(Port("x", "Request|Tokens"),), passthrough=True)
    take = StageKind(name="take", doc="takes requests", inputs=(Port("r", "Request"),))
    reg = Registry([builtin.REQUESTS, odd, take], load_entry_points=False)
    g = hand_graph({"src": ("requests", {}), "gen": ("generate", {}), "t": ("take", {})},
                   [("src", "gen"), ("gen", "t")])
    carry, receives = flow_types(g, reg)
    assert frozen(carry) == {"src": set(), "gen": {"Request"}, "t": {"Request"}}
    assert frozen(receives) == {"src": set(), "gen": {"Request"}, "t": {"Request"}}


def test_a_python_stage_carries_by_what_it_returns():
    nodes = {"src": ("requests", {}), "py": ("python", {"fn": "m:f", "returns": "generated"}),
             "out": ("respond", {})}
    carry, receives = flow_types(hand_graph(nodes, [("src", "py"), ("py", "out")]))
    assert frozen(carry) == {"src": set(), "py": {"Request", "Generated"}, "out": {"Generated"}}
    assert frozen(receives) == {"src": set(), "py": {"Request"}, "out": {"Generated"}}


def test_a_python_stage_without_params_returns_the_same_type():
    nodes = {"src": ("requests", {}), "py": ("python", None), "out": ("respond", {})}
    carry, receives = flow_types(hand_graph(nodes, [("src", "py"), ("py", "out")]))
    assert frozen(carry) == {"src": set(), "py": {"Generated"}, "out": {"Generated"}}
    assert frozen(receives) == {"src": set(), "py": set(), "out": set()}


def test_receives_reach_a_stage_defined_before_the_one_that_feeds_it():
    nodes = {"src": ("requests", {}), "late": ("route", {}), "early": ("route", {}),
             "py": ("python", {"returns": "generated"}), "out": ("respond", {})}
    g = hand_graph(nodes, [("src", "early"), ("early", "late"), ("late", "py"), ("py", "out")])
    _, receives = flow_types(g)
    assert frozen(receives) == {"src": set(), "early": {"Request"}, "late": {"Request"}, "py": {"Request"},
                                "out": {"Generated"}}


def test_a_route_sends_on_only_what_reached_it():
    nodes = {"src": ("requests", {}), "r": ("route", {}), "py": ("python", {"returns": "any"}),
             "out": ("respond", {})}
    g = hand_graph(nodes, [("src", "r"), ("r", "py"), ("py", "out"), ("py", "r")])
    carry, receives = flow_types(g)
    assert frozen(receives) == {"src": set(), "r": {"Request", "Generated"}, "py": {"Request", "Generated"},
                                "out": {"Generated"}}
    nodes["py"] = ("python", {"returns": "generated"})
    g = hand_graph(nodes, [("src", "r"), ("r", "py"), ("py", "out")])
    carry, receives = flow_types(g)
    assert frozen(receives) == {"src": set(), "r": {"Request"}, "py": {"Request"}, "out": {"Generated"}}


def test_a_source_sends_what_it_emits_even_when_its_kind_passes_items_through():
    src = StageKind(name="feed", doc="a source", outputs=(Port("r", "Request"),), passthrough=True)
    nodes = {"src": ("feed", {}), "r": ("route", {}), "py": ("python", {"returns": "generated"}),
             "out": ("respond", {})}
    g = hand_graph(nodes, [("src", "r"), ("r", "py"), ("py", "out")])
    _, receives = flow_types(g, _registry_with(src))
    assert frozen(receives) == {"src": set(), "r": {"Request"}, "py": {"Request"}, "out": {"Generated"}}


def test_a_stage_of_unknown_kind_stops_nothing_after_it():
    nodes = {"odd": ("nosuchkind", {}), "src": ("requests", {}), "r": ("route", {}),
             "py": ("python", {"returns": "generated"}), "out": ("respond", {}), "none": (None, {})}
    g = hand_graph(nodes, [("src", "r"), ("r", "py"), ("py", "out"), ("odd", "out"), ("none", "r")])
    carry, receives = flow_types(g)
    assert frozen(receives) == {"odd": set(), "src": set(), "r": {"Request"}, "py": {"Request"},
                                "out": {"Generated"}, "none": set()}
    assert carry["odd"] == frozenset() and carry["none"] == frozenset()


def test_two_items_types_reaching_one_stage_from_two_stages_are_both_received():
    nodes = {"src": ("requests", {}), "a": ("python", {"returns": "generated"}), "b": ("route", {}),
             "r": ("route", {}), "py": ("python", {"returns": "generated"}), "out": ("respond", {})}
    g = hand_graph(nodes, [("src", "a"), ("src", "b"), ("a", "r"), ("b", "r"), ("r", "py"), ("py", "out")])
    _, receives = flow_types(g)
    assert receives["r"] == BOTH and receives["py"] == BOTH


# ---------------------------------------------------------------- item_types()

def test_item_types_of_each_stage_of_the_seed():
    prog, _ = load(SEED)
    r, _ = check_pipeline(prog.pipelines[0])
    assert frozen(item_types(r, build_graph(r))) == {
        "request": {"Request"}, "batch": {"Batch"}, "encode": {"Tokens"}, "kv": {"CachedTokens"},
        "gen": {"Generated"}, "out": set()}


def test_item_types_of_a_source_are_what_it_emits_whatever_its_kind_passes_through():
    feed = StageKind(name="feed", doc="a source", outputs=(Port("r", "Request"),), passthrough=True)
    prog, _ = load(SEED.replace(": requests ", ": feed     ").replace("stage kv ", "stage odd : nosuchkind {}\n"
                                                                          "    stage kv "))
    r, _ = check_pipeline(prog.pipelines[0], _registry_with(feed))
    got = item_types(r, build_graph(r))
    assert (got["request"], got["odd"]) == (REQ, frozenset())


# ---------------------------------------------------------------- whole `agp check` outputs

CHAIN = """\
pipeline p {
    model = "smollm2-135m-instruct"
    stage request : requests {}
    stage batch : dynamic_batch {}
    stage encode : encode {}
    stage kv : kv_lookup {}
    stage gen : generate {}
    stage out : respond {}
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen
"""


def chain(body: str) -> str:
    """The seed's chain (request, batch -> encode -> kv -> gen, out) and `body` (from line 12)."""
    return CHAIN + textwrap.indent(textwrap.dedent(body), "    ") + "}\n"


def expect(text: str) -> str:
    return textwrap.dedent(text)


def test_unbounded_cycles_beside_a_bounded_loop_are_each_printed_from_their_first_stage():
    # a's DFS meets b's cycle first: the cycle printed is the one through a
    assert check(chain("""\
        stage a : route {}
        stage x : route {}
        stage b : route {}
        stage c : route {}
        stage tool : python { fn = "json:loads"  max_turns = 3  returns = any }
        request -> a
        a -> b
        a -> x
        x -> a
        b -> c
        c -> b
        c -> batch
        gen -> tool
        tool -> batch
        tool -> out
        """)) == expect("""\
        t.agp:20:5: error: cycle: a -> x -> a
           20 |     x -> a
              |     ^^^^^^
          = expected: requests flow one way, from the source to respond; a loop must pass through a python stage that bounds it with max_turns
          = note: edge a -> x (t.agp:19:5)
          = help: remove the edge x -> a, or bound the loop (a python stage with max_turns = N on it)

        t.agp:22:5: error: cycle: b -> c -> b
           22 |     c -> b
              |     ^^^^^^
          = expected: requests flow one way, from the source to respond; a loop must pass through a python stage that bounds it with max_turns
          = note: edge b -> c (t.agp:21:5)
          = help: remove the edge c -> b, or bound the loop (a python stage with max_turns = N on it)

        2 errors
        """)


def test_a_join_looping_on_itself_is_a_cycle_and_a_join_inside_a_loop():
    assert check(chain("""\
        stage j : join {}
        stage p : python { fn = "json:loads"  max_turns = 2  returns = generated }
        request -> batch
        gen -> j
        j -> j
        j -> p
        p -> p
        p -> out
        """)) == expect("""\
        t.agp:12:11: error: join 'j' is inside a loop
           12 |     stage j : join {}
              |           ^
          = help: join the branches before or after the loop

        t.agp:16:5: error: cycle: j -> j
           16 |     j -> j
              |     ^^^^^^
          = expected: requests flow one way, from the source to respond; a loop must pass through a python stage that bounds it with max_turns
          = help: remove the edge j -> j, or bound the loop (a python stage with max_turns = N on it)

        2 errors
        """)


def test_a_bounding_stage_looping_only_on_itself_has_no_way_out():
    assert check(chain("""\
        stage p : python { fn = "json:loads"  max_turns = 2  returns = any }
        request -> batch
        gen -> p
        p -> p
        gen -> out
        """)) == expect("""\
        t.agp:12:11: error: stage 'p' bounds a loop (max_turns = 2) but has no edge out of it
           12 |     stage p : python { fn = "json:loads"  max_turns = 2  returns = any }
              |           ^
          = expected: an edge from the bounding stage to a stage outside the loop
          = help: add an edge from 'p' towards a respond stage: items take it once the loop has run max_turns times

        1 error
        """)


def test_an_edge_out_of_respond_does_not_stop_the_checks_of_the_edges_after_it():
    assert check(chain("""\
        stage out2 : respond {}
        out -> out2
        request -> encode
        request -> batch
        gen -> out
        """)) == expect("""\
        t.agp:13:5: error: stage 'out' (respond) has no output: no edge can leave it
           13 |     out -> out2
              |     ^^^^^^^^^^^
          = help: respond ends a pipeline; remove the edge out -> out2

        t.agp:14:5: error: port type mismatch on edge request -> encode: 'request' (requests) gives Request, 'encode' (encode) takes Batch
           14 |     request -> encode
              |     ^^^^^^^^^^^^^^^^^
          = expected: an edge into a stage that takes Request
          = help: route the edge through 'batch' (dynamic_batch), which the pipeline already has: request -> batch -> encode

        2 errors
        """)


def test_a_python_stage_that_returns_requests_cannot_feed_respond():
    # gen's results stop at p -> out, which is the error: gen -> p is no fault of gen's (no second error)
    assert check(chain("""\
        stage p : python { fn = "json:loads"  returns = request }
        request -> batch
        gen -> p
        p -> out
        """)) == expect("""\
        t.agp:15:5: error: port type mismatch on edge p -> out: 'p' (python) gives Request, 'out' (respond) takes Generated
           15 |     p -> out
              |     ^^^^^^^^
          = expected: an edge into a stage that takes Request
          = help: route the edge through the stages the pipeline already has: p -> batch -> encode -> kv -> gen -> out

        1 error
        """)


def test_a_stage_whose_items_stop_at_a_mismatched_edge_further_on_is_not_told_to_add_an_edge():
    """system_prompt -> batch is the edge its Requests need; they stop at kv -> r, a port type
    mismatch said at that edge. 'sys' was told, besides, that none of its out-edges leads to a stage
    that takes Requests (and to add one): a consequence of the mismatch, whose advice was wrong."""
    text = CHAIN.replace("stage out : respond {}", "stage out : respond {}\n"
                         '    stage sys : system_prompt { text = "Be brief." }\n    stage r : route {}') \
        .replace("encode -> kv -> gen\n", "encode -> kv -> r -> gen -> out\n    request -> sys -> batch\n}\n")
    out = check(text)
    assert "port type mismatch on edge kv -> r" in out and "port type mismatch on edge r -> gen" in out
    assert "stage 'sys'" not in out and out.endswith("2 errors\n")


def test_a_pipeline_without_a_request_source_names_the_source_kinds():
    text = """\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage r : route {}
            stage out : respond {}
            r -> out
        }
        """
    assert check(text) == expect("""\
        t.agp:1:10: error: pipeline 'p' has no request source
            1 | pipeline p {
              |          ^
          = expected: a stage of kind requests, e.g. stage request : requests {}
          = help: add a request source and an edge from it to the first stage

        1 error
        """)
    feed = StageKind(name="feed", doc="another source", outputs=(Port("r", "Request"),))
    prog, _ = load(text)
    (d,) = check_program(prog, _registry_with(feed))
    assert d.expected == "a stage of kind feed or requests, e.g. stage request : requests {}"


def test_a_pipeline_without_a_respond_stage():
    assert check("""\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage request : requests {}
            stage r : route {}
            stage s : system_prompt { text = "hi" }
            request -> r -> s
        }
        """) == expect("""\
        t.agp:1:10: error: pipeline 'p' has no respond stage
            1 | pipeline p {
              |          ^
          = expected: a stage of kind respond, e.g. stage out : respond {}
          = help: add a respond stage and an edge into it

        1 error
        """)


def test_an_unreachable_stage_names_every_request_source():
    assert check(chain("""\
        stage request2 : requests {}
        stage lost : route {}
        request -> batch
        request2 -> batch
        gen -> out
        lost -> out
        """)) == expect("""\
        t.agp:12:11: error: pipeline 'p' has a second request source 'request2'
           12 |     stage request2 : requests {}
              |           ^^^^^^^^
          = expected: one request source per pipeline
          = note: the first is 'request' (t.agp:3:11)
          = help: remove 'request2' or route from 'request' instead

        t.agp:13:11: error: stage 'lost' is unreachable: no path from 'request' or 'request2' leads to it
           13 |     stage lost : route {}
              |           ^^^^
          = help: add an edge into 'lost', or remove the stage

        2 errors
        """)


def test_an_unreachable_stage_behind_an_unknown_kind_names_a_request_source():
    assert check("""\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage x : mystery {}
            stage r : route {}
            stage lost : route {}
            stage out : respond {}
            x -> r -> out
            lost -> lost
        }
        """) == expect("""\
        t.agp:3:15: error: unknown stage kind 'mystery'
            3 |     stage x : mystery {}
              |               ^^^^^^^
          = expected: a stage kind: dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt

        t.agp:5:11: error: stage 'lost' is unreachable: no path from a request source leads to it
            5 |     stage lost : route {}
              |           ^^^^
          = help: add an edge into 'lost', or remove the stage

        t.agp:5:11: error: the loop lost -> lost has no path to a respond stage
            5 |     stage lost : route {}
              |           ^^^^
          = help: add an edge from 'lost' towards a respond stage, or remove it

        t.agp:8:5: error: cycle: lost -> lost
            8 |     lost -> lost
              |     ^^^^^^^^^^^^
          = expected: requests flow one way, from the source to respond; a loop must pass through a python stage that bounds it with max_turns
          = help: remove the edge lost -> lost, or bound the loop (a python stage with max_turns = N on it)

        4 errors
        """)


def test_an_unreachable_stage_of_unknown_kind_in_a_loop():
    assert check(SEED.replace("stage out ", "stage x : mystery {}\n    stage y : route {}\n    stage out ")
                 .replace("encode -> kv -> gen -> out\n", "encode -> kv -> gen -> out\n    x -> y\n    y -> x\n")) \
        == expect("""\
        t.agp:9:11: error: stage 'x' is unreachable: no path from 'request' leads to it
            9 |     stage x : mystery {}
              |           ^
          = note: the stage after it is unreachable too: 'y'
          = help: add an edge into 'x', or remove the stage

        t.agp:9:15: error: unknown stage kind 'mystery'
            9 |     stage x : mystery {}
              |               ^^^^^^^
          = expected: a stage kind: dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt

        t.agp:17:5: error: cycle: x -> y -> x
           17 |     y -> x
              |     ^^^^^^
          = expected: requests flow one way, from the source to respond; a loop must pass through a python stage that bounds it with max_turns
          = note: edge x -> y (t.agp:16:5)
          = help: remove the edge y -> x, or bound the loop (a python stage with max_turns = N on it)

        3 errors
        """)


def test_a_kind_of_the_given_registry_carries_items_on():
    text = SEED.replace("stage out", "stage loud : shout {}\n    stage out").replace("gen -> out", "gen -> loud -> out")
    prog, _ = load(text)
    assert check_program(prog, _registry_with(SHOUT)) == []


# ---------------------------------------------------------------- kv_budget against the explicit budgets

def kv_check(settings="", k1="", k2="", k3=None) -> str:
    return check(engines(settings, k1, k2, k3))


def test_explicit_budgets_that_fill_kv_budget_exactly_are_fine():
    assert kv_check("kv_budget = 100MiB", k1="budget = 60MiB", k2="budget = 40MiB") == ""


def test_explicit_budgets_that_leave_exactly_64kib_for_the_other_pool_are_fine():
    # (a 64KiB pool holds one block of the embedded model only at block_size 1: 45KiB in fp32)
    assert kv_check("kv_budget = 1MiB", k1="block_size = 1", k2="budget = 960KiB") == ""
    assert kv_check("kv_budget = 1MiB", k1="block_size = 1", k2="budget = 896KiB", k3="block_size = 1") == ""


def test_explicit_budgets_over_kv_budget_leave_nothing():
    assert kv_check("kv_budget = 1MiB", k1="budget = 1MiB", k2="budget = 2MiB") == expect("""\
        t.agp:12:37: error: the kv_lookup budgets (3MiB) leave nothing of kv_budget = 1MiB
           12 |     stage k2 : kv_lookup { budget = 2MiB }
              |                                     ^^^^
          = help: raise kv_budget or lower the budgets of the kv_lookup stages

        1 error
        """)


def test_an_explicit_budget_equal_to_kv_budget_leaves_nothing_for_the_other_pools():
    assert kv_check("kv_budget = 1MiB", k1="budget = 1MiB", k3="") == expect("""\
        t.agp:8:37: error: the kv_lookup budgets (1MiB) leave nothing of kv_budget = 1MiB for 2 other KV pools
            8 |     stage k1 : kv_lookup { budget = 1MiB }
              |                                     ^^^^
          = help: raise kv_budget or lower the budgets of the kv_lookup stages

        1 error
        """)


def test_kv_budget_too_small_for_pools_without_explicit_budgets_is_reported_at_the_first():
    assert kv_check("kv_budget = 100KiB") == expect("""\
        t.agp:8:11: error: the kv_lookup budgets (0B) leave 100KiB of kv_budget = 100KiB for 2 other KV pools
            8 |     stage k1 : kv_lookup {  }
              |           ^^
          = help: raise kv_budget or lower the budgets of the kv_lookup stages

        1 error
        """)


def test_a_kv_budget_out_of_range_is_reported_once():
    assert kv_check("kv_budget = 1KiB", k1="budget = 1MiB") == expect("""\
        t.agp:3:17: error: value out of range: setting 'kv_budget' = 1KiB
            3 |     kv_budget = 1KiB
              |                 ^^^^
          = expected: a size with a unit (B, KiB, MiB, GiB) from 64KiB to 1024GiB, e.g. 256MiB
          = help: the smallest allowed value is 64KiB

        1 error
        """)


def test_a_budget_parameter_of_another_kind_is_not_a_kv_pool():
    from stages.registry import SIZE, Param
    quota = StageKind(name="quota", doc="a budget of another kind", params=(Param("budget", SIZE, 1 << 20),),
                      inputs=(Port("generated", "Generated"),), outputs=(Port("generated", "Generated"),))
    text = engines("kv_budget = 100MiB").replace("stage out ", "stage q : quota {}\n    stage out ") \
        .replace("g1 -> out", "g1 -> q -> out")
    g = graph(text, _registry_with(quota))
    assert g.nodes["q"]["params"]["budget"] == 1 << 20
    assert g.nodes["k1"]["params"]["budget"] == 50 * MIB


# ---------------------------------------------------------------- hints of port mismatches

GUARD = """\
    stage q : python { fn = "json:loads"%s }
    request -> q
    q -> batch
    q -> out
    gen -> out
    """


def test_a_python_stage_given_requests_into_respond_is_told_to_say_returns_any():
    """A guard (`request -> q`, `q -> batch`, `q -> out`) that answers some requests and passes the
    rest on to the batcher was told to say returns = generated: that types `q -> batch` as Generated
    into the batcher, an error of its own. Its other edge takes what it gives, so it gives both: any."""
    assert check(chain(GUARD % "")) == expect("""\
        t.agp:15:5: error: port type mismatch on edge q -> out: 'q' (python) gives Request, 'out' (respond) takes Generated
           15 |     q -> out
              |     ^^^^^^^^
          = expected: an edge into a stage that takes Request
          = help: if 'q' turns some of its items into Generated and passes the rest on to 'batch', say so: returns = any

        1 error
        """)
    assert check(chain(GUARD % "  returns = any")) == ""
    assert "port type mismatch on edge q -> batch" in check(chain(GUARD % "  returns = generated"))


def test_a_python_stage_that_says_returns_same_gets_no_returns_hint():
    assert check(chain("""\
        stage q : python { fn = "json:loads"  returns = same }
        request -> q
        q -> batch
        q -> out
        gen -> out
        """)) == expect("""\
        t.agp:15:5: error: port type mismatch on edge q -> out: 'q' (python) gives Request, 'out' (respond) takes Generated
           15 |     q -> out
              |     ^^^^^^^^
          = expected: an edge into a stage that takes Request
          = help: route the edge through the stages the pipeline already has: q -> batch -> encode -> kv -> gen -> out

        1 error
        """)


def test_an_edge_into_a_route_that_can_carry_none_of_its_items_on_is_an_error():
    """gen -> judge -> r -> b2: r takes the Generated results, but its only way on is a batcher,
    so `judge -> r when bad` is never taken (each result falls to `otherwise`). It was accepted
    in silence, while gen -> judge -> b2 and gen -> r -> b2 are port errors."""
    assert check(chain("""\
        stage judge : python { fn = "json:loads" }
        stage r : route {}
        stage b2 : dynamic_batch {}
        stage e2 : encode {}
        stage k2 : kv_lookup {}
        stage g2 : generate {}
        request -> batch
        gen -> judge
        judge -> r when bad
        judge -> out otherwise
        r -> b2 -> e2 -> k2 -> g2 -> out
        """)) == expect("""\
        t.agp:20:5: error: edge judge -> r never carries an item: 'judge' (python) gives Generated, and 'r' (route) leads only Request items on to a respond stage
           20 |     judge -> r when bad
              |     ^^^^^^^^^^
          = expected: an edge into a stage that carries Generated on
          = help: if 'judge' turns its items into Request, say so: returns = request (or any); else remove the edge, or give 'r' an edge towards a respond stage that takes Generated

        1 error
        """)


def test_a_python_stage_given_results_into_the_batcher_and_respond_is_told_to_say_returns_any():
    assert check(chain("""\
        stage q : python { fn = "json:loads"  max_turns = 2 }
        request -> batch
        gen -> q
        q -> out
        q -> batch
        """)) == expect("""\
        t.agp:16:5: error: port type mismatch on edge q -> batch: 'q' (python) gives Generated, 'batch' (dynamic_batch) takes Request
           16 |     q -> batch
              |     ^^^^^^^^^^
          = expected: an edge into a stage that takes Generated
          = help: if 'q' turns some of its items into Request and passes the rest on to 'out', say so: returns = any

        1 error
        """)
    assert check(chain("""\
        stage q : python { fn = "json:loads"  max_turns = 2  returns = any }
        request -> batch
        gen -> q
        q -> out
        q -> batch
        """)) == ""


def test_results_that_reach_a_python_stage_making_requests_of_them_are_told_to_say_returns_request():
    """gen -> merge -> again -> b2 (SGLang's fork, join, then a second gen): `again` makes a Request
    of the merged result but leaves `returns` out. The errors stand at gen and merge, whose results
    have nowhere to go, and told them to add an edge; they name the stage to fix."""
    assert check(chain("""\
        stage merge : join { policy = longest }
        stage again : python { fn = "json:loads" }
        stage b2 : dynamic_batch {}
        stage e2 : encode {}
        stage k2 : kv_lookup {}
        stage g2 : generate {}
        request -> batch
        gen -> merge -> again -> b2 -> e2 -> k2 -> g2 -> out
        """)) == expect("""\
        t.agp:7:11: error: stage 'gen' (generate) may send Generated items, but none of its out-edges leads to a stage that takes them
            7 |     stage gen : generate {}
              |           ^^^
          = help: if 'again' turns its items into Request, say so: returns = request (or any)

        t.agp:12:11: error: stage 'merge' (join) may send Generated items, but none of its out-edges leads to a stage that takes them
           12 |     stage merge : join { policy = longest }
              |           ^^^^^
          = help: if 'again' turns its items into Request, say so: returns = request (or any)

        2 errors
        """)


def test_a_mismatch_into_a_stage_taking_two_types_lists_both():
    assert check(chain("""\
        stage r : route {}
        request -> batch
        batch -> r
        r -> out
        gen -> out
        """)) == expect("""\
        t.agp:14:5: error: port type mismatch on edge batch -> r: 'batch' (dynamic_batch) gives Batch, 'r' (route) takes Generated | Request
           14 |     batch -> r
              |     ^^^^^^^^^^
          = expected: an edge into a stage that takes Batch

        1 error
        """)


def test_the_insert_hint_never_suggests_a_python_stage():
    # even a registry whose python kind would turn Generated into a Batch
    py = StageKind(name="python", doc="a python kind of one output type", inputs=(Port("g", "Generated"),),
                   outputs=(Port("b", "Batch"),), impl="stages.impl:Python")
    reg = Registry([k for k in builtin.BUILTIN_KINDS if k.name != "python"] + [py], load_entry_points=False)
    prog, _ = load(chain("""\
        request -> batch
        gen -> out
        gen -> encode
        """))
    (d,) = [d for d in check_program(prog, reg) if "mismatch" in d.message]
    assert (d.message, d.hint) == ("port type mismatch on edge gen -> encode: 'gen' (generate) gives Generated, "
                                   "'encode' (encode) takes Batch", None)


def test_an_edge_to_a_stage_of_unknown_kind_does_not_stop_the_checks_of_the_edges_after_it():
    assert check(chain("""\
        stage x : mystery {}
        request -> x
        x -> out
        request -> encode
        request -> batch
        gen -> out
        """)) == expect("""\
        t.agp:12:15: error: unknown stage kind 'mystery'
           12 |     stage x : mystery {}
              |               ^^^^^^^
          = expected: a stage kind: dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt

        t.agp:15:5: error: port type mismatch on edge request -> encode: 'request' (requests) gives Request, 'encode' (encode) takes Batch
           15 |     request -> encode
              |     ^^^^^^^^^^^^^^^^^
          = expected: an edge into a stage that takes Request
          = help: route the edge through 'batch' (dynamic_batch), which the pipeline already has: request -> batch -> encode

        2 errors
        """)


def test_may_send_hints_name_the_returns_to_say_only_for_returns_any():
    assert check(chain("""\
        stage q : python { fn = "json:loads"  returns = generated  max_turns = 2 }
        stage q2 : python { fn = "json:loads"  returns = any }
        stage q3 : python { fn = "json:loads"  returns = any }
        request -> q
        request -> q2
        request -> q3
        q -> batch
        q2 -> out
        q3 -> batch
        gen -> out
        """)) == expect("""\
        t.agp:12:11: error: stage 'q' (python) may send Generated items, but none of its out-edges leads to a stage that takes them
           12 |     stage q : python { fn = "json:loads"  returns = generated  max_turns = 2 }
              |           ^
          = help: add an edge from 'q' towards a stage that takes Generated items

        t.agp:12:76: warning: 'max_turns' only applies to a stage in a loop; stage 'q' is in none
           12 |     stage q : python { fn = "json:loads"  returns = generated  max_turns = 2 }
              |                                                                            ^
          = expected: an edge back from a later stage to one before it, through 'q' (it would run at most max_turns times per request)
          = help: remove max_turns, or add the edge that closes the loop

        t.agp:13:11: error: stage 'q2' (python) may send Request items, but none of its out-edges leads to a stage that takes them
           13 |     stage q2 : python { fn = "json:loads"  returns = any }
              |           ^^
          = help: if 'q2' never returns a Request, say returns = generated

        t.agp:14:11: error: stage 'q3' (python) may send Generated items, but none of its out-edges leads to a stage that takes them
           14 |     stage q3 : python { fn = "json:loads"  returns = any }
              |           ^^
          = help: if 'q3' never returns a Generated, say returns = request

        3 errors, 1 warning
        """)


# ---------------------------------------------------------------- conditions on edges

def test_route_checks_go_on_past_unknown_kinds_and_covered_batchers_and_a_plain_edge_is_a_way_out():
    assert check(chain("""\
        stage x : mystery {}
        stage r : route {}
        stage r2 : route {}
        stage a : route {}
        x -> out
        request -> r
        r -> batch when prompt_tokens > 10
        r -> a
        a -> batch
        request -> r2
        r2 -> batch when prompt_tokens > 10
        gen -> out
        """)) == expect("""\
        t.agp:12:15: error: unknown stage kind 'mystery'
           12 |     stage x : mystery {}
              |               ^^^^^^^
          = expected: a stage kind: dynamic_batch, encode, generate, join, kv_lookup, python, requests, respond, route, system_prompt

        t.agp:19:5: warning: edge r -> a has no condition beside the conditional edge r -> batch when prompt_tokens > 10: every item goes to 'a', and one the condition holds for goes to 'batch' as well (a fan-out: two branches of one request, two answers)
           19 |     r -> a
              |     ^^^^^^
          = note: r -> batch is here (t.agp:18:5)
          = help: write `r -> a otherwise` if 'a' is for the items no condition takes; for a copy on purpose, merge the branches in a join

        t.agp:22:5: error: an item of 'r2' that matches none of its conditions has nowhere to go (no unconditional edge and no `otherwise`)
           22 |     r2 -> batch when prompt_tokens > 10
              |     ^^^^^^^^^^^
          = help: add `r2 -> batch otherwise` (or to another stage)

        2 errors, 1 warning
        """)


KV_GEN2 = """\
    stage gen2 : generate {}
    request -> batch
    gen -> out
    kv -> gen2 when finish_reason == "stop"
    gen2 -> out
"""


def test_a_condition_on_a_kv_lookup_edge_reads_the_request():
    text = chain(KV_GEN2)
    assert 'field \'finish_reason\' is only known after generate' in check(text)
    # even when a registry's kv_lookup would also give Generated items
    kv = dataclasses.replace(builtin.KV_LOOKUP, outputs=(Port("cached", "CachedTokens|Generated"),))
    reg = Registry([k for k in builtin.BUILTIN_KINDS if k.name != "kv_lookup"] + [kv], load_entry_points=False)
    prog, _ = load(text)
    assert [d.message for d in check_program(prog, reg) if "finish_reason" in d.message] == [
        "field 'finish_reason' is only known after generate"]


# ---------------------------------------------------------------- bugs these tests found (fixed)

def test_a_route_after_a_kind_of_the_given_registry_may_read_generated_fields():
    prog, _ = load(chain("""\
        stage loud : shout {}
        stage r : route {}
        stage out2 : respond {}
        request -> batch
        gen -> loud -> r
        r -> out when finish_reason == "stop"
        r -> out2 otherwise
        """))
    assert check_program(prog, _registry_with(SHOUT)) == []


def test_a_request_source_whose_requests_can_reach_no_end_is_an_error():
    text = """\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage request : requests {}
            stage r : route {}
            stage out : respond {}
            request -> r -> out
        }
        """
    assert flow_types(graph(text))[0]["r"] == GEN        # r can carry only Generated items on
    assert "the Request items of 'request' can reach no respond stage" in check(text)


# ---------------------------------------------------------------- engine segments

def _inner(name: str, takes: str, gives: str) -> StageKind:
    return StageKind(name=name, doc=name, inputs=(Port("i", takes),), outputs=(Port("o", gives),),
                     impl="stages.impl:Route")


def test_kinds_of_a_registry_working_on_batches_or_tokens_cannot_stand_inside_an_engine_segment():
    reg = _registry_with(_inner("peek", "Batch", "Batch"), _inner("pack", "Batch", "Tokens"),
                         _inner("trim", "Tokens", "Tokens"), _inner("tap", "CachedTokens", "CachedTokens"))
    prog, _ = load("""\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage request : requests {}
            stage batch : dynamic_batch {}
            stage peek : peek {}
            stage pack : pack {}
            stage trim : trim {}
            stage kv : kv_lookup {}
            stage tap : tap {}
            stage gen : generate {}
            stage out : respond {}
            request -> batch
            batch -> peek when full
            batch -> peek when timeout
            peek -> pack -> trim -> kv -> tap -> gen -> out
        }
        """)
    assert render_all(check_program(prog, reg), prog.sources) == expect("""\
        t.agp:5:11: error: stage 'peek' (peek) works on Batch, inside an engine segment, which runs as one engine (batch -> encode -> kv_lookup -> generate)
            5 |     stage peek : peek {}
              |           ^^^^
          = expected: a kind that takes and gives Request or Generated items
          = help: put it before the batcher (on Requests) or after generate (on Generated results)

        t.agp:6:11: error: stage 'pack' (pack) works on Batch | Tokens, inside an engine segment, which runs as one engine (batch -> encode -> kv_lookup -> generate)
            6 |     stage pack : pack {}
              |           ^^^^
          = expected: a kind that takes and gives Request or Generated items
          = help: put it before the batcher (on Requests) or after generate (on Generated results)

        t.agp:7:11: error: stage 'trim' (trim) works on Tokens, inside an engine segment, which runs as one engine (batch -> encode -> kv_lookup -> generate)
            7 |     stage trim : trim {}
              |           ^^^^
          = expected: a kind that takes and gives Request or Generated items
          = help: put it before the batcher (on Requests) or after generate (on Generated results)

        t.agp:9:11: error: stage 'tap' (tap) works on CachedTokens, inside an engine segment, which runs as one engine (batch -> encode -> kv_lookup -> generate)
            9 |     stage tap : tap {}
              |           ^^^
          = expected: a kind that takes and gives Request or Generated items
          = help: put it before the batcher (on Requests) or after generate (on Generated results)

        4 errors
        """)


def test_broken_engine_segments_list_stages_in_file_order_whatever_the_order_of_the_edges():
    assert check("""\
        pipeline p {
            model = "smollm2-135m-instruct"
            stage request : requests {}
            stage route : route {}
            stage batch : dynamic_batch {}
            stage batch2 : dynamic_batch {}
            stage encode : encode {}
            stage encode2 : encode {}
            stage kv : kv_lookup {}
            stage kv2 : kv_lookup {}
            stage gen : generate { prefill_chunk = 64 }
            stage gen2 : generate { dtype = fp32  compile = true }
            stage gen3 : generate {}
            stage out : respond {}
            request -> route
            route -> batch2 when prompt_tokens > 5
            route -> batch otherwise
            batch2 -> encode
            batch -> encode
            batch -> encode2
            batch -> encode
            encode2 -> kv
            encode -> kv2
            encode -> kv
            kv2 -> gen3
            kv -> gen3 -> out
            kv -> gen2 -> out
            kv -> gen -> out
        }
        """) == expect("""\
        t.agp:5:11: error: batcher 'batch' feeds 2 encode stages ('encode', 'encode2')
            5 |     stage batch : dynamic_batch {}
              |           ^^^^^
          = expected: one encode stage after each batcher: one engine per chain
          = help: give each chain its own batcher

        t.agp:7:11: error: 2 batchers feed one encode stage 'encode' ('batch', 'batch2')
            7 |     stage encode : encode {}
              |           ^^^^^^
          = expected: one batcher before each encode stage: one engine per chain
          = help: route requests to one batcher, or give each batcher its own encode -> kv_lookup -> generate chain

        t.agp:7:11: error: encode 'encode' feeds 2 kv_lookup stages ('kv', 'kv2')
            7 |     stage encode : encode {}
              |           ^^^^^^
          = expected: one kv_lookup after each encode stage
          = help: several generate stages may share one kv_lookup

        t.agp:9:11: error: 2 encode stages feed one kv_lookup 'kv' ('encode', 'encode2')
            9 |     stage kv : kv_lookup {}
              |           ^^
          = expected: one encode stage before each kv_lookup

        t.agp:12:37: error: generate stages 'gen' and 'gen2' share kv_lookup 'kv' (one engine) but differ in dtype, compile, prefill_chunk
           12 |     stage gen2 : generate { dtype = fp32  compile = true }
              |                                     ^^^^
          = expected: dtype = auto as in 'gen'
          = help: give 'gen2' its own batch -> encode -> kv_lookup chain

        t.agp:13:11: error: 2 kv_lookup stages feed generate 'gen3' ('kv', 'kv2')
           13 |     stage gen3 : generate {}
              |           ^^^^
          = expected: one kv_lookup (one engine) before each generate stage

        t.agp:13:11: error: generate stages 'gen' and 'gen3' share kv_lookup 'kv' (one engine) but differ in prefill_chunk
           13 |     stage gen3 : generate {}
              |           ^^^^
          = expected: prefill_chunk = 64 as in 'gen'
          = help: give 'gen3' its own batch -> encode -> kv_lookup chain

        t.agp:21:5: warning: duplicate edge batch -> encode
           21 |     batch -> encode
              |     ^^^^^^^^^^^^^^^
          = note: first declared here (t.agp:19:5)

        7 errors, 1 warning
        """)


SEGMENTS = """\
pipeline p {
    model = "smollm2-135m-instruct"
    stage request : requests {}
    stage route : route {}
    stage b1 : dynamic_batch {}
    stage e1 : encode {}
    stage k1 : kv_lookup {}
    stage ga : generate { temperature = 0.5 }
    stage gb : generate {}
    stage b2 : dynamic_batch {}
    stage e2 : encode {}
    stage k2 : kv_lookup {}
    stage g2 : generate {}
    stage out : respond {}
    request -> route
    route -> b2 when prompt_tokens > 5
    route -> b1 otherwise
    b2 -> e2 -> k2 -> g2 -> out
    b1 -> e1 -> k1
    k1 -> gb when prompt_tokens > 100
    k1 -> ga otherwise
    ga -> out
    gb -> out
}
"""


def test_check_segments_lists_each_engine_with_its_generate_stages_in_file_order():
    assert check(SEGMENTS) == ""
    prog, _ = load(SEGMENTS)
    r, _ = check_pipeline(prog.pipelines[0])
    segments, diags = check_segments(r, build_graph(r))
    assert diags == []
    assert segments == [Segment("b1", "e1", "k1", ("ga", "gb")), Segment("b2", "e2", "k2", ("g2",))]
    assert [(s.name, s.stages) for s in segments] == [("ga+gb", ("b1", "e1", "k1", "ga", "gb")),
                                                      ("g2", ("b2", "e2", "k2", "g2"))]


def test_segments_of_a_graph_lists_the_generate_stages_in_the_order_the_kv_lookup_routes_to_them_once_each():
    assert segments_of(graph(SEGMENTS)) == [Segment("b1", "e1", "k1", ("gb", "ga")),
                                            Segment("b2", "e2", "k2", ("g2",))]


def test_a_batcher_edge_that_no_batch_can_take_leaves_full_and_timeout_batches_nowhere_to_go():
    assert check(SEED.replace("    batch -> encode when full\n    batch -> encode when timeout\n",
                              "    batch -> encode when full and timeout\n")) == expect("""\
        t.agp:11:5: error: full and timeout items of 'batch' have nowhere to go: no edge `when full`, no unconditional edge and no `otherwise`
           11 |     batch -> encode when full and timeout
              |     ^^^^^^^^^^^^^^^
          = help: add `batch -> encode when full` and `batch -> encode when timeout`

        1 error
        """)


def test_the_returns_hint_names_both_item_types_a_stage_takes():
    # a registry whose python kind takes Tokens gives no item into a route (which takes both types)
    py = StageKind(name="python", doc="a python kind on tokens", inputs=(Port("t", "Tokens"),),
                   outputs=(Port("t", "Tokens"),), impl="stages.impl:Python")
    reg = Registry([k for k in builtin.BUILTIN_KINDS if k.name != "python"] + [py], load_entry_points=False)
    prog, _ = load(chain("""\
        stage q : python {}
        stage r : route {}
        request -> batch
        gen -> out
        encode -> q -> r
        r -> out
        """))
    (d,) = [d for d in check_program(prog, reg) if "mismatch" in d.message]
    assert d.hint == "if 'q' turns its items into Generated or Request, say so: returns = request (or any)"


def test_a_batcher_edge_when_not_full_leaves_only_full_batches_nowhere_to_go():
    (d,) = load(SEED.replace("    batch -> encode when full\n    batch -> encode when timeout\n",
                             "    batch -> encode when not full\n"))[1]
    assert d.message.startswith("full items of 'batch' have nowhere to go")


def test_a_join_after_a_join_with_nothing_fanning_out_between_is_a_warning():
    """gen -> vote -> vote2: vote2 gets vote's one result per request and merges nothing."""
    assert check(chain("""\
        stage vote : join { policy = majority }
        stage guard : python { fn = "json:loads" }
        stage vote2 : join {}
        request -> batch
        gen -> vote -> guard -> vote2 -> out
        """)) == expect("""\
        t.agp:14:11: warning: join 'vote2' gets one item per request, so it merges nothing: what reaches it has passed join 'vote'
           14 |     stage vote2 : join {}
              |           ^^^^^
          = help: remove 'vote2', or fan out before it (several edges out of a stage, or a generate stage: its n answers)

        1 warning
        """)


@pytest.mark.parametrize("extra", ["", "stage r2 : route {}\n        r2 -> pick -> out\n"])
def test_a_join_no_request_reaches_gets_its_error_not_the_one_item_warning(extra):
    """A join left out of the graph (or after stages nothing leads to) gets no item at all: its
    not-connected or unreachable error says so, and no warning that it gets one item per request
    because no generate stage comes before it."""
    out = check(chain("""\
        stage pick : join { policy = longest }
        request -> batch
        gen -> out
        """ + extra))
    assert "error: stage 'pick'" in out or "error: stage 'r2'" in out, out
    assert "merges nothing" not in out


@pytest.mark.parametrize("edges", [["gen -> vote -> out", "gen -> log -> vote"], ["gen -> log -> vote -> out"]])
def test_a_join_after_a_fan_out_or_a_generate_stage_is_not_warned(edges):
    body = ["stage vote : join { policy = majority }", "stage log : python { fn = \"json:loads\" }",
            "request -> batch"] + edges
    assert check(chain("".join(line + "\n" for line in body))) == ""


def test_two_edges_without_a_condition_into_two_respond_stages_are_a_warning():
    """`gen -> out` beside `gen -> out2`: each respond stage gets a copy of every answer, so each
    request is answered with two identical choices (check said nothing). A condition that sends
    each item one way, or a stage between them, is no such copy."""
    twice = SEED.replace("    stage out     : respond       {}\n",
                         "    stage out     : respond       {}\n    stage out2    : respond       {}\n")
    assert check(twice.replace("encode -> kv -> gen -> out\n", "encode -> kv -> gen -> out\n    gen -> out2\n")) == \
        expect("""\
        t.agp:15:5: warning: stage 'gen' sends every item to 2 respond stages, 'out' and 'out2', along edges without a condition: each request gets every answer twice, as identical choices
           15 |     gen -> out2
              |     ^^^^^^^^^^^
          = note: gen -> out is here (t.agp:14:21)
          = help: keep one of these edges (one respond stage answers every request), or put a condition on them so that each item takes one

        1 warning
        """)
    chosen = twice.replace("encode -> kv -> gen -> out\n",
                           'encode -> kv -> gen\n    gen -> out when finish_reason == "stop"\n    gen -> out2 otherwise\n')
    assert check(chosen) == ""


def test_an_edge_without_a_condition_beside_conditional_ones_elsewhere_is_a_fan_out_warning():
    """`gen -> long when finish_reason == "length"` beside `gen -> out`: every answer goes to
    `out`, and a cut one to `long` as well (two answers), where `otherwise` was likely meant (check
    said nothing). With `otherwise` it is quiet; so is a fan-out both of whose branches a join
    merges, and one where the item types part the edges (a Request to the batcher, a result on)."""
    two = SEED.replace("    stage out     : respond       {}\n",
                       "    stage out     : respond       {}\n"
                       "    stage long    : python        { fn = \"json:dumps\" }\n")
    fan = two.replace("encode -> kv -> gen -> out\n",
                      'encode -> kv -> gen -> out\n    gen -> long when finish_reason == "length"\n    long -> out\n')
    assert check(fan) == expect("""\
        t.agp:14:21: warning: edge gen -> out has no condition beside the conditional edge gen -> long when finish_reason == "length": every item goes to 'out', and one the condition holds for goes to 'long' as well (a fan-out: two branches of one request, two answers)
           14 |     encode -> kv -> gen -> out
              |                     ^^^^^^^^^^
          = note: gen -> long is here (t.agp:15:5)
          = help: write `gen -> out otherwise` if 'out' is for the items no condition takes; for a copy on purpose, merge the branches in a join

        1 warning
        """)
    assert check(fan.replace("encode -> kv -> gen -> out\n", "encode -> kv -> gen\n    gen -> out otherwise\n")) == ""
    # beside an `otherwise` edge too: every item still takes the edge without a condition
    three = fan.replace("    stage out     : respond       {}\n", "    stage out     : respond       {}\n"
                        "    stage rest    : python        { fn = \"json:dumps\" }\n")
    three = three.replace("    long -> out\n", "    long -> out\n    gen -> rest otherwise\n    rest -> out\n")
    said = check(three)
    assert said.count("warning: edge gen -> out has no condition beside the conditional edge gen -> long") == 1, said
    assert "help: give gen -> out a condition (or remove it)" in said and said.endswith("1 warning\n"), said
    joined = fan.replace("    stage out     : respond       {}\n",
                         "    stage out     : respond       {}\n    stage j       : join          { policy = first }\n")
    joined = joined.replace("encode -> kv -> gen -> out\n", "encode -> kv -> gen -> j -> out\n").replace(
        "long -> out\n", "long -> j\n")
    assert check(joined) == ""
    parted = SEED.replace("    stage out     : respond       {}\n",
                          "    stage out     : respond       {}\n"
                          "    stage judge   : python        { fn = \"json:dumps\"  returns = any  max_turns = 2 }\n")
    parted = parted.replace("encode -> kv -> gen -> out\n",
                            "encode -> kv -> gen -> judge\n    judge -> out when accept\n    judge -> batch\n")
    assert "fan-out" not in check(parted)


@pytest.mark.parametrize("edges, clean", [
    ("when full or timeout", True),                   # one true part decides an `or`: both labels covered
    ("when not (full and timeout)", True),            # one false part decides an `and`: its `not` holds for both
    ("when full and timeout\n    batch -> encode when timeout", False),   # never true for a full batch
    ("when not (full or timeout)\n    batch -> encode when timeout", False),
])
def test_a_batcher_label_is_covered_by_a_condition_that_holds_for_it_whatever_else_it_says(edges, clean):
    """A batch carries one label, full or timeout: `when full or timeout` alone covers both (the
    part that holds decides the `or`), `when not (full and timeout)` too (the part that fails
    decides the `and`), while `when full and timeout` and `when not (full or timeout)` never hold
    for a full batch, which then has nowhere to go."""
    diags = load(SEED.replace("    batch -> encode when full\n    batch -> encode when timeout\n",
                              f"    batch -> encode {edges}\n"))[1]
    assert [d.message for d in diags] == \
        ([] if clean else ["full items of 'batch' have nowhere to go: no edge `when full`, no unconditional "
                           "edge and no `otherwise`"])

"""The flow runtime's pure parts as tables (no threads, no model): where an item goes (the
router, its fields, a pinned request, a loop's exits), when a join fires and what it gives,
which Rejects only drop their branch, how bounded loops count, how the ledger numbers a streamed
request's choices and times its first token; and the router of a checked pipeline built from its
graph."""
from __future__ import annotations

from types import SimpleNamespace

import networkx as nx
import pytest

from flowkit import chain, write
from pipeline_dsl import conditions as C
from pipeline_dsl.flow import load_graph
from pipeline_dsl.flow.items import Item, PipelineError, RequestState
from pipeline_dsl.flow.joins import Joins
from pipeline_dsl.flow.ledger import RequestLedger
from pipeline_dsl.flow.loops import Loops
from pipeline_dsl.flow.router import OTHERWISE, Router, fields
from pipeline_dsl.flow.streams import StreamPlan

R, G = "Request", "Generated"


def test_a_loop_leaves_by_the_exits_that_carry_the_item_in_file_order_once_each():
    router = Router({}, {}, {"gen": frozenset({R}), "out": frozenset({G}), "log": frozenset({R, G})}, {})
    exits = ["out", "gen", "log", "out", "elsewhere"]           # "elsewhere": a stage the table lacks
    assert router.leave(exits, G) == ["out", "log"]
    assert router.leave(exits, R) == ["gen", "log"]
    assert router.leave(["elsewhere"], R) == []


ON_REJECT = {"vote": "drop", "strict": "fail", "merge": "drop"}
REACH = {"a": {"vote"}, "b": {"vote", "strict"}, "c": set(), "d": {"vote", "merge"}, "e": {"strict"}}


@pytest.mark.parametrize("stage, drops", [
    ("a", True),          # the one join ahead drops
    ("b", False),         # one join ahead fails the request
    ("c", False),         # no join ahead: nothing to drop the branch at
    ("d", True),          # every join ahead drops
    ("e", False),
    ("nowhere", False),   # a stage the table lacks reaches no join
])
def test_a_reject_drops_its_branch_only_when_every_join_ahead_says_drop(stage, drops):
    assert Joins(REACH, {}, ON_REJECT).drops(stage) is drops


# ---------------------------------------------------------------- the fields conditions read


REQ = {"prompt": "x", "model": "gen", "n": 3, "temperature": 0.5,
       "metadata": {"tier": "gold", "org": {"id": 7}, "flat": 1, "team id": "a.b", "a.b": 2},
       "headers": {"x-tenant": "gold"}}


def never():
    raise AssertionError("the prompt was tokenised although no condition needed it")


@pytest.mark.parametrize("path, value", [
    ("turn", 2), ("stream", True), ("model", "gen"), ("n", 3), ("temperature", 0.5),
    (("metadata", "tier"), "gold"), (("metadata", "org", "id"), 7), (("metadata", "org"), {"id": 7}),
    (("metadata", "none"), C.MISSING), (("metadata", "flat", "deeper"), C.MISSING),
    (("metadata", "org", "name"), C.MISSING), (("metadata", "team id"), "a.b"), (("metadata", "a.b"), 2),
    (("metadata", "a", "b"), C.MISSING),         # metadata["a.b"] is one key, metadata.a.b two
    (("headers", "x-tenant"), "gold"), (("headers", "x-user"), C.MISSING),
    ("seed", C.MISSING), ("text", C.MISSING), ("finish_reason", C.MISSING),
    ("completion_tokens", C.MISSING), ("cached_tokens", C.MISSING),
])
def test_a_request_s_fields_as_conditions_read_them(path, value):
    get = fields(REQ, R, prompt_tokens=never, turn=2, stream=True, served_name="tiny")
    assert get(path) == value


def test_a_request_s_defaults_and_its_prompt_tokens_counted_only_when_asked():
    get = fields({"prompt": "x"}, R, prompt_tokens=lambda: 12, served_name="tiny")
    assert (get("model"), get("n"), get("turn"), get("stream"), get("prompt_tokens")) == ("tiny", 1, 0, False, 12)
    assert get(("metadata", "tier")) is C.MISSING and get(("headers", "x-tenant")) is C.MISSING
    get = fields({"prompt": "x", "model": None}, R, prompt_tokens=never)
    assert get("model") == ""


@pytest.mark.parametrize("rid, value", [(2, "2"), ("r1", "r1"), (-7, "-7")])
def test_the_id_field_is_a_string_also_for_agp_run_s_integer_ids(rid, value):
    """`id` is a string field (check refuses `id == 2`), and agp run gives a line without an id
    its line number, an integer: `when id == "2"` never held for line 2."""
    assert fields({"id": rid, "prompt": "x"}, R, prompt_tokens=never)("id") == value
    assert fields({"text": "t", "request": {"id": rid, "prompt": "x"}}, G, prompt_tokens=never)("id") == value
    assert fields({"prompt": "x"}, R, prompt_tokens=never)("id") is C.MISSING


GEN = {"text": "hello", "finish_reason": "length", "request": REQ,
       "usage": {"prompt_tokens": 9, "completion_tokens": 4, "cached_tokens": 8}}


@pytest.mark.parametrize("path, value", [
    ("text", "hello"), ("finish_reason", "length"), ("prompt_tokens", 9), ("completion_tokens", 4),
    ("cached_tokens", 8), ("model", "gen"), ("n", 3), (("metadata", "tier"), "gold"), ("temperature", 0.5),
    (("headers", "x-tenant"), "gold"),
])
def test_a_generated_item_s_fields_come_from_its_answer_usage_and_request(path, value):
    get = fields(GEN, G, prompt_tokens=never)
    assert get(path) == value


def test_a_generated_item_without_usage_counts_its_prompt_and_misses_the_rest():
    get = fields({"text": "hi", "prompt": "x"}, G, prompt_tokens=lambda: 5)
    assert get("prompt_tokens") == 5
    assert get("completion_tokens") is C.MISSING and get("cached_tokens") is C.MISSING
    assert get("finish_reason") is C.MISSING and get("text") == "hi"
    assert get("prompt") == "x"                                  # no `request`: the item is its own


@pytest.mark.parametrize("op, missing, other_type", [
    ("==", False, False), ("<", False, False), ("<=", False, False), (">", False, False), (">=", False, False),
    ("!=", True, True),
])
def test_a_field_the_item_lacks_or_of_another_type_holds_only_for_not_equal(op, missing, other_type):
    """docs/language.md, Conditions: an absent field (a metadata key, a header the request did not
    send, max_tokens not sent) makes ==, <, <=, >, >= false and != true, as does a metadata value
    of another type than the literal — a boolean is not a number (true == 1 does not hold)."""
    get = fields({"prompt": "x", "metadata": {"flag": True, "count": 1, "word": "1"}, "headers": {"x-a": "1"}},
                 R, prompt_tokens=never)
    assert C.evaluate(("cmp", ("metadata", "absent"), op, 1), get) is missing
    assert C.evaluate(("cmp", ("metadata", "flag", "deeper"), op, 1), get) is missing   # a key of no object
    assert C.evaluate(("cmp", ("headers", "x-b"), op, "1"), get) is missing
    assert C.evaluate(("cmp", "max_tokens", op, 1), get) is missing
    assert C.evaluate(("cmp", ("metadata", "flag"), op, 1), get) is other_type       # a bool against a number
    assert C.evaluate(("cmp", ("metadata", "count"), op, True), get) is other_type   # a number against a bool
    assert C.evaluate(("cmp", ("metadata", "word"), op, 1), get) is other_type       # a string against a number
    assert C.evaluate(("cmp", ("metadata", "count"), op, 1.0), get) is (op in ("==", "<=", ">="))   # numbers


def test_an_edge_takes_the_types_its_destination_carries_and_kv_lookup_passes_requests_on():
    router = Router({}, {"kv": "kv_lookup", "r": "route"}, {"gen": frozenset({R}), "out": frozenset({G})}, {})
    assert router.takes("r", "gen", R) and not router.takes("r", "gen", G)
    assert router.takes("r", "out", G) and not router.takes("r", "nowhere", R)
    assert router.takes("kv", "gen", G) and router.takes("kv", "nowhere", R)


# ---------------------------------------------------------------- joins: when they fire, what they give


JOIN_REACH = {"a": {"b", "j"}, "b": {"j"}, "c": set(), "j": {"out"}, "k": set()}


def joins(policy="first", **more) -> Joins:
    impls = {"j": SimpleNamespace(policy=policy), "k": SimpleNamespace(policy="fn"), **more}
    return Joins(JOIN_REACH, impls, {"j": "fail", "k": "drop"})


def request() -> RequestState:
    return RequestState("k1", "r1", None, 0.0)


def item(req, at, branch, **data) -> Item:
    it = Item("Generated", data, req, at=at, branch=branch)
    req.items.add(it)
    return it


def test_a_join_fires_once_nothing_else_of_the_request_can_reach_it():
    req = request()
    first, second, elsewhere = item(req, "b", (0,), text="x"), item(req, "a", (1,), text="y"), item(req, "c", (2,))
    js = joins()
    assert js.arrive(req, "j", first) == [] and first.at == "j"      # the second branch can still reach j
    assert req.joins == {"j": [first]}
    second.at = "b"
    assert js.ready(req) == []
    fired = js.arrive(req, "j", second)
    assert fired == [("j", [first, second])] and req.joins == {}    # `elsewhere` at c cannot reach j
    assert elsewhere.at == "c" and js.ready(req) == []


def test_an_item_at_a_stage_the_table_lacks_blocks_no_join():
    req = request()
    item(req, "nowhere", (1,))
    arrived = item(req, "b", (0,))
    assert joins().arrive(req, "j", arrived) == [("j", [arrived])]


def test_an_empty_wait_is_passed_over():
    req = request()
    req.joins["k"] = []
    arrived = item(req, "b", (0,))
    assert joins().arrive(req, "j", arrived) == [("j", [arrived])] and req.joins == {"k": []}


def test_an_item_waiting_at_a_join_that_cannot_reach_another_blocks_it_not():
    req = request()
    other = item(req, "k", (1,))
    req.joins["k"] = [other]
    arrived = item(req, "b", (0,))
    assert joins().arrive(req, "j", arrived) == [("k", [other]), ("j", [arrived])]


def test_another_item_at_the_join_itself_holds_it():
    req = request()
    js = joins()
    on_its_way = item(req, "j", (1,))                  # sent to j, not yet arrived
    assert js.arrive(req, "j", item(req, "b", (0,))) == []
    assert js.arrive(req, "j", on_its_way)[0][0] == "j"


def test_first_sees_arrival_order_the_other_policies_branch_order():
    req = request()
    late, early = item(req, "j", (2,)), item(req, "j", (0, 1))
    assert joins("first").inputs("j", [late, early]) == [late, early]
    assert joins("longest").inputs("j", [late, early]) == [early, late]
    assert joins("majority").inputs("j", [late, early]) == [early, late]
    assert not joins("first").user_code("j") and joins().user_code("k")


def test_a_merged_result_is_completed_from_the_first_branch_and_lists_the_branches():
    req = request()
    b1 = item(req, "j", (1,), text="one", finish_reason="length", usage={"completion_tokens": 1}, generated_by="g1",
              constrained=False, extra="e1")                       # the second branch: no request, no id
    b0 = item(req, "j", (0,), text="zero", finish_reason="stop", usage={"completion_tokens": 2}, generated_by="g0",
              constrained=True, request={"id": "r1"}, id="r1", extra="e0")
    merged = joins().result("j", [b1, b0], {"text": "both", "generated_by": None, "finish_reason": "mine"})
    assert merged == {"text": "both", "finish_reason": "mine", "usage": {"completion_tokens": 2},
                      "generated_by": "g0", "constrained": True, "request": {"id": "r1"}, "id": "r1",
                      "branches": [{"text": "zero", "finish_reason": "stop"},
                                   {"text": "one", "finish_reason": "length"}]}
    picked = joins().result("j", [b1, b0], b1.data)               # a policy's pick: a copy, unchanged
    assert picked is not b1.data and "branches" not in b1.data
    assert picked == {**b1.data, "branches": merged["branches"]}
    same = joins().result("j", [b1, b0], dict(b0.data, usage=None))
    assert same["usage"] == {"completion_tokens": 2} and same["extra"] == "e0"
    equal = dict(b1.data)                                          # equal to a branch: taken as that branch
    assert joins().result("j", [b1, b0], equal) == {**b1.data, "branches": merged["branches"]}
    assert "branches" not in equal                                 # and the merge's own dict left alone
    other = joins().result("j", [b1, b0], {"text": "one", "generated_by": "g1"})   # another branch's answer
    assert "constrained" not in other and other["generated_by"] == "g1"   # not the first branch's flag: told
                                                                          # from g1 and its request when read


@pytest.mark.parametrize("merged, got", [
    (None, "NoneType"), ("text", "str"), ({"text": 3}, "a dict without a text string"),
    ({"no": "text"}, "a dict without a text string"),
])
def test_a_merge_that_gives_no_text_fails_the_join_naming_it(merged, got):
    req = request()
    with pytest.raises(PipelineError) as e:
        joins().result("j", [item(req, "j", (0,), text="a")], merged)
    assert str(e.value) == f"join 'j' produced no result: its merge gave {got}"
    assert (e.value.kind, e.value.stage) == ("failed", "j")


# ---------------------------------------------------------------- bounded loops


def loop_graph():
    """gen -> tool -> gen (tool bounded at 2 turns), tool -> out, tool -> log; check (bounded at 1,
    no cycle) -> out; plain stages carry params of their own or none."""
    g = nx.DiGraph()
    g.add_node("gen", params={"max_new_tokens": 4})
    g.add_node("tool", params={"max_turns": 2})
    g.add_node("check", params={"max_turns": 1})
    g.add_node("out", params=None)
    g.add_node("log")
    g.add_edges_from([("gen", "tool"), ("tool", "gen"), ("tool", "out"), ("tool", "log"), ("check", "out")])
    routes = {"gen": [("tool", None)], "tool": [("out", ("label", "done")), ("gen", None), ("log", None)],
              "check": [("out", None)], "out": [], "log": []}
    return g, routes


def test_a_bounded_stage_leaves_its_loop_by_its_edges_out_of_it_in_file_order():
    loops = Loops.from_graph(*loop_graph())
    assert loops.bounds == {"tool": 2, "check": 1}
    assert loops.exits == {"tool": ["out", "log"], "check": ["out"]}
    assert "tool" in loops and "check" in loops and "gen" not in loops and "out" not in loops


def test_an_item_takes_max_turns_calls_then_leaves_and_turn_counts_every_bounded_stage():
    loops = Loops.from_graph(*loop_graph())
    turns: dict = {}
    assert [loops.leaves("tool", turns) for _ in range(3)] == [False, False, True]
    assert turns == {"tool": 2} and Loops.turn(turns) == 2
    assert loops.leaves("check", turns) is False and loops.leaves("check", turns) is True
    assert Loops.turn(turns) == 3 and Loops.turn({}) == 0


# ---------------------------------------------------------------- a request pinned to a generate stage

LONG = ("cmp", "prompt_tokens", ">", 10)
PIN_ROUTES = {"pinned": [("small", None), ("big", LONG)],      # the way to gen_b is listed second
              "lone": [("small", None)],                       # a stage the reach table lacks
              "kv": [("g1", None), ("g2", LONG)]}
PIN_CARRY = {"small": frozenset({R}), "big": frozenset({R}), "g1": frozenset(), "g2": frozenset()}
PIN_REACH = {"pinned": {"small", "big", "gen_b"}, "big": {"gen_b"}, "kv": {"g1", "g2"}}


def pin_router() -> Router:
    return Router(PIN_ROUTES, {"kv": "kv_lookup"}, PIN_CARRY, PIN_REACH)


def short_prompt(path):
    return 3 if path == "prompt_tokens" else C.MISSING


@pytest.mark.parametrize("stage, pin, expected", [
    ("pinned", "gen_b", ["big"]),          # the edge towards the pinned stage, not the first that takes it
    ("pinned", None, ["small"]),
    ("pinned", "elsewhere", ["small"]),     # a pin it cannot reach: routed as usual
    ("lone", "gen_b", ["small"]),
    ("kv", "g2", ["g2"]),                   # kv_lookup's edges take the request whatever its generate stages give
    ("kv", None, ["g1"]),
])
def test_a_pinned_request_takes_the_way_to_its_stage_conditions_aside(stage, pin, expected):
    assert pin_router().choose(stage, R, short_prompt, pin=pin) == expected


def test_a_request_is_read_as_itself_whatever_keys_a_python_stage_gave_it():
    data = {"prompt": "x", "model": "mine", "request": {"model": "theirs"}, "usage": {"completion_tokens": 5},
            "text": "t", "finish_reason": "stop"}
    get = fields(data, R, prompt_tokens=never)
    assert get("model") == "mine" and get("completion_tokens") is C.MISSING
    assert get("text") is C.MISSING and get("finish_reason") is C.MISSING


# ---------------------------------------------------------------- the router of a checked pipeline


ROUTED = ("stage request : requests {}\nstage route : route {}\n"
          "stage short_gen : generate { max_new_tokens = 3 }\nstage long_gen : generate { max_new_tokens = 5 }\n"
          "stage out : respond {}\nrequest -> route\n"
          "route -> batch_s otherwise\n"
          "route -> batch_l when prompt_tokens > 20\n"
          + chain("short_gen", "batch_s", "enc_s", "kv_s") + chain("long_gen", "batch_l", "enc_l", "kv_l")
          + "short_gen -> out\nlong_gen -> out\n")


def tokens(n):
    return fields({"prompt": "x"}, R, prompt_tokens=lambda: n)


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_gguf):
    return load_graph(write(tmp_path_factory.mktemp("routed"), tiny_gguf, ROUTED))


def test_a_checked_pipeline_routes_by_its_conditions_labels_and_pins(routed):
    router = Router.from_graph(routed)
    assert router.choose("route", R, tokens(50)) == ["batch_l"]
    assert router.choose("route", R, tokens(3)) == ["batch_s"]
    assert router.choose("route", R, tokens(3), pin="long_gen") == ["batch_l"]   # its path, conditions aside
    assert router.choose("batch_s", "Batch", tokens(3), label="timeout") == ["enc_s"]
    assert router.choose("batch_s", "Batch", tokens(3)) == []                     # neither label: nowhere yet
    assert router.choose("kv_s", R, tokens(3)) == ["short_gen"]                  # kv_lookup passes the request
    assert router.choose("short_gen", G, tokens(3)) == ["out"]
    assert router.leave(["out", "short_gen"], G) == ["out"]
    assert router.reach["kv_l"] == {"long_gen", "out"} and router.reach["out"] == set()


def test_a_graph_without_route_tables_routes_by_its_edges_conditions(routed):
    bare = routed.copy()
    for n in bare:
        del bare.nodes[n]["routes"]
    router = Router.from_graph(bare)
    assert router.routes["route"] == [("batch_s", OTHERWISE), ("batch_l", ("cmp", "prompt_tokens", ">", 20))]
    assert router.choose("route", R, tokens(50)) == ["batch_l"]
    assert router.choose("route", R, tokens(3)) == ["batch_s"]
    assert router.routes["out"] == []


@pytest.mark.parametrize("streamed, expected", [
    ((0, 1), ["s0", "s1", "w0", "w1"]),       # the answers sent whole come after the streamed ones
    ((0, 2), ["s0", "w0", "s2", "w1"]),       # ... and fill the gaps between them, in branch order
    ((1,), ["w0", "s1", "w1"]),
])
def test_a_streamed_request_s_choices_keep_their_stream_index_and_the_others_fill_the_gaps(streamed, expected):
    """RequestLedger.answer: a choice streamed from its generate stage keeps the index its chunks
    carried; the choices sent whole take the indices left free, lowest first, in branch order;
    every index once."""
    req = RequestState("k1", "r1", None, 0.0, stream=True)
    for i in streamed:
        req.results.append(Item(G, {"text": f"s{i}"}, req, "out", (i,), index=i))
    for b in range(2):                        # listed last-first: branch order decides, not arrival
        req.results.append(Item(G, {"text": f"w{1 - b}"}, req, "out", (9, 1 - b)))
    result = RequestLedger(lambda: 0.0).answer(req)
    assert [c.index for c in result.choices] == list(range(len(expected)))
    assert [c.text for c in result.choices] == expected


def test_ttft_is_the_time_to_the_request_s_first_token_not_its_last():
    now = [10.0]
    ledger = RequestLedger(lambda: now[0])
    req = ledger.admit({"id": "r1", "prompt": "x"}, None, None, False)
    for t in (10.5, 11.0, 12.0):              # tokens heard, of one choice and of another
        ledger.first_token(req, t)
    now[0] = 13.0
    metrics = ledger.answer(req).metrics
    assert metrics["ttft_s"] == 0.5 and metrics["latency_s"] == 3.0


def _finished(done: int, cached: int = 0, queue_s: float = 0.0):
    """An engine output as the ledger reads it: its tokens, cached tokens and timings."""
    return SimpleNamespace(completion_tokens=done, cached_tokens=cached,
                           metrics={"queue_s": queue_s, "prefill_s": queue_s, "decode_s": queue_s})


def test_a_request_s_timings_are_those_of_its_first_finished_generation():
    """RequestState.timings (the answer's queue_s, prefill_s, decode_s): the first sequence of the
    request to finish sets them, a later one (another choice, a cascade's second engine) does not."""
    ledger = RequestLedger(lambda: 0.0)
    req = ledger.admit({"id": "r1", "prompt": "x"}, None, None, False)
    for b, queue_s in enumerate((0.25, 4.0)):
        ledger.finished_sequence(Item(G, {}, req, "gen", (b,)), _finished(2, queue_s=queue_s), "e")
    metrics = ledger.answer(req).metrics
    assert (metrics["queue_s"], metrics["prefill_s"], metrics["decode_s"]) == (0.25, 0.25, 0.25)
    assert req.usage["completion_tokens"] == 4


def test_a_shared_prompt_counts_the_cached_tokens_of_the_copy_heard_first():
    """n streamed copies of one prompt count its cached tokens once, as the stream already told
    them: those of the copy heard first, even where another copy (admitted after the first's
    prefill, its blocks hit) finishes first."""
    ledger = RequestLedger(lambda: 0.0)
    req = ledger.admit({"id": "r1", "prompt": "x"}, None, None, True)
    entry = {"cached_tokens": None}
    first, second = (Item(G, {}, req, "gen", (i,), index=i, entry=entry) for i in range(2))
    assert ledger.usage_so_far(first, _finished(1))["cached_tokens"] == 0
    ledger.finished_sequence(second, _finished(3, cached=16), "e")
    ledger.finished_sequence(first, _finished(4), "e")
    assert req.usage["cached_tokens"] == 0 and req.usage["completion_tokens"] == 7


def test_a_generate_stage_s_live_chain_follows_single_unconditional_edges_into_stream_stages():
    """flow/streams.py: the stream stages that follow a generate stage through single unconditional
    edges filter its text live, and reach the client when the chain ends at a respond stage; a
    conditional edge, or two edges, leave the stream stage to filter the text whole."""
    long = ("cmp", "prompt_tokens", ">", 5)
    routes = {"gen": [("up", None)], "up": [("tag", None)], "tag": [("out", None)],
              "cond": [("up", long)], "two": [("up", None), ("log", None)], "plain": [("out", None)],
              "inner": [("tag2", None)], "tag2": [("py", None)], "log": [("out", None)], "py": [("out", None)]}
    kinds = {"out": "respond", "log": "python", "py": "python", "up": "python", "tag": "python", "tag2": "python"}
    plan = StreamPlan.build(["gen", "cond", "two", "plain", "inner"], routes, kinds, {"up", "tag", "tag2"})
    assert plan.chains == {"gen": ["up", "tag"], "cond": [], "two": [], "plain": [], "inner": ["tag2"]}
    assert plan.direct == {"gen": True, "cond": False, "two": False, "plain": True, "inner": False}


def test_a_stream_stage_s_feed_gives_its_chunks_in_order_and_none_after_it_closed():
    """flow/streams.py's Feed: the engine's chunks reach a stream stage in the order they were put,
    to a sync generator and to an async one, however many wait when it reads; close ends them,
    and a chunk put after the close (a late engine output) is dropped."""
    import asyncio

    from pipeline_dsl.flow.streams import Feed

    def filled():
        feed = Feed()
        for chunk in ("The", " capital", " is", " Paris"):
            feed.put(chunk)
        feed.close()
        feed.put(" late")
        return feed

    assert list(filled()) == ["The", " capital", " is", " Paris"]

    async def read(feed):
        return [chunk async for chunk in feed.chunks()]

    assert asyncio.run(read(filled())) == ["The", " capital", " is", " Paris"]

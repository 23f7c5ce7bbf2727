"""The router as a table: stage, item type, label and fields in, destinations out (no
threads, no model); and the same rule end to end with `otherwise` listed first."""
from __future__ import annotations

import pytest

from flowkit import chain, errors, run, write
from pipeline_dsl.conditions import evaluate
from pipeline_dsl.flow.router import OTHERWISE, Router, fields

R, G = "Request", "Generated"
LONG = ("cmp", "prompt_tokens", ">", 10)
GOLD = ("cmp", ("metadata", "tier"), "==", "gold")

ROUTES = {
    # `otherwise` listed first: it is the fallback wherever it stands
    "first_otherwise": [("small", OTHERWISE), ("big", LONG)],
    "two_conditions": [("big", LONG), ("vip", GOLD), ("small", OTHERWISE)],
    "plain_and_cond": [("log", None), ("big", LONG), ("small", OTHERWISE)],
    "labels": [("up", ("label", "shout")), ("out", OTHERWISE)],
    "typed": [("batch", ("label", "again")), ("out", OTHERWISE)],        # batch takes Requests only
    "kv": [("gen_a", None), ("gen_b", LONG)],
    "classify": [("math", ("label", "math")), ("chat", OTHERWISE)],      # both branches reach gen_a
    "fan": [("math", None), ("chat", None)],
    "two_ways": [("slow", LONG), ("fast", GOLD)],                       # both reach gen_b
}
CARRY = {"small": {R}, "big": {R}, "vip": {R}, "log": {R, G}, "up": {G}, "out": {G}, "batch": {R},
         "gen_a": {R}, "gen_b": {R}, "math": {R}, "chat": {R}, "slow": {R}, "fast": {R}}
KINDS = {"kv": "kv_lookup", "gen_a": "generate", "gen_b": "generate"}
REACH = {"two_conditions": {"big", "vip", "small", "gen_b"}, "big": {"gen_b"}, "classify": {"math", "chat", "gen_a"},
         "fan": {"math", "chat", "gen_a"}, "math": {"gen_a"}, "chat": {"gen_a"},
         "two_ways": {"slow", "fast", "gen_b"}, "slow": {"gen_b"}, "fast": {"gen_b"}}


def router() -> Router:
    return Router(ROUTES, KINDS, {k: frozenset(v) for k, v in CARRY.items()}, REACH)


def getter(tokens=3, tier=None):
    data = {"prompt": "x", "metadata": {"tier": tier} if tier else {}}
    return fields(data, R, prompt_tokens=lambda: tokens)


@pytest.mark.parametrize("stage, kind, get, label, pin, expected", [
    ("first_otherwise", R, getter(tokens=50), None, None, ["big"]),      # the conditional edge wins
    ("first_otherwise", R, getter(tokens=3), None, None, ["small"]),
    ("two_conditions", R, getter(tokens=50, tier="gold"), None, None, ["big"]),   # the first that holds
    ("two_conditions", R, getter(tokens=3, tier="gold"), None, None, ["vip"]),
    ("two_conditions", R, getter(tokens=3), None, None, ["small"]),
    ("plain_and_cond", R, getter(tokens=50), None, None, ["log", "big"]),        # unconditional: always
    ("plain_and_cond", R, getter(tokens=3), None, None, ["log", "small"]),
    ("plain_and_cond", G, getter(tokens=50), None, None, ["log"]),       # big, small take no Generated
    ("labels", G, getter(), "shout", None, ["up"]),
    ("labels", G, getter(), None, None, ["out"]),
    ("typed", G, getter(), "again", None, ["out"]),                      # batch cannot take it: fallback
    ("typed", R, getter(), "again", None, ["batch"]),
    ("kv", R, getter(tokens=50), None, None, ["gen_a", "gen_b"]),
    ("two_conditions", R, getter(tokens=3), None, "gen_b", ["big"]),     # pinned: the way to gen_b
    # pinned to the stage every branch reaches: the conditions still choose the branch, copies stay
    ("classify", R, getter(), "chat", "gen_a", ["chat"]),
    ("classify", R, getter(), "math", "gen_a", ["math"]),
    ("fan", R, getter(), None, "gen_a", ["math", "chat"]),
    # pinned, and no condition chose a way there: the first edge towards it in file order
    ("two_ways", R, getter(tokens=3), None, "gen_b", ["slow"]),
    ("two_ways", R, getter(tokens=3, tier="gold"), None, "gen_b", ["fast"]),   # the condition's way
])
def test_the_router_chooses_by_the_table(stage, kind, get, label, pin, expected):
    assert router().choose(stage, kind, get, label, pin) == expected


def test_the_router_never_evaluates_what_it_does_not_need():
    asked = []

    def get(path):
        asked.append(path)
        return 50
    assert router().choose("two_conditions", R, get) == ["big"]
    assert asked == ["prompt_tokens"]                 # the tier was never looked at


def test_otherwise_listed_before_a_conditional_edge_is_the_fallback_when_running(tmp_path, soft_gguf):
    body = ("stage request : requests {}\nstage route : route {}\n"
            "stage short_gen : generate { max_new_tokens = 3 }\nstage long_gen : generate { max_new_tokens = 5 }\n"
            "stage out : respond {}\nrequest -> route\n"
            "route -> batch_s otherwise\n"                 # listed first
            "route -> batch_l when prompt_tokens > 20\n"
            + chain("short_gen", "batch_s", "enc_s", "kv_s") + chain("long_gen", "batch_l", "enc_l", "kv_l")
            + "short_gen -> out\nlong_gen -> out\n")
    path = write(tmp_path, soft_gguf, body)
    assert errors(path) == []
    reqs = [{"id": "short", "prompt": "hi", "ignore_eos": True},
            {"id": "long", "prompt": "the cat and the world " * 8, "ignore_eos": True}]
    (short, long_), rt = run(path, reqs)
    assert short.choices[0].data["generated_by"] == "short_gen"
    assert long_.choices[0].data["generated_by"] == "long_gen"
    edges = {(e["from"], e["to"]): e["items"] for e in rt.stats()["edges"]}
    assert edges[("route", "batch_l")] == 1 and edges[("route", "batch_s")] == 1


def tier_of(value):
    """A getter whose item's metadata.tier is `value` (None: the request sent no tier)."""
    return fields({"prompt": "x", "metadata": {} if value is None else {"tier": value}}, R, prompt_tokens=lambda: 3)


@pytest.mark.parametrize("op, below, at, above", [
    ("==", False, True, False), ("!=", True, False, True), ("<", True, False, False),
    ("<=", True, True, False), (">", False, False, True), (">=", False, True, True)])
def test_each_comparison_holds_on_its_side_of_the_literal(op, below, at, above):
    """`when metadata.tier OP 5` (conditions.py): each operator at 4, 5 and 6."""
    cond = ("cmp", ("metadata", "tier"), op, 5)
    assert [evaluate(cond, tier_of(v)) for v in (4, 5, 6)] == [below, at, above]


@pytest.mark.parametrize("value", [None, "5", True])
@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">="])
def test_a_missing_field_or_one_of_another_type_makes_only_not_equal_hold(op, value):
    """docs (conditions.py): a field the item does not carry, or a metadata value of another type
    than the literal, makes ==, <, <=, >, >= false and != true; so a request without the key
    takes the `!=` edge, not the `otherwise` one."""
    cond = ("cmp", ("metadata", "tier"), op, 5)
    assert evaluate(cond, tier_of(value)) is (op == "!=")
    routes = Router({"s": [("plain", cond), ("other", OTHERWISE)]}, {}, {"plain": frozenset({R}),
                                                                          "other": frozenset({R})}, {})
    assert routes.choose("s", R, tier_of(value)) == (["plain"] if op == "!=" else ["other"])


def test_a_request_without_n_reads_as_one_and_an_integer_id_as_its_text():
    """conditions.py: `n` is the answers the request asks for, one where it sends none (so `when n > 1`
    leaves it and `when n == 1` takes it); `id` is a string field, and agp run's integer ids (a line's
    number) compare as their text, on the request and on the result it made alike."""
    def get(data, kind=R):
        return fields(data, kind, prompt_tokens=lambda: 3)

    plain, three = get({"prompt": "x"}), get({"prompt": "x", "n": 3})
    assert evaluate(("cmp", "n", "==", 1), plain) and not evaluate(("cmp", "n", ">", 1), plain)
    assert evaluate(("cmp", "n", ">", 1), three) and not evaluate(("cmp", "n", "==", 1), three)
    routes = Router({"s": [("many", ("cmp", "n", ">", 1)), ("one", OTHERWISE)]}, {},
                    {"many": frozenset({R}), "one": frozenset({R})}, {})
    assert routes.choose("s", R, plain) == ["one"] and routes.choose("s", R, three) == ["many"]
    for numbered in (get({"prompt": "x", "id": 7}), get({"text": "a", "request": {"prompt": "x", "id": 7}}, G)):
        assert evaluate(("cmp", "id", "==", "7"), numbered) and not evaluate(("cmp", "id", "!=", "7"), numbered)
    assert evaluate(("cmp", "id", "==", "q7"), get({"prompt": "x", "id": "q7"}))

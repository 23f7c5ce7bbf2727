"""Conditions read HTTP headers and metadata keys that are no names: `headers["x-tenant"]`,
`metadata["team id"]` (docs/language.md, "Conditions"): check, fmt, the compiled form and its
text, `agp run` lines, and `agp serve`, which copies the headers a pipeline's conditions compare."""
from __future__ import annotations

import json

import httpx
import pytest

import pipeline_dsl
from clikit import agp_in
from pipeline_dsl import conditions as C
from pipeline_dsl.fmt import format_text
from pipeline_dsl.graph import headers_read
from pipeline_dsl.parser import parse
from pipeline_dsl.render import dot_source
from test_serve import reap, start_agp_serve

ROUTED = """pipeline p {{
    model = "smollm2-135m-instruct"
    stage request : requests      {{}}
    stage route   : route         {{}}
    stage batch   : dynamic_batch {{}}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{}}
    stage gen     : generate      {{}}
    stage out     : respond       {{}}
    request -> route
    route -> batch when {cond}
    route -> batch otherwise
    batch -> encode -> kv -> gen -> out
}}
"""


def diagnostics(cond: str):
    text = ROUTED.format(cond=cond)
    _, diags = pipeline_dsl.loads(text, "p.agp")
    return text, diags


def compiled(cond: str):
    chain = [i for i in parse(ROUTED.format(cond=cond))[0].items[0].body if getattr(i, "condition", None)][0]
    return C.compile_condition(chain.condition)


# ---------------------------------------------------------------- check, compiled form, text

@pytest.mark.parametrize("cond", [
    'headers["x-tenant"] == "gold"', 'headers["X-Tenant"] != "gold"', 'headers.authorization == "k"',
    'metadata["team id"] == 3', 'metadata.org["a.b"] == true',
    'metadata["tier"] == "gold" and not headers["x-a"] == "1"',
])
def test_check_accepts_a_header_or_a_metadata_key_in_brackets(cond):
    assert [d for d in diagnostics(cond)[1] if d.is_error] == []


def test_a_header_name_is_case_blind_and_a_key_reads_the_same_in_either_spelling():
    """HTTP's header names are case-blind, and the item carries them lower-case: the compiled
    condition reads the lower-case name. `metadata.tier` and `metadata["tier"]` are one field;
    `metadata["a.b"]` is one key, `metadata.a.b` two."""
    assert compiled('headers["X-Tenant"] == "gold"') == ("cmp", ("headers", "x-tenant"), "==", "gold")
    assert compiled('headers.Authorization == "k"') == ("cmp", ("headers", "authorization"), "==", "k")
    assert compiled('metadata["tier"] == "gold"') == compiled('metadata.tier == "gold"') == \
        ("cmp", ("metadata", "tier"), "==", "gold")
    assert compiled('metadata["a.b"] == 1') == ("cmp", ("metadata", "a.b"), "==", 1)
    assert compiled('metadata.a.b == 1') == ("cmp", ("metadata", "a", "b"), "==", 1)
    assert compiled('prompt_tokens > 5') == ("cmp", "prompt_tokens", ">", 5)     # a plain field: its name


def test_two_spellings_of_one_field_are_one_condition():
    """An edge written twice, once per spelling (a header's case, a key after a dot or in
    brackets), is a duplicate edge, as two identical lines are."""
    for first, second in (('headers["X-Tenant"] == "a"', 'headers["x-tenant"] == "a"'),
                          ('metadata.tier == "a"', 'metadata["tier"] == "a"')):
        text = ROUTED.format(cond=first).replace("    route -> batch otherwise\n",
                                                 f"    route -> batch when {second}\n    route -> batch otherwise\n")
        _, diags = pipeline_dsl.loads(text, "p.agp")
        assert [d.message for d in diags if "decides nothing" not in d.message] == \
            [f"duplicate edge route -> batch when {compiled_text(first)}"]


def compiled_text(cond: str) -> str:
    return C.text(compiled(cond))


def test_the_drawing_writes_the_condition_as_the_file_would():
    """render's edge label (and every message naming a condition) writes the compiled condition
    back in the language: a header by its lower-case name in brackets, a metadata key that is
    a name after a dot, any other key in brackets."""
    text = ROUTED.format(cond='headers["X-Tenant"] == "gold" or metadata["team id"] == "a\\"b" or metadata["x"] == 1')
    graph = pipeline_dsl.load_pipeline_graph("p.agp", text=text)
    cond = graph.edges["route", "batch"]["conditions"][0]
    assert C.text(cond) == 'headers["x-tenant"] == "gold" or metadata["team id"] == "a\\"b" or metadata.x == 1'
    assert 'when headers[\\"x-tenant\\"] == \\"gold\\"' in dot_source(graph)
    assert headers_read(graph) == ["x-tenant"]


@pytest.mark.parametrize("cond, message, at, hint", [
    # a key in brackets is a string: the error points at the key
    ('headers[3] == "a"', "a key in brackets is a quoted string, not a number", "3", 'write headers["3"]'),
    ('metadata[tier] == "a"', "a key in brackets is a quoted string, not a bare word", "tier",
     'write metadata["tier"]'),
    ('metadata[[1]] == "a"', "a key in brackets is a quoted string, not a list", "[1]", None),
    # a header's value is a string: a second key is an error at it
    ('headers["a"]["b"] == "x"', 'a header\'s value is a string: headers["a"] has no keys', '["b"]', None),
    ('headers.a.b == "x"', 'a header\'s value is a string: headers["a"] has no keys', "b", None),
    ('headers["x tenant"] == "a"', '"x tenant" is not an HTTP header name', '["x tenant"]',
     'write headers["x-tenant"]'),
    ('headers[""] == "a"', '"" is not an HTTP header name', '[""]', None),
    ('headers == "a"', "'headers' needs a header name", "headers", 'e.g. headers["x-tenant"] == "gold"'),
    ('header["x-tenant"] == "a"', "unknown field 'header[\"x-tenant\"]'", "header", "did you mean 'headers'?"),
    ('metdata.tier == "a"', "unknown field 'metdata.tier'", "metdata", "did you mean 'metadata'?"),
    ('prompt_token > 5', "unknown field 'prompt_token'", "prompt_token", "did you mean 'prompt_tokens'?"),
    # a field under a prefix of the item's dict, as a python stage reads it: the field's own name
    ('usage.prompt_tokens > 5', "unknown field 'usage.prompt_tokens'", "usage", "a condition reads the field by "
     "its own name: write prompt_tokens"),
    ('request.metadata.tier == "a"', "unknown field 'request.metadata.tier'", "request", "a condition reads the "
     "field by its own name: write metadata.tier"),
    ('request.headers["x-tenant"] == "a"', "unknown field 'request.headers[\"x-tenant\"]'", "request",
     "a condition reads the field by its own name: write headers[\"x-tenant\"]"),
    ('prompt_tokens["a"] > 5', "'prompt_tokens' is a number: it has no keys", '["a"]', None),
    ('headers["x-tenant"] > 5', "type mismatch: 'headers[\"x-tenant\"]' is a string, not a number", "5", None),
    ('headers["x-tenant"] < "b"', "'<' compares numbers", None, None),
])
def test_check_points_at_the_part_of_the_field_that_is_wrong(cond, message, at, hint):
    text, diags = diagnostics(cond)
    errors = [d for d in diags if d.is_error]
    assert len(errors) == 1 and message in errors[0].message, errors
    d = errors[0]
    line = text.splitlines()[d.pos.line - 1]
    if at is not None:
        start = line.index(cond) + cond.index(at, 1 if at == "[1]" else 0)
        assert (d.pos.col - 1, d.pos.end_col - 1) == (start, start + len(at)), (d.pos, line)
    assert d.hint == hint


def test_a_boolean_field_alone_is_told_to_compare_it_with_true():
    """`when stream` was told `e.g. when stream == "…"`, a comparison check refuses (a string for a boolean)."""
    [error] = [d for d in diagnostics("stream")[1] if d.is_error]
    assert (error.message, error.expected, error.hint) == (
        "field 'stream' needs a comparison", "stream == true or stream == false", "e.g. when stream == true")
    assert [d for d in diagnostics("stream == true")[1] if d.is_error] == []


def test_a_bare_headers_or_metadata_is_a_field_that_needs_a_key_and_a_comparison():
    for word, hint in (("headers", 'e.g. when headers["x-tenant"] == "gold"'),
                       ("metadata", 'e.g. when metadata.tier == "gold"')):
        errors = [d for d in diagnostics(word)[1] if d.is_error]
        assert [(e.message, e.hint) for e in errors] == [(f"field '{word}' needs a key and a comparison", hint)]


def test_a_header_written_after_a_dot_with_a_dash_is_told_to_go_in_brackets():
    text, diags = diagnostics('headers.x-tenant == "gold"')
    assert [(d.message, d.hint) for d in diags] == [
        ("unexpected character '-'", 'a key that is not a name goes in brackets: headers["x-tenant"]')]
    text, diags = diagnostics('metadata.org.team-id == "a"')
    assert diags[0].hint == 'a key that is not a name goes in brackets: metadata.org["team-id"]'
    # a stage's name keeps its own hint
    _, diags = pipeline_dsl.loads("pipeline p {\n    stage my-stage : route {}\n}\n", "p.agp")
    assert diags[0].hint == "names are letters, digits and '_', not '-': write my_stage"


# ---------------------------------------------------------------- fmt

def test_fmt_keeps_keys_in_brackets_as_written():
    src = ("pipeline p {\n"
           '    r -> a when headers["X-Tenant"] == "gold" and headers.authorization != "k"\n'
           '    r -> b when metadata["team id"] == "a" or metadata.org["x\\ty"]["z"] > 1\n'
           '    r -> c when headers[3] == "x"\n'
           "}\n")
    assert format_text(src) == (src, [])
    messy = src.replace('headers["X-Tenant"]', 'headers [ "X-Tenant" ]').replace('metadata["team id"]',
                                                                                'metadata ["team id"]')
    once, _ = format_text(messy)
    assert once == src and parse(once)[0] == parse(messy)[0]


# ---------------------------------------------------------------- agp run

HOOKS = """
def tag(item):
    item["metadata"]["arm"] = "gold"
    return item


def show(item):
    req = item["request"]
    item["text"] = req["metadata"].get("arm", "plain")
    return item
"""

ARMS = """pipeline p {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{}}
    stage route   : route         {{}}
    stage tag     : python        {{ fn = "header_hooks:tag" }}
    stage refuse  : python        {{ fn = "header_hooks_refuse:refuse" }}
    stage batch   : dynamic_batch {{ max_batch_size = 4  timeout = 1ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 1MiB }}
    stage gen     : generate      {{ max_new_tokens = 2 }}
    stage show    : python        {{ fn = "header_hooks:show" }}
    stage out     : respond       {{}}
    request -> route
    route -> refuse when headers["X-Tenant"] == "blocked"
    route -> tag    when headers["x-tenant"] == "gold"
    route -> batch  otherwise
    refuse -> batch
    tag -> batch
    batch -> encode -> kv -> gen -> show -> out
}}
"""

REFUSE = """
import pipeline_dsl


def refuse(item):
    raise pipeline_dsl.Reject("the tenant is blocked", status=403)
"""


def _arms(tmp_path, model):
    (tmp_path / "header_hooks.py").write_text(HOOKS, encoding="utf-8")
    (tmp_path / "header_hooks_refuse.py").write_text(REFUSE, encoding="utf-8")
    path = tmp_path / "arms.agp"
    path.write_text(ARMS.format(model=model), encoding="utf-8")
    return path


def test_agp_run_routes_a_line_by_its_headers(tmp_path, tiny_gguf):
    """A line's own `headers` (lower-case names) are what a condition reads under agp run; an
    absent header makes `==` false, as an absent metadata key does."""
    path = _arms(tmp_path, tiny_gguf)
    lines = [{"id": "g", "prompt": "hi", "headers": {"x-tenant": "gold"}},
             {"id": "s", "prompt": "hi", "headers": {"x-tenant": "silver"}},
             {"id": "n", "prompt": "hi"},
             {"id": "b", "prompt": "hi", "headers": {"x-tenant": "blocked"}}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    r = agp_in("run", path, "-i", inp, "-o", out, "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    got = {rec["id"]: rec.get("text") or rec["error"]["status"] for rec in records}
    assert got == {"g": "gold", "s": "plain", "n": "plain", "b": 403}


# ---------------------------------------------------------------- agp serve

def test_agp_serve_copies_the_headers_the_conditions_compare_without_the_flag(tmp_path, tiny_gguf):
    """`agp serve` with no --request-headers: a request's X-Tenant header reaches the condition
    that compares it (chat, completions and embeddings alike), case-blind; the startup line
    lists the headers copied, those of the flag first."""
    path = _arms(tmp_path, tiny_gguf)
    proc, url = start_agp_serve(str(path), "--threads", "1", "--no-access-log", "--request-headers", "x-user-id")
    try:
        def chat(headers: dict):
            r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": "p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            return r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.status_code

        assert chat({"X-Tenant": "gold"}) == "gold"
        assert chat({"x-tenant": "silver"}) == "plain"
        assert chat({}) == "plain"
        assert chat({"X-TENANT": "blocked"}) == 403
        r = httpx.post(url + "/v1/completions", headers={"x-tenant": "gold"}, timeout=60,
                       json={"model": "p", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "gold"

        def embed(headers: dict) -> int:
            return httpx.post(url + "/v1/embeddings", headers=headers, timeout=60,
                              json={"model": "p", "input": "hi"}).status_code

        assert embed({"x-tenant": "blocked"}) == 403                # the embeddings request carried the header
        assert embed({"x-tenant": "silver"}) == 200
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    finally:
        reap(proc)
    assert "request headers x-user-id, x-tenant" in err, err


def test_serve_copies_the_flag_s_headers_and_the_conditions_and_refuses_more_than_a_request_carries():
    import networkx as nx

    from pipeline_dsl.requests_io import MAX_HEADERS
    from pipeline_dsl.serve.build import request_headers
    from pipeline_dsl.serve.options import SetupError

    g = nx.DiGraph()
    g.add_node("route", routes=[("a", ("cmp", ("headers", "x-tenant"), "==", "gold")),
                                ("b", ("or", ("cmp", ("headers", "x-arm"), "==", "b"),
                                       ("cmp", ("headers", "x-tenant"), "==", "x")))])
    assert request_headers(["x-user-id", "x-arm"], g) == ("x-user-id", "x-arm", "x-tenant")
    assert request_headers(None, g) == ("x-tenant", "x-arm")
    with pytest.raises(SetupError, match=f"a request carries at most {MAX_HEADERS}"):
        request_headers([f"x-{i}" for i in range(MAX_HEADERS - 1)], g)


@pytest.mark.parametrize("cond", [
    'metadata["not"] == 1', 'metadata["true"].x == "a"', 'metadata.org["when"] != false',
    'metadata.note == "two\\nlines"', 'metadata["a\\"b"] == "q\\\\z\\t"', 'headers["x-a"] == "\\u0007"',
])
def test_the_text_of_a_condition_reads_back_as_the_same_condition(cond):
    """A message or a drawing writes a condition so that it reads back as the same condition:
    a key that is a reserved word in brackets (metadata.not is no field the parser reads), a
    string's newline, tab or control character escaped, not written raw across lines."""
    shown = compiled_text(cond)
    assert "\n" not in shown and "\t" not in shown
    assert compiled(shown) == compiled(cond), shown


def test_a_metadata_key_compared_with_true_and_with_1_are_two_edges():
    """A metadata value compared with true holds only for true, with 1 only for a number (a
    condition tells them apart), so these two edges are no duplicate: the second is kept and
    routes an item whose value is true. 1 and 1.0 are one number: a duplicate edge."""
    for second, duplicate in (("metadata.x == true", False), ("metadata.x == 1.0", True),
                              ("metadata.x != false", False), ("metadata.x == 0", False)):
        text = ROUTED.format(cond="metadata.x == 1").replace(
            "    route -> batch otherwise\n", f"    route -> batch when {second}\n    route -> batch otherwise\n")
        _, diags = pipeline_dsl.loads(text, "p.agp")      # (both lead to batch, as `otherwise` does)
        assert [d.message for d in diags if "decides nothing" not in d.message] == (
            [f"duplicate edge route -> batch when {compiled_text(second)}"] if duplicate else []), second
        if not duplicate:
            graph = pipeline_dsl.load_pipeline_graph("p.agp", text=text)
            assert [c for _, c in graph.nodes["route"]["routes"]] == [
                compiled("metadata.x == 1"), compiled(second), ("otherwise",)]

"""Constraints llguidance cannot enforce are a 400 that names the reason, never a 200 with an
empty answer (engine/constrain.py): a pattern that unrolls to a million characters, a $ref
that only refers to itself; `agp check` refuses such a json_schema file too. A grammar that
gives up mid-answer fails its request (400, or an error event on a stream), and only OpenAI's
finish reasons ever appear."""
from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from pipeline_dsl.engine import constrain
from pipeline_dsl.engine.constrain import ConstraintCompiler, GrammarError, check_spec, regex_size
from pipeline_dsl.constraints import forced_run

pytest.importorskip("llguidance")

HUGE_PATTERN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a{1000}){1000}$"}},
                "required": ["a"]}
SELF_REF = {"$ref": "#"}
OPENAI_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    """An engine on the tiny model, for its tokenizer and vocabulary (the tests only read them)."""
    from pipeline_dsl.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32"))


@pytest.fixture(scope="module")
def server(tiny_gguf):
    from test_serve import LiveServer

    s = LiveServer(tiny_gguf, batch_timeout_s=0.001)
    yield s
    s.close()


def test_regex_size_unrolls_counted_repetitions():
    assert regex_size("^(a{1000}){1000}$") == 1_000_000
    assert regex_size("^[a-z]{3,8}$") == 8 and regex_size("a*b+c?") == 3
    assert regex_size(r"(?:ab|c){10}\d{2,}") == 33
    assert regex_size("(?s:abcd){250}") == regex_size("(?-i:abcd){250}") == regex_size("(?i)[[:digit:]]{1000}") == 1000
    assert regex_size(r"(?:\U0001F600\x41\u0041){1000}") == 3000


def test_forced_run_of_an_alternation_is_its_longest_branchs_and_breaks_the_run_around_it():
    """A choice between branches forces the longest run inside a branch, and nothing across it:
    the text before and after it are runs of their own."""
    assert forced_run("(a{2000}|b{2000})") == forced_run("x(?:a{2000}|b+c{1500})") == 2000
    assert forced_run("a{600}(x|y)a{600}") == 600 and forced_run("a{600}(?:xx|yy)a{700}") == 700

def test_forced_run_counts_the_text_a_regex_must_write_whole_once_begun():
    """The longest run of fixed characters: literal characters and exact counts of them; a class,
    `.`, an alternation or an optional part forces nothing, so the count is never above the truth."""
    assert forced_run("^a{20000}$") == forced_run("a" * 20000) == 20000
    assert forced_run("[a-z]{20000}") == forced_run(".{5000}") == forced_run("(?i)abc") == 0
    assert forced_run(r"\d{4}-\d{2}") == 1 and forced_run("a+b") == 1 and forced_run("a{2,5}b") == 2
    assert forced_run("(?:foo|bar)baz") == 3 and forced_run("(ab){3,}x") == 6 and forced_run(r"\x41\.com") == 5
    assert forced_run("(a(bc){2}d){2}") == 12 and forced_run("(?:a{100}){100}") == 10000



@pytest.mark.parametrize("pattern, run", [
    ("(?i)^0{19990}$", 19990), ("^(?i:x)0{19990}$", 19990), ("(?i)a0{5}", 5), (r"(?i)\x41{5}\x31{7}", 7),
    ("(?i)(?-i:b{5})", 5), ("(?i:ab)c{3}", 3), ("a(?i)b{4}|c{2}", 1), ("(?i)[a]{5}", 0),
    ("^[a]{19990}$", 19990), ("(?i)[0]{5}", 5), ("[^a]{5}", 0), ("[]]{5}", 0),
])
def test_a_case_insensitive_part_or_a_one_character_class_counts_what_it_forces(pattern, run):
    """`(?i` anywhere made the whole pattern force nothing, though under the flag a digit or a
    punctuation mark is still one character, and only within the flag's scope; `[a]` is `a`."""
    assert forced_run(pattern) == run


@pytest.mark.parametrize("pattern, run", [
    ("(?s:abcd){250}", 1000), ("(?-i:a){5}", 5), ("^[[:digit:]]{1100}$", 0), ("^[0-9&&[^5]]{1100}$", 0),
    (r"^(?:\U0001F600){1000}$", 1000), (r"^(x\da{600})+a{600}$", 600), (r"^(x\da{600}){2,3}a{600}$", 601),
    (r"^(x\da{600}){2}a{600}$", 1200),
])
def test_forced_run_counts_no_more_than_the_pattern_forces(pattern, run):
    """A flag group's `:`, a nested class's `]`, `\\U`'s eight hex digits were counted as forced
    characters, and so was a repeated part's last copy running on into what follows it, though
    another copy may start there: reasonable patterns refused as forcing more than 1,024."""
    assert forced_run(pattern) == run
    if run <= 1024:
        check_spec({"type": "regex", "pattern": pattern})


@pytest.mark.parametrize("spec, words", [
    ({"type": "regex", "pattern": "^a{20000}$"}, "the regex '^a{20000}$' forces a run of 20,000 fixed characters: "
                                                 "at most 1,024"),
    (schema_format({"type": "string", "pattern": "x" * 1025}), "the pattern 'xxxx"),
    ({"type": "grammar", "grammar": "start: /(ab){600}/"}, "the regex of rule start '(ab){600}' forces a run of "
                                                          "1,200 fixed characters"),
])
def test_a_regex_that_forces_a_longer_run_than_a_const_may_hold_is_refused(spec, words):
    """`^a{20000}$` (20,000 characters unrolled, within that bound) made each step's mask work out
    what is left of its run, as a const's string: 16 ms a step, ~1 s at worst. A regex's forced run
    is bounded as an enum or const string is (MAX_LITERAL_LENGTH); a class repeated is not a run."""
    with pytest.raises(GrammarError) as e:
        check_spec(spec)
    assert words in str(e.value) and "at most 1,024" in str(e.value)
    check_spec({"type": "regex", "pattern": "^[a-z]{20000}$"})
    check_spec({"type": "regex", "pattern": "^a{1024}$"})


def test_a_regex_ending_in_a_backslash_is_read_as_the_grammar_engine_reads_it():
    """Counting what a pattern forces stopped at a backslash with nothing after it: a KeyError out of
    the request's check (a 500), where the grammar engine takes the pattern (it drops the backslash)."""
    from pipeline_dsl.requests_io import parse_request

    assert regex_size("a\\") == 2 and forced_run("a\\") == 1
    assert check_spec({"type": "regex", "pattern": "a\\"}) == []
    assert parse_request({"prompt": "x", "guided_regex": "a\\"}).response_format["pattern"] == "a\\"


def test_a_guided_regex_forcing_a_long_run_is_a_400_naming_the_field():
    from pipeline_dsl.requests_io import RequestError, parse_request

    for field, value in (("guided_regex", "a" * 2000), ("structured_outputs", {"regex": "(ab){600}"})):
        with pytest.raises(RequestError, match="forces a run of") as e:
            parse_request({"prompt": "x", field: value})
        assert e.value.param == (field if field == "guided_regex" else "structured_outputs.regex")


@pytest.mark.parametrize("schema, words", [
    (HUGE_PATTERN, "the pattern '^(a{1000}){1000}$' is too complex to enforce"),
    ({"type": "object", "patternProperties": {"^(ab{1000}){100}$": {"type": "string"}}}, "too complex"),
    (SELF_REF, "$ref refers only to itself"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "only to itself"),
])
def test_unenforceable_schemas_are_refused_when_compiled_and_checked(engine, schema, words):
    spec = schema_format(schema)
    with pytest.raises(GrammarError, match="too complex|only to itself") as e:
        check_spec(spec)                                           # agp check: no tokenizer
    assert words in str(e.value)
    with pytest.raises(GrammarError):
        ConstraintCompiler(engine.tokenizer, engine.vocab_size).compile(spec)
    with pytest.raises(GrammarError, match="too complex"):
        check_spec({"type": "regex", "pattern": "(a{1000}){1000}"})


@pytest.mark.parametrize("grammar, words", [
    ("start: /(a{1000}){1000}/", "the regex of rule start '(a{1000}){1000}' is too complex to enforce: it unrolls "
                                 "to about 1,000,000 characters (at most 20,000)"),
    ('start: "x" A\nA: ("a"{1000}){1000}', "terminal A is too complex to enforce: it unrolls to about 1,000,000"),
    ('start: A\nA: B~1000\nB: ("ab" | C)~100..200\nC: /x{3}/', "terminal A is too complex to enforce"),
    ('start: "x"\n%ignore /(a{1000}){1000}/', "the regex '(a{1000}){1000}' is too complex"),
    ('start: %json {"type": "string", "pattern": "(a{1000}){1000}"}', "the %json schema's pattern '(a{1000}){1000}' "
                                                                       "is too complex to enforce"),
])
def test_a_grammars_regexes_and_terminals_are_bounded_as_a_patterns_are(grammar, words):
    """A Lark grammar's regexes (in a rule or a terminal), its terminals (one regex of the lexer each,
    made of the strings, regexes and terminals they name) and its %json schemas' patterns unroll
    to at most 20,000 characters, as a json_schema's pattern or a guided_regex: llguidance's lexer
    spent seconds and hundreds of MB on /(a{1000}){1000}/ at the answer's first mask, then gave up."""
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "grammar", "grammar": grammar})
    assert words in str(e.value)



def test_a_percent_json_schema_nested_past_what_python_reads_is_refused_naming_the_bound():
    """A %json schema nested 5,000 levels deep ran out of Python's recursion in reading its JSON
    (a RecursionError, a 500): refused as a schema nested past MAX_JSON_DEPTH is."""
    grammar = 'start: %json {"type":"array","default":' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "grammar", "grammar": grammar})
    assert "nests more than 124 levels of arrays and objects (at most 124)" in str(e.value)


def test_a_grammar_error_leaves_out_the_grammar_engines_listing_of_the_grammar():
    """llguidance writes the grammar's lines under its error: a tool_call's grammar is agp's own,
    megabytes of it; the client gets the error's own line."""
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "grammar", "grammar": 'start: "x" a\na: b'})
    assert str(e.value) == 'at 2(4): unknown name: "b"'


@pytest.mark.parametrize("grammar", [
    "start: /([ab]{100}){100}/ // not a regex: /(a{1000}){1000}/",
    'start: "a/b" A+ B\nA: "a"{1000} "a".."z" "//"\nB: /[0-9]{3}\\/x/',
    "root ::= [a-z]{1000} \"x\"",
])
def test_a_grammar_of_regexes_within_the_bound_is_taken(grammar):
    check_spec({"type": "grammar", "grammar": grammar})


def test_a_grammars_regex_beyond_the_bound_is_a_400_naming_guided_grammar_and_where(server):
    r = server.http.post(server.url + "/v1/completions", json={
        "prompt": "hi", "max_tokens": 8, "guided_grammar": "start: \"x\" A\nA: /(a{1000}){1000}/"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_grammar"
    assert err["message"].startswith("'guided_grammar' cannot be enforced: the regex of terminal A '(a{1000}){1000}' "
                                     "is too complex to enforce: it unrolls to about 1,000,000 characters"), err


@pytest.mark.parametrize("schema, words", [(HUGE_PATTERN, "too complex to enforce"),
                                           (SELF_REF, "refers only to itself")])
@pytest.mark.parametrize("stream", [False, True])
def test_unenforceable_response_format_is_a_400_naming_the_reason(server, schema, words, stream):
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = server.http.post(server.url + route, json={**body, "max_tokens": 8, "stream": stream,
                                                 "response_format": schema_format(schema)}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "'response_format' cannot be enforced" in err["message"] and words in err["message"]


def test_a_grammar_that_gives_up_mid_answer_fails_the_request_without_an_error_finish_reason(
        server, monkeypatch):
    """A matcher that refuses the answer's third token (as llguidance does when its lexer gives
    up on a schema mid-answer): the engine ends the sequence with its internal "error"; the
    client gets a 400, or on a stream an error event, never finish_reason "error"."""

    class GivesUp(constrain.Matcher):
        __slots__ = ("n",)

        def __init__(self, m, compiler):
            super().__init__(m, compiler)
            self.n = 0

        def accept(self, token_id):
            self.n += 1
            return super().accept(token_id) and self.n < 3

    monkeypatch.setattr(constrain, "Matcher", GivesUp)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16,
            "response_format": {"type": "json_object"}}
    r = server.http.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "cannot be enforced" in r.json()["error"]["message"], r.text
    with server.http.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    reasons = {c["finish_reason"] for chunk in chunks for c in chunk.get("choices", [])} - {None}
    assert reasons <= OPENAI_REASONS, reasons
    assert "cannot be enforced" in chunks[-1]["error"]["message"]
    monkeypatch.undo()
    ok = server.http.post(server.url + "/v1/chat/completions", json=body, timeout=60)    # the server goes on
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in OPENAI_REASONS


@pytest.mark.parametrize("field, value, message", [
    ("guided_json", {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
     "'guided_json' cannot be enforced: at #/properties/tags: Unimplemented keys: [\"uniqueItems\"]"),
    ("response_format", schema_format({"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"},
                                                                                       {"type": "number"}]}}}),
     "'response_format' cannot be enforced: at #/properties/v: oneOf whose branches can match the same value "
     "cannot be enforced (exactly one must match): use anyOf, or make the branches exclusive"),
    ("structured_outputs", {"json": False}, "'structured_outputs.json' cannot be enforced: the schema is false, "
                                            "which no value matches"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_where_in_it(server, field, value, message):
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, field: value}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == message


UNIQUE_TAGS = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
               {"type": "function", "function": {"name": "tag", "parameters": {
                   "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ok"}}])
def test_a_forced_call_whose_tool_parameters_cannot_be_enforced_is_a_400_naming_them(server, choice):
    """Any tool of a forced call (required, or named: the other tools too) whose parameters cannot be
    enforced: a 400 naming tools[i].function.parameters (OpenAI's param and code), without a grammar
    dump; with tool_choice auto the parameters only describe the tool in the prompt: not refused."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "tools": UNIQUE_TAGS}
    r = server.http.post(server.url + "/v1/chat/completions", json={**body, "tool_choice": choice}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": "'tools[1].function.parameters' cannot be enforced: tool 'tag': at #/properties/xs: "
                   "Unimplemented keys: [\"uniqueItems\"]",
        "type": "invalid_request_error", "param": "tools[1].function.parameters", "code": "invalid_function_parameters"}
    auto = server.http.post(server.url + "/v1/chat/completions", json={**body, "tool_choice": "auto"}, timeout=60).json()
    assert "error" not in auto or auto["error"]["param"] != "tools[1].function.parameters"   # (the tiny model's
    # context may not hold the tools' prompt)
    r = server.http.post(server.url + "/v1/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 8, "tool_choice": "required",
        "tools": [{"type": "function", **t["function"]} for t in UNIQUE_TAGS]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].parameters", r.text
    assert r.json()["error"]["message"].startswith("'tools[1].parameters' cannot be enforced: tool 'tag': ")


def test_a_forced_calls_tool_parameters_are_refused_when_the_request_is_read():
    """agp run's lines and agp serve's bodies alike: the check runs when the request is parsed,
    before it reaches any engine."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    line = {"messages": [{"role": "user", "content": "hi"}], "tools": UNIQUE_TAGS, "tool_choice": "required"}
    with pytest.raises(RequestError) as e:
        parse_request(line, default_id=0)
    assert e.value.param == "tools[1].function.parameters" and e.value.code == "invalid_function_parameters"
    assert "uniqueItems" in str(e.value)
    assert parse_request({**line, "tool_choice": "auto"}, default_id=0).tools == UNIQUE_TAGS
    with pytest.raises(RequestError) as e:
        parse_request({**line, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
                      default_id=0)
    assert e.value.param == "tools[0].function.parameters"



def _wide_tool(k: int, n: int) -> dict:
    props = {f"p{k}_{j}": {"type": "integer"} for j in range(n)}
    return {"type": "function", "function": {"name": f"f{k}", "parameters": {
        "type": "object", "properties": props, "required": list(props)}}}


def test_a_forced_calls_tools_are_bounded_together_as_one_schema():
    """The tools a forced call may write are one schema in its grammar: two tools of 2,600 properties
    each passed the bound of 5,000 in one schema, and four of 4,900 reached the grammar engine, which
    gave up with "schema too large" and a dump of the grammar. Past it together: a 400 naming
    `tools`; a named choice compiles only its own tool's."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    tools = [_wide_tool(0, 2600), _wide_tool(1, 2600)]
    line = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "required"}
    with pytest.raises(RequestError) as e:
        parse_request(line, default_id=0)
    assert e.value.param == "tools"
    assert str(e.value) == ("'tools' cannot be enforced: the tools' parameters have 5,200 properties in all: at most "
                            "5,000 in one call's tools, as in one schema")
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "tool_call", "tools": tools})
    assert e.value.param == "tools" and "5,200 properties in all" in str(e.value)
    named = {"type": "function", "function": {"name": "f1"}}
    assert parse_request({**line, "tool_choice": named}, default_id=0).tools == tools


class _NoGrammarEngine:
    """Stands in for llguidance where a spec must be refused before the grammar engine sees it."""

    def __getattr__(self, name):
        raise AssertionError(f"the grammar engine was asked for {name}")


def test_a_forced_calls_tools_are_counted_together_before_any_is_compiled(monkeypatch):
    """Four tools of 4,900 properties each: past the bound of 5,000 together, refused by a walk of
    their schemas before the grammar engine compiles any of them (it spent ~2 s compiling each
    before the count refused them), where the request is read and where its grammar is made; one
    tool past a bound alone is still named by its own field."""
    from pipeline_dsl import constraints
    from pipeline_dsl.requests_io import RequestError, parse_request

    monkeypatch.setattr(constraints, "llg", _NoGrammarEngine())
    tools = [_wide_tool(k, 4900) for k in range(4)]
    line = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "required"}
    with pytest.raises(RequestError) as e:
        parse_request(line, default_id=0)
    assert e.value.param == "tools" and "19,600 properties in all" in str(e.value)
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "tool_call", "tools": tools})
    assert e.value.param == "tools" and "19,600 properties in all" in str(e.value)
    alone = [_wide_tool(0, 2), _wide_tool(1, 5001)]
    with pytest.raises(RequestError) as e:
        parse_request({**line, "tools": alone}, default_id=0)
    assert e.value.param == "tools[1].function.parameters" and e.value.code == "invalid_function_parameters"
    assert str(e.value).startswith("'tools[1].function.parameters' cannot be enforced: tool 'f1': "), str(e.value)
    with pytest.raises(GrammarError) as e:
        check_spec({"type": "tool_call", "tools": alone})
    assert e.value.param == "tools[1].function.parameters" and str(e.value).startswith("tool 'f1': ")


@pytest.mark.parametrize("fields, named", [
    ({"guided_choice": ["yes", "x" * 60_000]}, "guided_choice"),
    ({"structured_outputs": {"choice": ["x" * 60_000]}}, "structured_outputs.choice"),
    ({"guided_json": {"type": "object", "required": ["r" * 60_000]}}, "guided_json"),
    ({"structural_tag": {"triggers": ["<f"], "structures": [{"begin": "<f>", "schema": {}, "end": "x" * 60_000}]}},
     "structural_tag"),
    ({"guided_grammar": 'root ::= "' + "x" * 60_000 + '"'}, "guided_grammar"),
    ({"tools": [{"type": "function", "function": {"name": "n" * 60_000}}], "tool_choice": "required"},
     "tools[0].function.name"),
])
def test_a_string_the_answer_must_write_whole_past_its_bound_is_refused_naming_the_field(fields, named):
    """A choice's string, a required name, a structure's end, a grammar's literal or a forced tool's name
    of 60,000 characters (each step's mask 15-28 ms, which the batch's other answers wait for) is a
    RequestError naming the field the request wrote, when the request is read."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    with pytest.raises(RequestError) as e:
        parse_request({"messages": [{"role": "user", "content": "hi"}], **fields}, default_id=0)
    assert e.value.param == named
    assert str(e.value).startswith(f"'{named}' cannot be enforced: ")
    assert "60,000 characters: at most 1,024" in str(e.value)


def test_a_long_tool_name_the_call_cannot_write_is_taken():
    """Under tool_choice auto, or a forced call of another tool, a long name is not written by the
    constrained decoder: the request is taken."""
    from pipeline_dsl.requests_io import parse_request

    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "n" * 60_000}}]
    for choice in ("auto", {"type": "function", "function": {"name": "f"}}):
        req = parse_request({"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": choice},
                            default_id=0)
        assert req.tools == tools


@pytest.fixture(scope="module")
def long_server(long_gguf):
    """The tiny model with a context of 4096 tokens and the KV room for it: room for a tool prompt
    of 30,000 characters, which a 512-token context refuses by its characters before anything else
    is looked at."""
    from test_serve import TINY, LiveServer

    s = LiveServer(long_gguf, text=TINY.format(model=long_gguf, max_queue=1024, max_batch_size=8, timeout=1)
                   .replace("budget = 1MiB", "budget = 4MiB"))
    yield s
    s.close()


def test_a_forced_calls_tool_the_engine_gives_up_on_names_its_parameters(long_server):
    """A tool's parameters that only the engine's walk with the model's tokens refuses (an object
    of 500 optional properties open to more: llguidance gives up after its "{"): the 400 names them, with
    OpenAI's code for them, as the check when the request is read gives it."""
    server = long_server
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    tools = [UNIQUE_TAGS[0], {"type": "function", "function": {"name": "many", "parameters": many}}]
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "tools": tools,
        "tool_choice": "required"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("tools[1].function.parameters", "invalid_function_parameters")
    assert err["message"].startswith("'tools[1].function.parameters' cannot be enforced: tool 'many': the grammar "
                                     "engine gives up on it at output token 1")
    r = server.http.post(server.url + "/v1/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 8, "tool_choice": "required",
        "tools": [{"type": "function", **t["function"]} for t in tools]})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("tools[1].parameters",
                                                                       "invalid_function_parameters")


def test_schema_true_is_any_json_value(server):
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0,
        "response_format": schema_format(True)}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_grammar_engine_gives_up_on_is_a_400_before_any_token(server, stream):
    many = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
            "additionalProperties": {"type": "integer"}}
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream,
        "response_format": schema_format(many)}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format"
    assert err["message"].startswith("'response_format' cannot be enforced: the grammar engine gives up on it at "
                                     "output token 1 (")


COSTLY = [     # (schema, the start of its 400's message after "'response_format' cannot be enforced: ")
    ({"type": "object", "properties": {"a": {"enum": ["x" * 1000 + str(i) for i in range(2000)]}}},    # 2 MB
     "at #/properties/a: 'enum': the schema's enum and const values come to more than 262,144 characters"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}},
     "'properties': the schema's objects have more than 5,000 properties in all"),
    ({"const": "x" * 250_000},                                         # ~0.26 s of each step's mask
     "'const' has a string of 250,000 characters: at most 1,024 in one value"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}},
     "'properties' has 600 optional properties (not in 'required'): at most 500 in one object"),
]


@pytest.mark.parametrize("schema, says", COSTLY)
@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_past_the_literal_or_property_bounds_is_a_400_naming_the_keyword(server, schema, says, stream):
    """A 2 MB enum, a const whose string costs a quarter of a second every step, or more properties
    than the bounds allow: a 400 naming the keyword and where
    (the request's check counts them before the grammar engine sees the schema), and the server
    answers the next request as before."""
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream,
        "response_format": schema_format(schema)}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format"
    assert err["message"].startswith("'response_format' cannot be enforced: " + says), err["message"]
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


MANY = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(500)},
        "additionalProperties": {"type": "integer"}}   # gives up after "{"
ENGINE_REFUSES = [        # (path, the request's structured-output fields, the field its 400 names)
    ("/v1/chat/completions", {"guided_json": MANY}, "guided_json"),
    ("/v1/chat/completions", {"structured_outputs": {"json": MANY}}, "structured_outputs.json"),
    ("/v1/completions", {"guided_grammar": "start: %json " + json.dumps(MANY)}, "guided_grammar"),
    ("/v1/completions", {"structured_outputs": {"grammar": "start: %json " + json.dumps(MANY)}},
     "structured_outputs.grammar"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "x", "schema": MANY}}}, "text.format"),
]


@pytest.mark.parametrize("path, fields, named", ENGINE_REFUSES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_spec_only_the_engine_refuses_is_a_400_naming_the_field_the_client_sent(server, path, fields, named,
                                                                                   stream):
    """A spec the request's check takes but the engine's compile with the model's tokens refuses
    (llguidance gives up after the "{" of 500 optional properties open to more): its 400 names the field
    the client wrote the spec in, as the check's own 400 does, not response_format, which is what
    the engine calls every request's constraint."""
    spec = {"type": "json_schema", "schema": MANY} if "json" in named or named == "text.format" else \
        {"type": "grammar", "grammar": "start: %json " + json.dumps(MANY)}
    check_spec(spec)                                              # the request's check takes it
    body = ({"input": "hi", "max_output_tokens": 8} if path == "/v1/responses" else
            {"prompt": "hi", "max_tokens": 8} if path == "/v1/completions" else
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    r = server.http.post(server.url + path, json={**body, **fields, "stream": stream}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == named, err
    assert err["message"].startswith(f"'{named}' cannot be enforced: the grammar engine gives up on it at output "
                                     "token 1 ("), err


def test_an_agp_run_line_whose_spec_only_the_engine_refuses_names_its_field(tmp_path, tiny_gguf):
    from flowkit import run_lines
    from test_serve import TINY

    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=1), encoding="utf-8")
    rows = run_lines(path, [{"prompt": "hi", "max_tokens": 8, "guided_json": MANY},
                            {"prompt": "hi", "max_tokens": 8, "structured_outputs": {"json": MANY}},
                            {"prompt": "hi", "max_tokens": 8, "response_format": schema_format(MANY)}])
    for row, named in zip(rows, ("guided_json", "structured_outputs.json", "response_format")):
        assert row["error"]["param"] == named, row
        assert row["error"]["message"].startswith(f"'{named}' cannot be enforced: the grammar engine gives up"), row


def test_a_schema_is_checked_off_the_event_loop(server, monkeypatch):
    """Checking a response_format schema can take seconds of CPU (an object of thousands of
    properties): done on the event loop it would stall every other stream for as long."""
    from pipeline_dsl import requests_io

    threads = []

    def check(spec, **kw):
        threads.append(threading.current_thread())
        return check_spec(spec, **kw)

    monkeypatch.setattr(requests_io, "check_spec", check)
    schema = {"type": "object", "properties": {"off_the_loop": {"type": "boolean"}}, "required": ["off_the_loop"]}
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/v1/completions", {"prompt": "hi"})):
        r = server.http.post(server.url + route, json={**body, "max_tokens": 12, "response_format": schema_format(schema)},
                       timeout=60)
        assert r.status_code == 200, r.text
        schema["properties"]["x"] = {"type": "null"}       # a new schema: the check is cached
    r = server.http.post(server.url + "/v1/responses", timeout=60, json={
        "input": "hi", "max_output_tokens": 12, "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert len(threads) == 3 and server.thread not in threads


def test_structured_outputs_options_are_followed(server):
    """disable_any_whitespace: answers without whitespace (the same requests without it have
    some); disable_additional_properties: objects as open as the schema leaves them (the
    random model writes properties of its own); disable_fallback is taken (one backend)."""
    schema = {"type": "object", "properties": {k: {"type": "boolean"} for k in "abcd"}, "required": list("abcd")}

    def answers(**options) -> list[tuple[str, str]]:
        r = server.http.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "temperature": 1, "seed": 3, "n": 4,
            "structured_outputs": {"json": schema, **options}}, timeout=60)
        assert r.status_code == 200, r.text
        return [(c["finish_reason"], c["message"]["content"]) for c in r.json()["choices"]]

    closed, compact = answers(), answers(disable_any_whitespace=True)
    for reason, text in closed + compact:
        assert reason == "stop" and set(json.loads(text)) == set("abcd"), text
    assert any(" " in text for _, text in closed) and not any(" " in text for _, text in compact)
    opened = answers(disable_additional_properties=True, disable_fallback=True)
    assert any(reason == "length" or set(json.loads(text)) - set("abcd") for reason, text in opened), opened


def test_open_and_compact_objects_on_request(engine):
    """disable_additional_properties: true leaves objects as open as JSON Schema does (vLLM's
    guidance backend), disable_any_whitespace: true writes no whitespace."""
    compiler = ConstraintCompiler(engine.tokenizer, engine.vocab_size)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    def accepts(spec, text):
        m = compiler.compile(spec).matcher()
        return all(m.accept(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) and m.can_end()

    spec = {"type": "json_schema", "schema": schema}
    assert not accepts(spec, '{"a": 1, "b": 2}') and accepts({**spec, "close_objects": False}, '{"a": 1, "b": 2}')
    assert accepts(spec, '{"a": 1}') and not accepts({**spec, "compact": True}, '{"a": 1}')
    assert accepts({**spec, "compact": True}, '{"a":1}') and not accepts({"type": "json_object", "compact": True}, "{ }")
    with pytest.raises(GrammarError, match="true or false"):
        compiler.compile({**spec, "compact": "yes"})


def whitespace_runs(text: str) -> list[str]:
    """The runs of whitespace of a JSON text between its tokens (outside its strings)."""
    runs, run, in_string, escaped = [], "", False, False
    for ch in text:
        if in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch in " \t\n\r":
            run += ch
            continue
        else:
            in_string = ch == '"'
        if run:
            runs.append(run)
        run = ""
    return runs + ([run] if run else [])


def test_whitespace_pattern_sets_the_whitespace_between_a_json_answers_tokens(server):
    """outlines' JsonSchema(whitespace_pattern=...) sends structured_outputs.whitespace_pattern, vLLM's
    older clients guided_whitespace_pattern: the whitespace between the answer's JSON tokens is
    none or one match of the pattern (newlines and tabs here, which agp's default of at most one
    space never writes), in a JSON Schema's, json_object's and a JSON response_format's answers."""
    pattern = r"\n\t{0,2}"
    schema = {"type": "object", "properties": {k: {"type": "array", "items": {"type": "integer"}} for k in "abc"},
              "required": list("abc")}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120, "temperature": 1, "seed": 5, "n": 4}
    bodies = [("chat/completions", {**chat, "structured_outputs": {"json": schema, "whitespace_pattern": pattern}}),
              ("chat/completions", {**chat, "structured_outputs": {"json_object": True, "whitespace_pattern": pattern}}),
              ("chat/completions", {**chat, "response_format": schema_format(schema),
                                    "guided_whitespace_pattern": pattern}),
              ("completions", {"prompt": "hi", "max_tokens": 120, "temperature": 1, "seed": 5, "n": 4,
                               "guided_json": schema, "guided_whitespace_pattern": pattern})]
    for route, body in bodies:
        r = server.http.post(f"{server.url}/v1/{route}", json=body, timeout=120)
        assert r.status_code == 200, r.text
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in r.json()["choices"]]
        runs = [run for text in texts for run in whitespace_runs(text)]
        assert runs and all(re.fullmatch(pattern, run) for run in runs), (body, texts)
        for choice, text in zip(r.json()["choices"], texts):
            if choice["finish_reason"] == "stop":
                json.loads(text)


@pytest.mark.parametrize("body, param, words", [
    ({"structured_outputs": {"regex": "[a-z]+", "whitespace_pattern": r"\n"}}, "structured_outputs.whitespace_pattern",
     "a regex answer is not JSON"),
    ({"guided_choice": ["a", "b"], "guided_whitespace_pattern": r"\n"}, "guided_whitespace_pattern",
     "a choice answer is not JSON"),
    ({"guided_whitespace_pattern": r"\n"}, "guided_whitespace_pattern", "give it with guided_json"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "x"}},
     "structured_outputs.whitespace_pattern", "matches more than JSON's whitespace"),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": r"\s*"}, "guided_whitespace_pattern",
     "matches more than JSON's whitespace"),
    ({"structured_outputs": {"json_object": True, "whitespace_pattern": "(\n"}},
     "structured_outputs.whitespace_pattern", "is not a regular expression: unclosed group"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "[ ]{0,50000}"}},
     "structured_outputs.whitespace_pattern", "too complex to enforce"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": 5}},
     "structured_outputs.whitespace_pattern", "must be a regular expression"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": r"\n", "disable_any_whitespace": True}},
     "structured_outputs.whitespace_pattern", "not both"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": r"\n"}, "guided_whitespace_pattern": " "},
     "guided_whitespace_pattern", "differ"),
])
def test_a_whitespace_pattern_that_cannot_apply_is_a_400_naming_it(server, body, param, words):
    """Where no JSON is written, beside disable_any_whitespace, or a pattern that is no regex, too
    large, or matches more than JSON's whitespace (the answer would not parse): a 400 naming the field."""
    r = server.http.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("char", ["\f", "\v", "\u00a0", "\u2028", "\u3000"])
def test_a_whitespace_pattern_may_match_only_jsons_four_whitespace_characters(char):
    """Space, tab, newline and carriage return are JSON's whitespace (RFC 8259); a form feed, a
    vertical tab or a Unicode space between tokens makes the answer's JSON invalid."""
    from pipeline_dsl.constraints import check_whitespace
    check_whitespace("[ \t\n\r]{0,4}")
    for pattern in (f"[ {char}]*", f"\\n{char}?"):
        with pytest.raises(GrammarError, match="matches more than JSON's whitespace"):
            check_whitespace(pattern)

def test_a_json_specs_whitespace_is_none_or_one_match_of_its_pattern(engine):
    """The compiler's "whitespace" (vLLM's whitespace_pattern) on each spec that writes JSON: between
    two tokens nothing or one match of it, nothing else (not agp's default space)."""
    compiler = ConstraintCompiler(engine.tokenizer, engine.vocab_size)

    def accepts(spec, text):
        m = compiler.compile(spec).matcher()
        return all(m.accept(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)) and m.can_end()

    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    for spec in ({"type": "json_schema", "schema": schema}, {"type": "json_object"}):
        tabbed = {**spec, "whitespace": r"\n\t*"}
        assert accepts(tabbed, '{\n\t"a":\n[1,\n\t\t2]\n}') and accepts(tabbed, '{"a":[1]}')
        assert not accepts(tabbed, '{ "a": [1]}') and not accepts(tabbed, '{\n\n"a":[1]}')
        assert accepts(spec, '{ "a": [1]}') and not accepts(spec, '{\n"a":[1]}')
    tag = {"type": "structural_tag", "triggers": ["<f>"],
           "structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "whitespace": r"\n"}
    assert accepts(tag, 'so <f>{\n"a":[1]}</f>') and not accepts(tag, 'so <f>{ "a":[1]}</f>')
    for bad, words in (("x", "matches more than JSON's whitespace"), ("(", "not a regular expression")):
        with pytest.raises(GrammarError, match=words):
            compiler.compile({"type": "json_object", "whitespace": bad})
    with pytest.raises(GrammarError, match="not both"):
        check_spec({"type": "json_object", "whitespace": r"\n", "compact": True})


def test_new_specs_compile_at_most_the_grammar_slots_at_once_off_the_threads_other_requests_need(server, monkeypatch):
    """Many distinct new specs arrive together and each engine compile is held (a gate in Grammar):
    at most MAX_GRAMMAR_WORK compile at once, none on the host pool that tokenises the other
    requests or on the engine's loop, so a plain request is answered while they are held; two
    equal specs among them are compiled once; all are answered once the compiles go on."""
    import uuid

    from pipeline_dsl import constraints

    lock, entered, gate = threading.Lock(), threading.Semaphore(0), threading.Event()
    inside, most, threads, built = [0], [0], set(), []

    class Held(constrain.Grammar):
        def __init__(self, compiler, text):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                threads.add(threading.current_thread().name)
                built.append(text)
            entered.release()
            gate.wait()
            try:
                super().__init__(compiler, text)
            finally:
                with lock:
                    inside[0] -= 1

    monkeypatch.setattr(constrain, "Grammar", Held)
    slots = constraints.MAX_GRAMMAR_WORK
    same = {"type": "object", "properties": {f"same_{uuid.uuid4().hex}": {"type": "integer"}}}
    schemas = [same, json.loads(json.dumps(same))] + [
        {"type": "object", "properties": {f"k_{uuid.uuid4().hex}": {"type": "string"}}} for _ in range(slots + 4)]
    answers: list = [None] * len(schemas)

    def ask(i):
        answers[i] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": schema_format(schemas[i])})

    asking = [threading.Thread(target=ask, args=(i,)) for i in range(len(schemas))]
    try:
        for t in asking:
            t.start()
        for _ in range(slots):
            entered.acquire()
        plain = server.http.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert plain.status_code == 200, plain.text
        with lock:
            assert inside[0] == slots
    finally:
        gate.set()
        for t in asking:
            t.join()
    assert [a.status_code for a in answers] == [200] * len(schemas)
    assert most[0] == slots
    assert not any(name.startswith(("agp-items", "agp-engine", "agp-serial")) for name in threads), threads
    assert len(built) == len(set(built)) == len(schemas) - 1        # the equal pair: one compile


def test_requests_waiting_on_one_specs_compile_leave_threads_for_other_new_specs(server, monkeypatch):
    """One new spec's compile is held and four more requests of the same spec arrive: they wait
    for its result, and while they wait a request of another new spec still takes a grammar slot
    and compiles (the waiters once held every compile thread, and every other new spec queued
    behind one slow compile)."""
    import uuid

    held_text, entered, gate = [], threading.Semaphore(0), threading.Event()

    class Held(constrain.Grammar):
        def __init__(self, compiler, text):
            entered.release()
            if not held_text:
                held_text.append(text)
            if text == held_text[0]:
                gate.wait()
            super().__init__(compiler, text)

    monkeypatch.setattr(constrain, "Grammar", Held)
    slow = {"type": "object", "properties": {f"slow_{uuid.uuid4().hex}": {"type": "integer"}}}
    other = {"type": "object", "properties": {f"other_{uuid.uuid4().hex}": {"type": "string"}}}
    answers: dict = {}

    def ask(name, schema):
        answers[name] = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": schema_format(schema)})

    asking = [threading.Thread(target=ask, args=("slow", slow))]
    try:
        asking[0].start()
        assert entered.acquire(timeout=60)                  # the slow spec compiles, held
        for i in range(4):
            asking.append(threading.Thread(target=ask, args=(f"same{i}", slow)))
            asking[-1].start()
        asking.append(threading.Thread(target=ask, args=("other", other)))
        asking[-1].start()
        asking[-1].join(60)
        assert answers.get("other") is not None and answers["other"].status_code == 200
        assert "slow" not in answers
    finally:
        gate.set()
        for t in asking:
            t.join()
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 200)

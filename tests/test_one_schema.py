"""One schema per field: `agp check`, `agp run`'s request lines, `agp serve`'s bodies,
SamplingParams and EngineConfig accept and reject the same values, at both ends of every
range (stages/fields.py)."""
from __future__ import annotations

import dataclasses
import json

import pytest

import pipeline_dsl
from pipeline_dsl.engine.config import EngineConfig, SamplingParams
from pipeline_dsl.engine.errors import InputError
from pipeline_dsl.parser import quote
from pipeline_dsl.requests_io import (INTEGER_FIELDS, KNOWN, NOT_NULL, RequestError, parse_line, parse_request,
                                      spec_problem)
from pipeline_dsl.serve import embeddings as E
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve import responses as R
from stages.fields import ENGINE_FIELDS, REQUEST_FIELDS, param_of
from stages.registry import BOOL, DURATION, ENUM, INT, LIST_STR, SIZE, STR

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PIPELINE = """
pipeline p {{
    stage request : requests      {{ {requests} }}
    stage batch   : dynamic_batch {{ {dynamic_batch} }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ {kv_lookup} }}
    stage gen     : generate      {{ {generate} }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


def literal(value, ptype) -> str:
    """A JSON value written as an .agp literal (durations in seconds, sizes in bytes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if ptype == DURATION and isinstance(value, (int, float)):
        return f"{value!r}s"
    if ptype == SIZE and isinstance(value, (int, float)):
        return f"{value!r}B"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v, None) for v in value) + "]"
    raise TypeError(value)


def candidates(p) -> list:
    """Values at and just beyond each bound, and values of the wrong types."""
    if p.type == BOOL:
        return [True, False, 1, "yes"]
    if p.type == ENUM:
        return list(p.choices) + ["nope", 3]
    if p.type == LIST_STR:
        return ["x", ["a", "b"], [], [""], [1], ["a"] * p.max_items, ["a"] * (p.max_items + 1),
                ["x" * p.max_length], ["x" * (p.max_length + 1)], 5]
    if p.type == STR:
        return ["x", 5]
    out = ["text", True, [1]]
    step = 1 if p.type in (INT, SIZE) else 1e-9
    for bound in (p.min, p.max):
        if bound is not None:
            out += [bound, bound - step, bound + step]
    mid = ((p.min or 0) + (p.max if p.max is not None else 100)) / 2
    out.append(int(mid) if p.type in (INT, SIZE) else float(mid))
    return out


def accepts_check(kind: str, name: str, value) -> bool:
    p = param_of(kind, name)
    params = {"requests": "", "dynamic_batch": "", "kv_lookup": "", "generate": ""}
    params[kind] = f"{name} = {literal(value, p.type)}"
    if (kind, name) == ("kv_lookup", "budget"):     # the range alone: one 1-token block (45KiB) fits any
        params[kind] += "  block_size = 1"            # budget in it; the model's block is checked apart
    _, diags = pipeline_dsl.loads(PIPELINE.format(**params), "t.agp")
    return not any(d.is_error for d in diags)


def accepts_run(field: str, value) -> bool:
    try:
        parse_request(json.loads(json.dumps({"prompt": "x", field: value})))
        return True
    except RequestError:
        return False


def serve_body(body: dict) -> dict:
    """`body` as agp serve reads it: its JSON text (P.parse_json)."""
    return P.parse_json(json.dumps(body).encode())


def accepts_serve(field: str, value) -> bool:
    try:
        P.parse_completion(serve_body({"prompt": "x", field: value}), max_model_len=1 << 21, served=("p",))
        return True
    except P.APIError:
        return False


def accepts_engine(field: str, value) -> bool:
    if field == "n":
        return accepts_run(field, value)
    try:
        SamplingParams(**{field: value}).check()
        return True
    except (InputError, TypeError, ValueError):
        return False


CASES = [(f, v) for f, (k, n) in REQUEST_FIELDS.items() for v in candidates(param_of(k, n))]


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f}={json.dumps(v)[:24]}" for f, v in CASES])
def test_check_run_serve_and_the_engine_agree_on_every_request_field(field, value):
    kind, name = REQUEST_FIELDS[field]
    verdicts = {"check": accepts_check(kind, name, value), "run": accepts_run(field, value),
                "serve": accepts_serve(field, value), "engine": accepts_engine(field, value)}
    assert len(set(verdicts.values())) == 1, verdicts


ENGINE_CASES = [(f, v) for f, (k, n) in ENGINE_FIELDS.items() for v in candidates(param_of(k, n))
                if not isinstance(v, (str, list)) or param_of(k, n).type in (ENUM, STR)]


@pytest.mark.parametrize("field, value", ENGINE_CASES,
                         ids=[f"{f}={json.dumps(v)[:24]}" for f, v in ENGINE_CASES])
def test_check_and_engine_config_agree_on_every_engine_field(field, value):
    kind, name = ENGINE_FIELDS[field]
    try:
        EngineConfig(**{field: value})
        engine_ok = True
    except InputError:
        engine_ok = False
    assert accepts_check(kind, name, value) == engine_ok, (field, value)


def test_the_bounds_are_inclusive_except_where_the_schema_says_not():
    assert accepts_run("temperature", 2) and not accepts_run("temperature", 2.0000001)
    assert accepts_run("top_p", 1) and not accepts_run("top_p", 0) and accepts_run("top_p", 1e-9)
    assert accepts_run("n", 64) and not accepts_run("n", 65) and accepts_run("n", 1) and not accepts_run("n", 0)
    assert accepts_check("generate", "max_new_tokens", 1 << 20)
    assert not accepts_check("generate", "max_new_tokens", (1 << 20) + 1)


TOKEN_ID_CASES = [[5], [0, 7, 7], list(range(1 << 18)), [], [-1], [1, True], [1.0], [1.5], "5", 5, {"5": 1},
                  [1] * ((1 << 18) + 1)]


@pytest.mark.parametrize("value", TOKEN_ID_CASES, ids=[json.dumps(v)[:24] for v in TOKEN_ID_CASES])
def test_run_serve_and_the_engine_agree_on_allowed_token_ids(value):
    verdicts = {"run": accepts_run("allowed_token_ids", value), "serve": accepts_serve("allowed_token_ids", value),
                "engine": accepts_engine("allowed_token_ids", value)}
    assert len(set(verdicts.values())) == 1, verdicts


def test_a_size_is_a_whole_number_of_bytes():
    """A size field (kv_budget_bytes) takes a whole number of bytes, 1048576.0 as 1048576; half a
    byte is refused with the field's words, not passed on to the KV pool's arithmetic."""
    EngineConfig(kv_budget_bytes=float(1 << 20))
    with pytest.raises(InputError, match="'kv_budget_bytes' must be a number of bytes"):
        EngineConfig(kv_budget_bytes=(1 << 20) + 0.5)


INT_FIELDS = [f for f, (k, n) in REQUEST_FIELDS.items() if param_of(k, n).type == INT]


def in_range(p) -> int:
    """A small integer inside `p`'s range (a double holds it exactly): 2, or its bound nearer 2."""
    n = 2 if p.min is None else max(2, p.min)
    return n if p.max is None else min(n, p.max)


@pytest.mark.parametrize("field", INT_FIELDS)
def test_an_integer_field_takes_a_whole_float_as_that_integer_in_run_serve_and_the_engine(field):
    """N.0 (as JSON encoders that write every number as a double send N) is N in a request line, an
    agp serve body and SamplingParams, as vLLM's pydantic models take it: an int from where it is read
    on. N.5 is refused everywhere, with the field's words; agp check refuses N.0 in a .agp file too,
    with 'write N' (a decimal written in the pipeline's own source is a typo to fix, not a client's
    encoder)."""
    kind, name = REQUEST_FIELDS[field]
    n = in_range(param_of(kind, name))
    line = parse_line(json.dumps({"prompt": "x", field: float(n)}), 1).item()
    served = P.parse_completion(serve_body({"prompt": "x", field: float(n)}), max_model_len=1 << 21,
                                served=("p",)).item("r")
    assert line[field] == served[field] == n and type(line[field]) is type(served[field]) is int
    if field != "n":
        engine = getattr(SamplingParams(**{field: float(n)}), field)
        assert engine == n and type(engine) is int
    assert accepts_engine(field, float(n))
    half = n + 0.5
    assert not any((accepts_check(kind, name, half), accepts_run(field, half), accepts_serve(field, half),
                    accepts_engine(field, half)))
    with pytest.raises(RequestError, match=rf"^'{field}' must be an integer .*, not {half}$"):
        parse_request({"prompt": "x", field: half})
    _, diags = pipeline_dsl.loads(PIPELINE.format(requests="", dynamic_batch="", kv_lookup="",
                                                  generate=f"{name} = {float(n)!r}"), "t.agp")
    assert [(d.message, d.hint) for d in diags if d.is_error] == [
        (f"'{name}' is an integer, not the decimal '{float(n)!r}'", f"write {n}")]


def outcome(parse, body: dict) -> str:
    """What `parse` makes of `body` (its result as JSON text, where 4 and 4.0 differ), or "refused"."""
    try:
        got = parse(body)
    except (P.APIError, RequestError):
        return "refused"
    if dataclasses.is_dataclass(got):
        got = dataclasses.asdict(got)
    return json.dumps(got, sort_keys=True, default=repr)


SERVED = {"max_model_len": 1 << 21, "served": ("p",)}
# every route's body (read from its JSON text, as agp serve reads it) and agp run's line: the fields
# it takes, the body a field is added to (a prompt's own field given alone), how it is parsed
ROUTES = {
    "completions": (P.COMPLETION_FIELDS, {"prompt": "x"}, lambda b: P.parse_completion(serve_body(b), **SERVED)),
    "chat": (P.CHAT_FIELDS, CHAT, lambda b: P.parse_chat(serve_body(b), **SERVED)),
    "responses": (R.FIELDS, {"input": "x"}, lambda b: R.parse_responses(serve_body(b), **SERVED)),
    "embeddings": (E.FIELDS, {"input": "x"}, lambda b: E.parse_request(serve_body(b), **SERVED)),
    "detokenize": ({"tokens"}, {}, lambda b: P.parse_detokenize(serve_body(b), served=("p",))),
    "run": (KNOWN, {"prompt": "x"}, lambda b: parse_line(json.dumps(b), 1).item()),
}
PROMPTS = ("prompt", "messages", "prompt_token_ids", "input")


def value_of(value) -> int:
    """The first integer of `value` (an integer, or token ids: a list, a batch of lists)."""
    return value_of(value[0]) if isinstance(value, list) else value


def shaped(value, number):
    """`value` (an integer, or token ids: a list, a batch of lists) with its first integer `number`."""
    if isinstance(value, list):
        return [shaped(value[0], number), *value[1:]]
    return number


@pytest.mark.parametrize("route", ROUTES)
def test_every_integer_field_of_every_route_takes_a_whole_float_as_that_integer(route):
    """Walks every field a route takes: one that takes an integer (or token ids) and refuses it
    with half more or half less (an integer field, not a number field at its bound) takes its whole
    float as the integer itself: the same request, to the type of every value it carries. Each is
    in INTEGER_FIELDS, the one table read where a body or a line is."""
    fields, base, parse = ROUTES[route]
    integer, wrong = set(), []
    for field in sorted(fields):
        start = {} if field in PROMPTS else base
        for value in (1, 0, 2, -1, [1, 2], [[1, 2], [3]]):
            took = outcome(parse, {**start, field: value})
            if took == "refused":
                continue
            n = value_of(value)
            if all(outcome(parse, {**start, field: shaped(value, n + d)}) == "refused" for d in (0.5, -0.5)):
                integer.add(field)
                if outcome(parse, {**start, field: shaped(value, float(n))}) != took:
                    wrong.append((field, value))
            break
    assert not wrong, wrong
    # a number field taken only at one value (length_penalty 1.0) refuses half more and less too
    one_number = {f for f, (allowed, _) in P.NEUTRAL.items() if allowed and all(type(a) is float for a in allowed)}
    assert integer and integer - one_number <= set(INTEGER_FIELDS), integer - one_number - set(INTEGER_FIELDS)


def test_a_python_stages_logit_bias_keyed_by_whole_floats_is_keyed_by_ids():
    """A request a python stage hands back is read as a line is: a logit_bias key 5.0 (a Python
    object's; JSON's keys are strings, and "5.0" stays refused, as vLLM's int("5.0") refuses it)."""
    assert parse_request({"prompt": "x", "logit_bias": {5.0: 10}}).sampling["logit_bias"] == {5: 10.0}
    with pytest.raises(RequestError, match="'logit_bias' keys must be token ids"):
        parse_request({"prompt": "x", "logit_bias": {"5.0": 10}})


@pytest.mark.parametrize("value, words", [(4.5, "4.5"), (True, "true"), ("4", '"4"')])
def test_a_fraction_a_bool_or_a_numeric_string_stays_refused_in_its_own_words(value, words):
    msg = f"'max_tokens' must be an integer from 1 to 1048576, not {words}"
    with pytest.raises(P.APIError, match=f"^{msg}$"):
        P.parse_completion(serve_body({"prompt": "x", "max_tokens": value}), **SERVED)
    with pytest.raises(RequestError, match=f"^{msg}$"):
        parse_line(json.dumps({"prompt": "x", "max_tokens": value}), 1)
    for text in (b'{"prompt": "x", "max_tokens": 1e400}', b'{"prompt": "x", "max_tokens": NaN}'):
        with pytest.raises(P.APIError, match="holds (Infinity|NaN) in 'max_tokens', which JSON has no value for"):
            P.parse_json(text)
        with pytest.raises(RequestError, match="holds (Infinity|NaN) in 'max_tokens', which JSON has no value for"):
            parse_line(text.decode(), 1)


def test_allowed_token_ids_may_hold_exactly_its_most_ids():
    most = 1 << 18
    assert accepts_run("allowed_token_ids", list(range(most)))
    assert not accepts_run("allowed_token_ids", [1] * (most + 1))


# agp serve's chat and completions bodies and agp run's lines: one table of fields (requests_io)
SERVE_FIELDS = sorted((P.CHAT_FIELDS | P.COMPLETION_FIELDS) - {"prompt", "messages"})


@pytest.mark.parametrize("field", SERVE_FIELDS)
def test_a_run_line_takes_every_field_an_agp_serve_body_takes(field):
    """A field agp serve's bodies know is never an 'unknown field' of a request line (null is a
    field left out; a priority is never null)."""
    base = CHAT if field in P.CHAT_FIELDS - P.COMPLETION_FIELDS else {"prompt": "x"}
    parse_request({**base, field: 0 if field in NOT_NULL else None})


def accepts_serve_chat(fields: dict) -> bool:
    try:
        P.parse_chat(serve_body({**CHAT, **fields}), max_model_len=1 << 21, served=("p",))
        return True
    except P.APIError:
        return False


def accepts_run_chat(fields: dict) -> bool:
    try:
        parse_request(json.loads(json.dumps({**CHAT, **fields})))
        return True
    except RequestError:
        return False


# vLLM's structural tag: after each "@", f( then a JSON object then )
AT_TAG = {"type": "structural_tag", "triggers": ["@"],
          "structures": [{"begin": "@f(", "end": ")", "schema": {"type": "object"}}]}
# fields a line ignores, takes only at a neutral value (null, for a feature agp lacks), or turns into
# a constraint: a value agp serve's chat bodies take, then values each refuses
SERVED_ALIKE = {
    "user": ["u", 5], "safety_identifier": ["s", []], "prompt_cache_key": ["k", 1.5], "store": [False, "no"],
    "service_tier": ["auto", 1], "request_id": ["req-1", "", "a b", "x" * 129], "stream": [True, False, "yes"],
    "guided_decoding_backend": ["xgrammar", 1], "reasoning_effort": ["low", "none", "xhigh", "max", "maximum", 3],
    "prompt_cache_retention": ["24h", "1h"], "prompt_cache_options": [{"mode": "implicit"}, {"mode": "x"}],
    "best_of": [1, 2], "suffix": ["", "x"], "use_beam_search": [False, True], "length_penalty": [1, 1.0, 2],
    "vllm_xargs": [{}, {"a": 1}], "documents": [None, [{"text": "x"}]], "functions": [None, [{"name": "f"}]],
    "function_call": [None, "auto"], "audio": [None, {}], "modalities": [["text"], ["audio"]],
    "verbosity": [None, "low"],
    "guided_json": [{"type": "object"}, '{"type": "string"}', 5, "{bad", False, "[" * 5000 + "]" * 5000],
    "guided_regex": ["[0-9]+", "", 5], "guided_choice": [["a", "b"], [], ["a", ""], "a"],
    "guided_grammar": ['root ::= "a"', " ", 5],
    "structured_outputs": [{"choice": ["a"]}, {"json": {"type": "object"}, "disable_any_whitespace": True},
                           {"nope": 1}, {}, {"choice": ["a"], "regex": "a"}, "x",
                           {"structural_tag": json.dumps(AT_TAG)},
                           {"structural_tag": AT_TAG, "disable_any_whitespace": True},
                           {"structural_tag": "[" * 5000 + "]" * 5000}, {"json": "[" * 5000 + "]" * 5000},
                           {"structural_tag": {**AT_TAG, "type": "x"}}, {"structural_tag": 5},
                           {"json": {"type": "object"}, "whitespace_pattern": "\n"},
                           {"regex": "a", "whitespace_pattern": "\n"}, {"json_object": True, "whitespace_pattern": "x"}],
    "response_format": [AT_TAG, {"type": "json_object"}, {**AT_TAG, "format": {"type": "triggered_tags"}},
                        {**AT_TAG, "triggers": []}, {**AT_TAG, "extra": 1}, json.dumps(AT_TAG),
                        {**AT_TAG, "structures": [{"begin": "@f(", "end": ")", "schema": {"$ref": "#"}}]},
                        {**AT_TAG, "triggers": ["@"] * 1025}],
    "include_reasoning": [True, False, "yes", 1],
}
ALIKE_CASES = [(f, v) for f, values in SERVED_ALIKE.items() for v in values]


@pytest.mark.parametrize("field, value", ALIKE_CASES, ids=[f"{f}={json.dumps(v)[:24]}" for f, v in ALIKE_CASES])
def test_run_lines_and_serve_bodies_agree_on_the_fields_a_line_ignores_or_constrains_with(field, value):
    assert accepts_run_chat({field: value}) == accepts_serve_chat({field: value}), (field, value)
    assert accepts_serve_chat({field: SERVED_ALIKE[field][0]})          # each field's first value is taken


def test_a_run_line_takes_vllms_whitespace_pattern_as_a_body_does():
    """guided_whitespace_pattern beside guided_json, as a body's: the JSON's whitespace; alone a 400 both ways."""
    line = {"guided_json": {"type": "object"}, "guided_whitespace_pattern": "\n"}
    assert parse_request({**CHAT, **line}).response_format == {"type": "json_schema", "schema": {"type": "object"},
                                                               "whitespace": "\n"}
    assert accepts_serve_chat(line)
    alone = {"guided_whitespace_pattern": "\n"}
    assert not accepts_run_chat(alone) and not accepts_serve_chat(alone)


def test_a_run_line_gives_at_most_one_structured_output_field_as_a_body_does():
    both = {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}
    with pytest.raises(RequestError, match="give at most one of 'response_format', 'guided_json'"):
        parse_request({**CHAT, **both})
    assert not accepts_serve_chat(both)
    assert parse_request({**CHAT, "guided_choice": ["yes", "no"]}).response_format == {
        "type": "choice", "choices": ["yes", "no"]}
    alike = {"guided_regex": "ab", "structured_outputs": {"regex": "ab"}}      # one format, as vLLM clients send it
    assert parse_request({**CHAT, **alike}).response_format == {"type": "regex", "pattern": "ab"}
    assert accepts_serve_chat(alike)


def test_a_structured_output_nested_past_what_json_writes_is_a_400_naming_its_field_and_where():
    """A request a python stage hands back is Python's objects, not JSON text read MAX_DEPTH deep:
    a schema with a default nested 100,000 deep (or 600: past the schema's bound) was a
    RecursionError; it is a RequestError naming the field and, as for 600 levels, the place."""
    deep = 1
    for _ in range(100_000):
        deep = [deep]
    for field, value in (("guided_json", {"type": "string", "default": deep}),
                         ("response_format", {"type": "json_schema", "json_schema": {
                             "name": "x", "schema": {"type": "string", "default": deep}}})):
        with pytest.raises(RequestError, match=f"'{field}' cannot be enforced: the schema nests more than 124 "
                                               r"levels of arrays and objects \(at most 124\), at #/default/0/0/") as e:
            parse_request({**CHAT, field: value})
        assert e.value.param == field
    deep_elsewhere = {"type": "choice", "choices": ["a"], "x": deep}   # no schema to walk: still its field
    assert spec_problem(deep_elsewhere) == ("the constraint is not JSON: it nests deeper than JSON text can be "
                                            "written here")
    shallower = deep
    for _ in range(100_000 - 600):
        shallower = shallower[0]
    with pytest.raises(RequestError, match="'guided_json' cannot be enforced: the schema nests more than"):
        parse_request({**CHAT, "guided_json": {"type": "string", "default": shallower}})


@pytest.mark.parametrize("broken, beside, param", [
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": "x+"}}, {"guided_json": {"type": "object"}},
     "structured_outputs.whitespace_pattern"),
    ({"guided_regex": 5}, {"structured_outputs": {"regex": "a+"}}, "guided_regex"),
    ({"guided_json": "{not json"}, {"response_format": {"type": "json_object"}}, "guided_json")])
def test_a_broken_structured_output_field_beside_another_is_its_own_400(broken, beside, param):
    """A structured-output field that does not read, given beside another, is refused with its own
    error, as where it is given alone (it was "give at most one of ...", naming the other field)."""
    def refusal(fields):
        with pytest.raises(RequestError) as run_error:
            parse_request({**CHAT, **fields})
        with pytest.raises(P.APIError) as serve_error:
            P.parse_chat({**CHAT, **fields}, max_model_len=1 << 21, served=("p",))
        return (run_error.value.param, str(run_error.value)), (serve_error.value.param, serve_error.value.message)

    alone = refusal(broken)
    assert alone[0][0] == param and "at most one" not in alone[0][1]
    assert refusal({**beside, **broken}) == refusal({**broken, **beside}) == alone

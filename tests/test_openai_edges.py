"""Edges of the OpenAI protocol where vLLM and OpenAI's API decide something a client relies on,
checked over HTTP against a live `agp serve` on the tiny random model:

- a forced tool call (`tool_choice` "required" or a named function) beside a response format:
  the answer is the call, as vLLM's and OpenAI's; the format does not hold it, and the answer
  says so in a Warning header naming both fields (the format was dropped without a word).
"""
from __future__ import annotations

import json

import pytest

from test_serve import LiveServer
from tiny_model import write_tiny_gguf

pytest.importorskip("llguidance")

USER = [{"role": "user", "content": "hello world"}]
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}

# prompts prefilled 4 tokens a step: a long prompt's first token comes many steps after a short one's
CHUNKED = """pipeline tiny {{
    model  = "{model}"
    device = cpu
    dtype  = fp32
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 8  timeout = 20ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 4MiB }}
    stage gen     : generate      {{ max_new_tokens = 16  prefill_chunk = 4 }}
    stage out     : respond       {{}}
    request -> batch
    batch -> encode when full
    batch -> encode when timeout
    encode -> kv -> gen -> out
}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("edges") / "long.gguf", context=4096, embed_scale=0.3)
    s = LiveServer(path, text=CHUNKED.format(model=path))
    yield s
    s.close()


def post(server, path: str, body: dict):
    """(status, Warning header or None, the answer: its JSON, or a stream's `data:` payloads)."""
    body = {"model": "tiny", **body}
    if not body.get("stream"):
        r = server.http.post(server.url + path, json=body, timeout=120)
        return r.status_code, r.headers.get("warning"), r.json()
    with server.http.stream("POST", server.url + path, json=body, timeout=120) as r:
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        return r.status_code, r.headers.get("warning"), [x if x == "[DONE]" else json.loads(x) for x in lines]


# ---------------------------------------------------------------- a forced call beside a format

FORMATS = [
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("structured_outputs.json", {"structured_outputs": {"json": PERSON}}),
    ("guided_json", {"guided_json": PERSON}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
@pytest.mark.parametrize("field,fmt", FORMATS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FORMATS)])
def test_a_forced_tool_call_beside_a_format_is_the_answer_and_its_warning_names_both(server, stream, choice,
                                                                                      field, fmt):
    """vLLM's forced call replaces the request's structured output (its tool parser's adjust_request),
    and OpenAI's answer to a forced call has no content for a format to hold: the answer is the
    call, its arguments following the tool's parameters. agp answers so too, and says so: a
    Warning header (299) naming the format's field as the client wrote it and tool_choice."""
    status, warning, out = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 200, "tools": [ADD], "tool_choice": choice, "stream": stream, **fmt})
    assert status == 200, out
    assert warning is not None and warning.startswith("299 agp ") and f"'{field}'" in warning, warning
    assert "'tool_choice'" in warning, warning
    if stream:
        assert out[-1] == "[DONE]" and not any("error" in c for c in out[:-1]), out[-3:]
        args = "".join(tc["function"].get("arguments") or "" for c in out[:-1] for ch in c["choices"]
                       for tc in ch["delta"].get("tool_calls") or [])
        reason = [ch["finish_reason"] for c in out[:-1] for ch in c["choices"] if ch["finish_reason"]]
        assert reason == ["tool_calls"], reason
    else:
        choice0 = out["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", choice0
        args = choice0["message"]["tool_calls"][0]["function"]["arguments"]
    assert set(json.loads(args)) == {"a", "b"}


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_a_format_beside_tools_not_forced_holds_and_warns_of_nothing(server, choice):
    """tool_choice auto or none forces no call: the format holds the answer (its JSON parses) and
    no Warning is sent."""
    status, warning, out = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 200, "tools": [ADD], "tool_choice": choice,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    assert status == 200 and warning is None, (warning, out)
    if out["choices"][0]["finish_reason"] == "stop":
        assert set(json.loads(out["choices"][0]["message"]["content"])) == {"name"}


def test_a_free_text_format_beside_a_forced_call_warns_of_nothing(server):
    """`{"type": "text"}` asks for no format (many clients send it by default): nothing set aside."""
    status, warning, out = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 200, "tools": [ADD], "tool_choice": "required",
        "response_format": {"type": "text"}})
    assert status == 200 and warning is None, (warning, out)
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_the_responses_api_names_text_format_in_its_warning(server):
    """The Responses API's text.format beside a forced call: its warning names `text.format`, the
    field the client wrote."""
    status, warning, out = post(server, "/v1/responses", {
        "input": "hello world", "max_output_tokens": 200, "store": False,
        "tools": [{"type": "function", **ADD["function"]}], "tool_choice": "required",
        "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON}}})
    assert status == 200, out
    assert warning is not None and "'text.format'" in warning and "'response_format'" not in warning, warning
    assert [item["type"] for item in out["output"]] == ["function_call"], out["output"]

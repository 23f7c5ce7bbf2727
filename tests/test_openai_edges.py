"""Edges of the OpenAI protocol where vLLM and OpenAI's API decide something a client relies on,
checked over HTTP against a live `agp serve` on the tiny random model:

- a forced tool call (`tool_choice` "required" or a named function) beside a response format:
  the answer is the call, as vLLM's and OpenAI's; the format does not hold it, and the answer
  says so in a Warning header naming both fields (the format was dropped without a word);
- a streamed completions request with several prompts: each choice's chunks go out as its tokens
  come, each with its `index`, as vLLM's do; a prompt whose prefill is long holds back no other
  prompt's chunks (the stream waited for every prompt's first token before its first chunk).
"""
from __future__ import annotations

import json

import pytest

from flowkit import CASCADE
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
    # a call "required" ends "tool_calls"; one forced by its name keeps the answer's own "stop" (OpenAI's, vLLM's)
    finish = "tool_calls" if choice == "required" else "stop"
    if stream:
        assert out[-1] == "[DONE]" and not any("error" in c for c in out[:-1]), out[-3:]
        args = "".join(tc["function"].get("arguments") or "" for c in out[:-1] for ch in c["choices"]
                       for tc in ch["delta"].get("tool_calls") or [])
        reason = [ch["finish_reason"] for c in out[:-1] for ch in c["choices"] if ch["finish_reason"]]
        assert reason == [finish], reason
    else:
        choice0 = out["choices"][0]
        assert choice0["finish_reason"] == finish, choice0
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


# ---------------------------------------------------------------- streamed choices as they come

def positions(chunks: list) -> tuple[dict, dict]:
    """({choice index: where its first chunk is}, {choice index: where its finishing chunk is}),
    counting choice chunks in the order sent. (A token whose text is an unfinished UTF-8 character
    sends no chunk unless the request asks for return_token_ids, as the tests of interleaving do.)"""
    first, finish, at = {}, {}, 0
    for c in chunks:
        for ch in c.get("choices", []):
            first.setdefault(ch["index"], at)
            if ch["finish_reason"]:
                finish[ch["index"]] = at
            at += 1
    return first, finish


def test_a_streamed_batch_sends_a_short_prompts_chunks_before_a_long_prompts_first_token(server):
    """prompt[0] is short, prompt[1] long (its prefill takes dozens of steps at 4 tokens a step):
    the short prompt's chunks, its finish among them, come before the long prompt's first chunk;
    each choice's text is in order (the same as the answer not streamed), and the usage at the end
    counts both prompts. The stream waited for the long prompt's first token before sending any."""
    long = "the cat and the world " * 25
    body = {"prompt": ["hi", long], "max_tokens": 4, "ignore_eos": True, "temperature": 0}
    status, _, whole = post(server, "/v1/completions", body)
    assert status == 200, whole
    # its own cache_salt: the long prompt's blocks cached by the answer above are not its
    status, _, chunks = post(server, "/v1/completions", {**body, "stream": True, "cache_salt": "streamed",
                                                        "stream_options": {"include_usage": True}})
    assert status == 200 and chunks[-1] == "[DONE]", chunks[-3:]
    first, finish = positions(chunks[:-1])
    assert finish[0] < first[1], (first, finish)
    for i in (0, 1):
        text = "".join(ch["text"] for c in chunks[:-1] for ch in c["choices"] if ch["index"] == i)
        assert text == whole["choices"][i]["text"], i
    usage = chunks[-2]["usage"]
    assert chunks[-2]["choices"] == [] and usage["prompt_tokens_details"]["cached_tokens"] == 0, usage
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"] and usage["completion_tokens"] == 8, usage


def test_a_streamed_batch_with_n_numbers_each_prompts_choices_and_interleaves_them(server):
    """Two prompts, n = 2 each: choices 0-1 answer prompt[0], 2-3 prompt[1], as vLLM numbers them;
    the short prompt's choices finish before the long prompt's first chunk, and the two choices of
    a prompt go side by side (one's first chunk before the other's finish)."""
    long = "the cat and the world " * 25
    status, _, chunks = post(server, "/v1/completions", {
        "prompt": ["hi", long], "max_tokens": 4, "ignore_eos": True, "n": 2, "temperature": 1.0, "seed": 3,
        "stream": True, "cache_salt": "with n", "return_token_ids": True})
    assert status == 200 and chunks[-1] == "[DONE]", chunks[-3:]
    first, finish = positions(chunks[:-1])
    assert sorted(first) == sorted(finish) == [0, 1, 2, 3]
    assert max(finish[0], finish[1]) < min(first[2], first[3]), (first, finish)
    for a, b in ((0, 1), (2, 3)):
        assert first[a] < finish[b] and first[b] < finish[a], (first, finish)


def test_a_streamed_chat_with_n_sends_its_choices_side_by_side(server):
    """chat n = 2: each choice's chunks go out as its tokens come, not one choice after the other."""
    status, _, chunks = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 6, "ignore_eos": True, "n": 2, "temperature": 1.0, "seed": 3,
        "stream": True, "return_token_ids": True})
    assert status == 200 and chunks[-1] == "[DONE]", chunks[-3:]
    first, finish = positions(chunks[:-1])
    assert first[0] < finish[1] and first[1] < finish[0], (first, finish)


def test_a_streamed_batch_with_a_prompt_over_the_context_is_still_a_400(server):
    """The stream no longer waits for every prompt's first token, but it still waits for an engine
    to take each prompt: one over the context refuses the batch with a 400 naming it, before any
    chunk of the others (a batch of that prompt alone is refused so)."""
    r = server.http.post(server.url + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": ["hi", "the cat " * 3000], "max_tokens": 4, "stream": True})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith("'prompt[1]': ") and err["code"] == "context_length_exceeded", err
    server.stats_when(lambda s: s["in_flight"] == 0 and s["running"] == 0)




@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("cascade") / "tiny.gguf", context=4096)
    s = LiveServer(path, text=CASCADE.format(model=path, budget2="64KiB"))
    yield s
    s.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_whose_prompt_the_answering_engine_refuses_after_an_earlier_one_took_it_is_a_400(cascade, stream):
    """prompt[1] fits the first engine (the draft's) and not the second, which answers: the
    request alone is a 400, and so is the batch, streamed or not. (The batch's stream started once
    the draft's engine took each prompt: a 200, the short prompt's chunks, then an error event.)"""
    long = "hello world " * 40                        # 200 tokens: over the second engine's 128
    for prompt in (long, ["hi", long]):
        r = cascade.http.post(cascade.url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 4, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded", err
        assert err["message"].startswith("'prompt[1]': ") == isinstance(prompt, list), err
    cascade.stats_when(lambda s: s["in_flight"] == 0 and s["running"] == 0)

"""What a vLLM user sends, through the official clients: structured output, tools, penalties,
min_p, min_tokens, logit_bias, n, batched prompts — with the `openai` client, litellm and
langchain-openai against an `agp serve` app on the tiny random model (context 4096: the
tools' system prompt is long in its byte-level vocabulary).

The tiny model knows no language, so the tests check what the server guarantees whatever
the model: constrained output always parses and validates, forced tool calls always parse,
a penalty or a bias changes the tokens the way it must, and a request's features never
change another request's tokens in the same batch.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from clikit import agp_in
from test_serve import LiveServer
from tiny_model import write_tiny_gguf

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"]}}}
USER = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("long") / "long.gguf", context=4096, embed_scale=0.3)
    # a 1 ms batch window: requests sent together still share the engine's steps (it takes a request
    # in at its next step), and each sent alone does not wait out a longer window
    s = LiveServer(path, max_batch_size=16, text=None, overrides={"kv_budget_bytes": 8 << 20}, batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=kw.pop("messages", USER), **kw)


def _each_seed(ask, seeds) -> list:
    """ask(seed) for each seed, sent at once: the server decodes them in one batch, a step for all
    of them (one after another, each took its own hundreds of steps); the answers in seed order."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(ask, seeds))


# ---------------------------------------------------------------- structured output

def test_json_schema_output_always_parses_and_validates(client):
    outs = _each_seed(lambda seed: _chat(client, max_tokens=200, temperature=1.0, seed=seed, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}), range(4))
    for seed, out in enumerate(outs):
        assert out.choices[0].finish_reason == "stop", seed
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_json_object_mode_and_streaming_give_an_object(client):
    # json_object bounds no value: the random model may ramble inside a string until max_tokens
    # (finish "length"); whatever finished is an object
    outs = _each_seed(lambda s: _chat(client, max_tokens=300, temperature=1.0, seed=s,
                                      response_format={"type": "json_object"}), range(4))
    finished = [o.choices[0].message.content for o in outs if o.choices[0].finish_reason == "stop"]
    assert finished and all(o.choices[0].finish_reason in ("stop", "length") for o in outs)
    assert all(isinstance(json.loads(text), dict) for text in finished)
    stream = _chat(client, max_tokens=200, stream=True, seed=3, temperature=1.0,
                   response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format_too(client):
    out = client.completions.create(model="tiny", prompt="a person:", max_tokens=200,
                                    extra_body={"response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "p", "schema": PERSON}}})
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


def test_a_schema_that_cannot_be_enforced_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        _chat(client, max_tokens=10, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        _chat(client, max_tokens=10, response_format={"type": "yaml"})


def test_constrained_requests_leave_the_rest_of_the_batch_alone(client, server):
    prompts = [f"hello {i}" for i in range(6)]

    def plain(i):
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=24).choices[0].text

    alone = [plain(i) for i in range(6)]
    got: dict = {}

    def mixed(i):
        if i % 2:
            got[i] = plain(i // 2)
        else:
            got[i] = _chat(client, max_tokens=200, seed=i, temperature=1.0, response_format={
                "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}).choices[0].message.content

    before = server.stats()["batch_size_hist"]
    threads = [threading.Thread(target=mixed, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(1, 12, 2)] == alone
    for i in range(0, 12, 2):
        jsonschema.validate(json.loads(got[i]), PERSON)
    after = server.stats()["batch_size_hist"]
    assert any(int(k) >= 2 and after[k] > before.get(k, 0) for k in after)      # they did share steps


# ---------------------------------------------------------------- tools

def test_required_tool_choice_always_gives_a_parsed_call(client):
    outs = _each_seed(lambda seed: _chat(client, max_tokens=300, temperature=1.0, seed=seed, tools=[WEATHER, ADD],
                                         tool_choice="required"), range(3))
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id and call.type == "function" and call.function.name in ("get_weather", "add")
            args = json.loads(call.function.arguments)
            schema = (WEATHER if call.function.name == "get_weather" else ADD)["function"]["parameters"]
            jsonschema.validate(args, schema)


def test_a_named_tool_choice_calls_that_function_once(client):
    """Its finish reason is "stop", as OpenAI and vLLM answer a call a named tool_choice forced
    ("tool_calls" is theirs for a call under "auto" or "required"); it was "tool_calls"."""
    out = _chat(client, max_tokens=300, tools=[WEATHER, ADD],
                tool_choice={"type": "function", "function": {"name": "add"}})
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"
    assert len(calls) == 1 and calls[0].function.name == "add"
    args = json.loads(calls[0].function.arguments)
    assert set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values())


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "now"}}])
@pytest.mark.parametrize("params", [{}, {"parameters": None}, {"parameters": {}}])
def test_a_forced_call_of_a_function_without_parameters_has_no_arguments(client, choice, params):
    # OpenAI: leaving `parameters` out defines a function with an empty parameter list; vLLM writes '{}'
    now = {"type": "function", "function": {"name": "now", "description": "The time", **params}}
    outs = _each_seed(lambda seed: _chat(client, max_tokens=300, temperature=1.0, seed=seed, tools=[now],
                                         tool_choice=choice), range(3))
    for out in outs:
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop") and calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("now", {})] * len(calls)


def test_streamed_tool_calls_arrive_as_deltas_that_assemble(client):
    """A named tool_choice's call ends in "stop", streamed as whole (OpenAI's and vLLM's)."""
    stream = _chat(client, max_tokens=300, stream=True, tools=[WEATHER],
                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            slot["id"] = slot["id"] or tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_tool_choice_none_gives_no_call_and_history_reaches_the_template(client, server):
    out = _chat(client, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("length", "stop")
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "minus 3 and snowing"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": history, "model": "tiny"}).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "minus 3 and snowing" in prompt and "Oslo" in prompt
    out = _chat(client, messages=history, max_tokens=8, tools=[WEATHER])
    assert out.choices[0].message.role == "assistant"



def test_an_earlier_call_s_arguments_nested_past_python_s_stack_are_no_500(client, server):
    """A client's history whose arguments string is JSON nested deeper than Python's stack reaches
    the prompt as the text it is (as arguments that are not JSON), on every route that renders it."""
    deep = "[" * 1500
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}]}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": history, "model": "tiny"}, timeout=60)
    assert ids.status_code == 200, ids.text
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": ids.json()["tokens"]}).json()["prompt"]
    assert deep in prompt
    out = _chat(client, messages=history, max_tokens=2, tools=[WEATHER])
    assert out.choices[0].message.role == "assistant"


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_parses_no_call(client):
    """vLLM renders the tools with tool_choice "none" too (unless --exclude-tools-when-tool-choice-none),
    as OpenAI's model still knows them; the answer is never parsed for calls, even one that reads
    like a call."""
    def prompt_tokens(**kw) -> int:
        return _chat(client, max_tokens=1, **kw).usage.prompt_tokens

    bare = prompt_tokens()
    assert prompt_tokens(tools=[WEATHER], tool_choice="none") == prompt_tokens(tools=[WEATHER], tool_choice="auto") > bare
    call = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>'
    out = _chat(client, max_tokens=256, tools=[WEATHER], tool_choice="none", extra_body={"guided_choice": [call]})
    msg = out.choices[0]
    assert msg.message.content == call and msg.message.tool_calls is None and msg.finish_reason == "stop"



@pytest.mark.parametrize("said", [
    'Sure. <tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>',
    '<tool_call>not a call</tool_call> so: <tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>',
])
def test_a_tool_calling_answer_has_the_same_content_and_calls_streamed_or_not(client, said):
    """The text outside the calls is the message's content, as written, whether the answer comes
    whole or as a stream (a block that holds no call stays content both ways)."""
    kw = dict(max_tokens=400, tools=[ADD], tool_choice="auto", extra_body={"guided_choice": [said]})
    whole = _chat(client, **kw).choices[0]
    content, calls = "", {}
    for chunk in _chat(client, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                calls.setdefault(tc.index, ["", ""])
                calls[tc.index][0] += tc.function.name or ""
                calls[tc.index][1] += tc.function.arguments or ""
    assert whole.finish_reason == "tool_calls" and whole.message.content == content
    assert [[c.function.name, c.function.arguments] for c in whole.message.tool_calls] == list(calls.values())

def test_exclude_tools_when_tool_choice_none_leaves_them_out_of_the_prompt(tmp_path):
    """`agp serve --exclude-tools-when-tool-choice-none` (vLLM's flag): a "none" request's prompt is
    as long as one without tools; "auto" still sees them."""
    from pipeline_dsl.serve.options import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["x.agp", "--exclude-tools-when-tool-choice-none"]).exclude_tools_when_tool_choice_none
    assert not p.parse_args(["x.agp"]).exclude_tools_when_tool_choice_none
    path = write_tiny_gguf(tmp_path / "long.gguf", context=4096, embed_scale=0.3)
    excluding = LiveServer(path, max_batch_size=4, batch_timeout_s=0.001, exclude_tools_when_tool_choice_none=True)
    try:
        def prompt_tokens(**kw) -> int:
            return _chat(excluding.client, max_tokens=1, **kw).usage.prompt_tokens

        bare = prompt_tokens()
        assert prompt_tokens(tools=[WEATHER], tool_choice="none") == bare
        assert prompt_tokens(tools=[WEATHER], tool_choice="auto") > bare
    finally:
        excluding.close()


SHOW_REQUEST = """
import json

def show(item):
    req = item["request"]
    item["text"] = json.dumps([req["headers"], req.get("user"), req.get("safety_identifier")])
    return item
"""


def test_request_headers_copies_the_named_headers_into_the_request_a_python_stage_sees(tmp_path, monkeypatch,
                                                                                         tiny_gguf):
    """`agp serve --request-headers x-tenant,x-user-id`: the request item's `headers` holds those
    two (lower-case names) and no other (Authorization stays out); `user` and `safety_identifier`
    reach the stage too. A value over MAX_HEADER_VALUE is a 400 that costs no other request."""
    from pipeline_dsl.requests_io import MAX_HEADER_VALUE
    from pipeline_dsl.serve.options import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["x.agp", "--request-headers", "X-Tenant, x-user-id"]).request_headers == ["x-tenant",
                                                                                                     "x-user-id"]
    assert p.parse_args(["x.agp"]).request_headers is None
    with pytest.raises(SystemExit):
        p.parse_args(["x.agp", "--request-headers", "x tenant"])
    (tmp_path / "showhooks.py").write_text(SHOW_REQUEST)
    monkeypatch.syspath_prepend(str(tmp_path))
    from test_serve import TINY

    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=4, timeout=1).replace(
        "stage out     : respond       {}", 'stage out     : respond       {}\n    stage show : python { fn = '
        '"showhooks:show" }').replace("encode -> kv -> gen -> out", "encode -> kv -> gen -> show -> out")
    server = LiveServer(tiny_gguf, text=text, request_headers=("x-tenant", "x-user-id"))
    try:
        def seen(headers: dict, **kw) -> list:
            r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60,
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                 **kw})
            assert r.status_code == 200, r.text
            return json.loads(r.json()["choices"][0]["message"]["content"])

        assert seen({"X-Tenant": "acme", "x-user-id": "u7", "Authorization": "Bearer k", "X-Other": "1"},
                    user="alice", safety_identifier="s-9") == [{"x-tenant": "acme", "x-user-id": "u7"}, "alice", "s-9"]
        assert seen({}) == [{}, None, None]
        big = httpx.post(server.url + "/v1/completions", headers={"x-tenant": "t" * (MAX_HEADER_VALUE + 1)},
                         json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert big.status_code == 400 and "'x-tenant' header" in big.json()["error"]["message"]
        assert seen({"x-tenant": "t" * MAX_HEADER_VALUE})[0] == {"x-tenant": "t" * MAX_HEADER_VALUE}
    finally:
        server.close()


# ---------------------------------------------------------------- sampling parameters

def _tokens(client, **kw):
    out = client.completions.create(model="tiny", prompt=kw.pop("prompt", "the cat"), max_tokens=kw.pop("n_tok", 24),
                                    logprobs=0, extra_body={"ignore_eos": True, **kw.pop("extra", {})}, **kw)
    return out.choices[0].logprobs.tokens, out


def test_penalties_change_repeats_the_way_they_must(client):
    plain, _ = _tokens(client)
    assert len(set(plain)) < len(plain)                          # the greedy tiny model repeats itself
    pres, _ = _tokens(client, presence_penalty=2.0)
    freq, _ = _tokens(client, frequency_penalty=2.0)
    rep, _ = _tokens(client, extra={"repetition_penalty": 2.0})
    for penalised in (pres, freq, rep):
        assert penalised != plain and len(set(penalised)) > len(set(plain))
    neg, _ = _tokens(client, presence_penalty=-2.0)
    assert len(set(neg)) <= len(set(plain))                      # a negative penalty favours repeats


def test_logit_bias_forces_and_bans_tokens(client, server):
    plain, _ = _tokens(client, n_tok=8)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": plain[0], "add_special_tokens": False}).json()["tokens"]
    banned, _ = _tokens(client, n_tok=8, logit_bias={str(ids[0]): -100})
    assert plain[0] not in banned
    target = httpx.post(server.url + "/tokenize", json={"prompt": "z", "add_special_tokens": False}).json()["tokens"][0]
    forced, _ = _tokens(client, n_tok=8, logit_bias={str(target): 100})
    assert forced == ["z"] * 8
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _tokens(client, logit_bias={"not-a-token": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _tokens(client, logit_bias={str(target): 101})
    with pytest.raises(openai.BadRequestError):
        _tokens(client, logit_bias={"999999": 1})                  # beyond the vocabulary


def test_min_tokens_holds_back_stop_tokens(client, server):
    plain, out = _tokens(client, n_tok=8)
    first = httpx.post(server.url + "/tokenize", json={"prompt": plain[0], "add_special_tokens": False}).json()["tokens"]
    stopped = client.completions.create(model="tiny", prompt="the cat", max_tokens=8,
                                        extra_body={"stop_token_ids": first[:1]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(model="tiny", prompt="the cat", max_tokens=8,
                                     extra_body={"stop_token_ids": first[:1], "min_tokens": 5})
    assert 5 <= held.usage.completion_tokens


def test_min_p_of_one_is_greedy_and_n_gives_distinct_seeded_choices(client):
    greedy, _ = _tokens(client, n_tok=12)
    hot, _ = _tokens(client, n_tok=12, temperature=1.5, seed=7, extra={"min_p": 1.0})
    assert hot == greedy
    wild = {tuple(_tokens(client, n_tok=12, temperature=1.5, seed=s)[0]) for s in range(4)}
    assert len(wild) > 1                                           # sampling does vary without min_p
    out = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, n=3, temperature=1.5, seed=11,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1 and out.usage.completion_tokens == 36
    again = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, n=3, temperature=1.5, seed=11,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_batched_prompts_of_strings_and_of_token_ids(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "the cat"}).json()["tokens"]
    out = client.completions.create(model="tiny", prompt=["the cat", "hello world"], max_tokens=6, n=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_ids = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6)
    texts = {c.index: c.text for c in out.choices}
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == [texts[0], texts[0]]


# ---------------------------------------------------------------- litellm and langchain-openai

def test_litellm_structured_output_and_tools(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    common = dict(model="openai/tiny", api_base=server.url + "/v1", api_key="unused", messages=USER)
    out = litellm.completion(max_tokens=200, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, **common)
    jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    out = litellm.completion(max_tokens=300, tools=[WEATHER], tool_choice="required", **common)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(server, method):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=150)

    llm = lc.ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="unused", max_tokens=200,
                        max_retries=0, temperature=0)
    structured = llm.with_structured_output(Person, method=method, include_raw=True)
    if method == "json_mode":
        # json_mode asks for any object and leaves the schema to the prompt, which the random model
        # cannot read: what finishes is an object, what rambles is cut by max_tokens
        try:
            raw = structured.invoke("Return a JSON person.")["raw"]
        except openai.LengthFinishReasonError as e:          # the client refuses to parse a cut answer
            assert e.completion.choices[0].message.content.startswith("{")
            return
        assert raw.response_metadata["finish_reason"] == "stop" and isinstance(json.loads(raw.content), dict)
        return
    result = structured.invoke("Give me a person.")
    assert result["parsing_error"] is None and isinstance(result["parsed"], Person)


def test_langchain_bind_tools_round_trip(server):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class AddArgs(BaseModel):                  # bounded: the random model must finish each number
        a: int = Field(ge=0, le=99)
        b: int = Field(ge=0, le=99)

    @tool(args_schema=AddArgs)
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    llm = lc.ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="unused", max_tokens=200,
                        max_retries=0, temperature=0)
    bound = llm.bind_tools([add], tool_choice="add")
    messages = [HumanMessage("What is 2 + 3?")]
    ai = bound.invoke(messages)
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "add"
    args = ai.tool_calls[0]["args"]
    result = add.invoke(args)
    messages += [ai, ToolMessage(str(result), tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.bind_tools([add]).invoke(messages)                 # the history goes back to the server
    assert final.type == "ai" and isinstance(final.content, str)


# ---------------------------------------------------------------- agp run and the pipeline's default

def test_agp_run_lines_and_a_generate_stage_schema_constrain_answers(tmp_path):
    model = write_tiny_gguf(tmp_path / "m.gguf", context=4096, embed_scale=0.3)
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    (tmp_path / "p.agp").write_text(f"""pipeline p {{
    model = "{model}"
    dtype = fp32
    stage request : requests      {{}}
    stage batch   : dynamic_batch {{ max_batch_size = 8  timeout = 2ms }}
    stage encode  : encode        {{}}
    stage kv      : kv_lookup     {{ block_size = 8  budget = 4MiB }}
    stage gen     : generate      {{ max_new_tokens = 200  temperature = 1.0  json_schema = "person.json" }}
    stage out     : respond       {{}}
    request -> batch -> encode -> kv -> gen -> out
}}
""")
    point = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["x"]}
    lines = [{"id": i, "prompt": f"q{i}", "seed": i} for i in range(4)]
    lines.append({"id": "own", "prompt": "a point", "seed": 1,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "pt", "schema": point}}})
    lines.append({"id": "text", "prompt": "q0", "seed": 0, "response_format": {"type": "text"}})
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = agp_in("run", tmp_path / "p.agp", "-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = {rec["id"]: rec for rec in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    for i in range(4):                                 # the stage's schema, for every answer
        jsonschema.validate(json.loads(out[i]["text"]), PERSON)
    jsonschema.validate(json.loads(out["own"]["text"]), point)   # a request's own schema wins
    assert out["text"]["text"] != out[0]["text"] and not out["text"]["text"].startswith("{")   # so does its free text

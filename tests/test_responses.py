"""POST /v1/responses (the OpenAI Responses API) through the official `openai` client against an
`agp serve` app on the tiny random model: text answers equal the chat path's, streamed events
assemble to the same answer, function tools give function_call items and take their outputs
back, structured output parses into a pydantic model, previous_response_id continues a stored
conversation, and bad input is a 400 naming the Responses field.
"""
from __future__ import annotations

import functools
import json

import httpx
import openai
import pydantic
import pytest

from pipeline_dsl.requests_io import shown
from pipeline_dsl.serve import protocol as P
from pipeline_dsl.serve.responses import parse_responses
from test_serve import LiveServer

pytest.importorskip("llguidance")

ADD = {"type": "function", "name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"]}}


class Colour(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    warm: bool


@pytest.fixture(scope="module")
def server(long_gguf):                                   # room for tools
    s = LiveServer(long_gguf, max_batch_size=8, overrides={"kv_budget_bytes": 8 << 20}, batch_timeout_s=0.001)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_text_response_is_the_chat_answer(client):
    r = client.responses.create(model="tiny", input="hello world", instructions="Be brief.", max_output_tokens=8)
    chat = client.chat.completions.create(model="tiny", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 8
    if chat.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed" and r.incomplete_details is None


def test_streamed_events_assemble_to_the_same_answer(client):
    whole = client.responses.create(model="tiny", input=[{"role": "user", "content": "the cat"}],
                                    max_output_tokens=12, extra_body={"ignore_eos": True})
    events = list(client.responses.create(model="tiny", input=[{"role": "user", "content": "the cat"}],
                                          max_output_tokens=12, stream=True, extra_body={"ignore_eos": True}))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]                     # 12 tokens, ignore_eos: the budget ends it
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-4].text == events[-3].part.text == events[-2].item.content[0].text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 12
    with client.responses.stream(model="tiny", input="the cat", max_output_tokens=12,    # the SDK's helper
                                 extra_body={"guided_choice": ["yes", "no"]}) as stream:
        final = stream.get_final_response()                  # it needs response.completed: the answer ends
    assert final.status == "completed" and final.output_text in ("yes", "no")


def test_function_tools_give_calls_and_take_their_outputs(client):
    r = client.responses.create(model="tiny", input="add 2 and 3", tools=[ADD], tool_choice="required",
                                max_output_tokens=200)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and all(c.name == "add" and c.call_id for c in calls)
    args = json.loads(calls[0].arguments)
    assert set(args) == {"a", "b"}
    streamed = list(client.responses.create(model="tiny", input="add 2 and 3", tools=[ADD], max_output_tokens=200,
                                            tool_choice={"type": "function", "name": "add"}, stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and set(json.loads(done[0].arguments)) == {"a", "b"}
    follow = client.responses.create(model="tiny", tools=[ADD], max_output_tokens=4, input=[
        {"role": "user", "content": "add 2 and 3"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "add", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"}], tool_choice="none")
    assert follow.status in ("completed", "incomplete") and follow.output[0].type == "message"


def test_structured_output_parses_into_the_model(client):
    parsed = client.responses.parse(model="tiny", input="a colour", text_format=Colour, max_output_tokens=60,
                                    temperature=1.0, extra_body={"seed": 4})
    assert isinstance(parsed.output_parsed, Colour)
    obj = client.responses.create(model="tiny", input="json", max_output_tokens=60,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_previous_response_id_continues_the_stored_conversation(client, server):
    first = client.responses.create(model="tiny", input="remember the cat", max_output_tokens=4)
    second = client.responses.create(model="tiny", input="and now?", previous_response_id=first.id,
                                     max_output_tokens=4)
    chat = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": "remember the cat"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "and now?"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens and second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=first.id)
    unstored = client.responses.create(model="tiny", input="forget me", store=False, max_output_tokens=2)
    assert httpx.get(f"{server.url}/v1/responses/{unstored.id}", timeout=30).status_code == 404


def test_two_requests_sent_with_one_request_id_are_two_responses_each_kept_and_continued(client):
    """X-Request-Id (or the body's request_id) names the response, as vLLM names it; a second
    request with the same one gets an id of its own, so that neither replaces the other's stored
    conversation (a previous_response_id of the first went on the second's)."""
    firsts = [client.responses.with_raw_response.create(model="tiny", input=words, max_output_tokens=3,
                                                        extra_headers={"x-request-id": "same-rid"})
              for words in ("remember the cat", "remember the dog")]
    assert [r.headers["x-request-id"] for r in firsts] == ["same-rid"] * 2
    firsts = [r.parse() for r in firsts]
    assert firsts[0].id == "resp_same-rid" and firsts[1].id.startswith("resp_same-rid-")
    for first, words in zip(firsts, ("remember the cat", "remember the dog")):
        assert client.responses.retrieve(first.id).output_text == first.output_text
        went_on = client.responses.create(model="tiny", input="and now?", previous_response_id=first.id,
                                          max_output_tokens=4)
        chat = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": words}, {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "and now?"}])
        assert went_on.usage.input_tokens == chat.usage.prompt_tokens
        assert went_on.output_text == chat.choices[0].message.content
    again = client.responses.create(model="tiny", input="x", max_output_tokens=2, extra_body={"request_id": "same-rid"})
    assert again.id not in {f.id for f in firsts}


def test_logprobs_are_included_when_asked(client):
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=3, top_logprobs=2,
                                include=["message.output_text.logprobs"], extra_body={"ignore_eos": True})
    lps = r.output[0].content[0].logprobs
    assert len(lps) == 3 and all(len(lp.top_logprobs) == 2 for lp in lps)
    assert "".join(lp.token for lp in lps) == r.output_text
    # top_logprobs alone asks for none (OpenAI and vLLM return logprobs only when include names them)
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=3, top_logprobs=2,
                                extra_body={"ignore_eos": True})
    assert not r.output[0].content[0].logprobs
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):      # still checked
        client.responses.create(model="tiny", input="hi", max_output_tokens=3, top_logprobs=21)


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
     "text.format"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "c1"}, "conversation"),
    # `text`'s keys as chat's fields: verbosity null only, an unknown key refused
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "text": {"format": {"type": "text"}, "verbosty": "low"}}, "text.verbosty"),
    # `reasoning`'s keys, each with its schema, an unknown key refused as OpenAI refuses it
    ({"input": "x", "reasoning": {"efort": "low"}}, "reasoning.efort"),
    ({"input": "x", "reasoning": {"effort": "maximum"}}, "reasoning.effort"),
    ({"input": "x", "reasoning": {"summary": "short"}}, "reasoning.summary"),
    ({"input": "x", "reasoning": {"generate_summary": True}}, "reasoning.generate_summary"),
    # a function_call_output answers a function_call before it (here, or in the previous response), as OpenAI
    # requires: one whose call_id no call before it has is a 400
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "4"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c2", "output": "4"}]}, "input[1].call_id"),
])
def test_bad_input_is_a_400_naming_the_responses_field(server, body, param):
    r = server.http.post(server.url + "/v1/responses", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]



def test_text_takes_a_null_verbosity_and_its_unknown_keys_are_ignored_only_when_lenient():
    body = {"model": "tiny", "input": "x", "text": {"format": {"type": "json_object"}, "verbosity": None}}
    assert parse_responses(body, max_model_len=64, served=("tiny",)).req.response_format == {"type": "json_object"}
    odd = {"model": "tiny", "input": "x", "text": {"format": {"type": "json_object"}, "tone": "dry"}}
    assert parse_responses(odd, max_model_len=64, served=("tiny",), lenient=True).req.response_format == \
        {"type": "json_object"}


def test_reasoning_takes_openais_keys_and_drops_unknown_ones_only_when_lenient():
    for reasoning in ({"effort": "low", "summary": "auto"}, {"generate_summary": "concise"},
                      {"summary": "detailed", "context": "all_turns", "mode": "standard"}, {"summary": None}):
        body = {"model": "tiny", "input": "x", "reasoning": reasoning}
        assert parse_responses(body, max_model_len=64, served=("tiny",)).settings["reasoning"] == reasoning
    odd = {"model": "tiny", "input": "x", "reasoning": {"effort": "high", "efort": "low"}}
    assert parse_responses(odd, max_model_len=64, served=("tiny",), lenient=True).settings["reasoning"] == \
        {"effort": "high"}
    with pytest.raises(P.APIError) as e:
        parse_responses(odd, max_model_len=64, served=("tiny",))
    assert (e.value.param, e.value.code) == ("reasoning.efort", "unknown_parameter")
    assert "did you mean 'reasoning.effort'" in e.value.message


def test_the_answer_repeats_the_identifiers_and_settings_it_was_sent(client):
    # docs/openai.md: these are taken and repeated in the response object, as OpenAI's are
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, prompt_cache_key="conv-1",
                                safety_identifier="u-7f3a", max_tool_calls=3, user="someone", truncation="auto")
    assert (r.prompt_cache_key, r.safety_identifier, r.max_tool_calls, r.user, r.truncation) == \
        ("conv-1", "u-7f3a", 3, "someone", "auto")
    assert client.responses.retrieve(r.id).prompt_cache_key == "conv-1"


@pytest.mark.parametrize("field, value", [("prompt_cache_key", 5), ("safety_identifier", ["x"]),
                                          ("max_tool_calls", 0), ("max_tool_calls", "3"), ("service_tier", 5)])
def test_an_identifier_or_call_limit_of_the_wrong_type_is_a_400_naming_it(server, field, value):
    r = server.http.post(server.url + "/v1/responses", json={"model": "tiny", "input": "x", field: value}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_the_answer_repeats_the_sampling_it_ran_with(tiny_gguf):
    # OpenAI's response object says the temperature and top_p used; left out, they are the
    # generate stage's (they were null), given, the client's; streamed, response.created says so too
    from test_serve import TINY

    text = TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=1).replace(
        "generate      { max_new_tokens = 16 }", "generate { max_new_tokens = 4  temperature = 0.7  top_p = 0.9  seed = 1 }")
    assert "temperature = 0.7" in text
    s = LiveServer(tiny_gguf, text=text)
    try:
        r = s.client.responses.create(model="tiny", input="hi", max_output_tokens=2)
        assert (r.temperature, r.top_p) == (0.7, 0.9)
        r = s.client.responses.create(model="tiny", input="hi", max_output_tokens=2, temperature=0.2, top_p=0.5)
        assert (r.temperature, r.top_p) == (0.2, 0.5)
        events = list(s.client.responses.create(model="tiny", input="hi", max_output_tokens=2, stream=True))
        assert (events[0].type, events[0].response.temperature, events[-1].response.top_p) == \
            ("response.created", 0.7, 0.9)
    finally:
        s.close()


def test_instructions_are_not_carried_on_by_previous_response_id(client):
    """docs/openai.md: `instructions` is a system message before the input, not carried on by
    previous_response_id (as in OpenAI's API): the next turn runs without it."""
    first = client.responses.create(model="tiny", input="remember the dog", instructions="Be terse.",
                                    max_output_tokens=4)
    second = client.responses.create(model="tiny", input="and now?", previous_response_id=first.id,
                                     max_output_tokens=4)
    chat = client.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": "remember the dog"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "and now?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content and second.instructions is None


def test_instructions_given_with_previous_response_id_come_before_the_stored_turns(client):
    """docs/openai.md: `instructions` is a system message, and it opens the conversation: a turn
    that continues a stored one (previous_response_id) with instructions of its own runs as the chat
    whose system message comes first, then the stored turns, then its input (not the stored turns
    first, the system message between them and the input)."""
    first = client.responses.create(model="tiny", input="remember the dog", max_output_tokens=4)
    second = client.responses.create(model="tiny", input="and now?", previous_response_id=first.id,
                                     instructions="Be terse.", max_output_tokens=6)
    chat = client.chat.completions.create(model="tiny", max_tokens=6, messages=[
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "remember the dog"},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "and now?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content and second.instructions == "Be terse."


def test_what_the_request_leaves_out_is_repeated_at_openais_defaults_and_delete_says_deleted(client, server):
    """docs/openai.md: the response object repeats the settings (OpenAI's defaults where the request
    gives none; `service_tier` answers `default` whatever was asked), and DELETE answers OpenAI's
    deletion object."""
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, service_tier="flex")
    assert (r.tool_choice, r.parallel_tool_calls, r.tools, r.text.format.type) == ("auto", True, [], "text")
    assert (r.truncation, r.store, r.service_tier, r.metadata, r.background) == ("disabled", True, "default", {}, False)
    gone = httpx.delete(f"{server.url}/v1/responses/{r.id}", timeout=30)
    assert gone.status_code == 200 and gone.json() == {"id": r.id, "object": "response", "deleted": True}
    assert httpx.delete(f"{server.url}/v1/responses/{r.id}", timeout=30).status_code == 404


@pytest.mark.parametrize("extra", [
    {"seed": 3, "temperature": 1.0}, {"stop": ["x", "y"]}, {"top_k": 5}, {"min_p": 0.1}, {"repetition_penalty": 1.2},
    {"ignore_eos": True}, {"priority": 0}, {"cache_salt": "salt"}, {"request_id": "r-1"}, {"guided_regex": "a+"},
    {"guided_choice": ["yes", "no"]}, {"structured_outputs": {"regex": "b+"}}, {"user": "u"},
])
def test_vllms_extras_run_on_responses_as_on_chat(extra):
    """docs/openai.md, /v1/responses: vLLM's request_id, top_k, min_p, repetition_penalty, seed,
    stop, ignore_eos, structured_outputs, guided_*, priority and cache_salt are taken as on chat:
    the request runs with what the same chat request would."""
    call = parse_responses({"model": "tiny", "input": "hi", **extra}, max_model_len=512, served=("tiny",))
    chat = P.parse_chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra},
                        max_model_len=512, served=("tiny",))
    assert (call.req.fields, call.req.response_format, call.req.request_id) == \
        (chat.fields, chat.response_format, chat.request_id)


def test_include_alone_asks_for_logprobs_and_metadata_reaches_the_conditions(client):
    """docs/openai.md: `include: ["message.output_text.logprobs"]` puts the logprobs on the
    output_text part (no alternatives without `top_logprobs`), and `metadata` reaches the
    pipeline's conditions as on chat (the request item carries it)."""
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=3, include=["message.output_text.logprobs"],
                                extra_body={"ignore_eos": True})
    lps = r.output[0].content[0].logprobs
    assert len(lps) == 3 and all(lp.top_logprobs == [] for lp in lps)
    call = parse_responses({"model": "tiny", "input": "hi", "metadata": {"tier": "gold"}}, max_model_len=512,
                           served=("tiny",))
    assert call.req.item("r")["metadata"] == {"tier": "gold"} and call.settings["metadata"] == {"tier": "gold"}


def test_the_store_keeps_the_latest_1024_responses():
    """docs/openai.md: answers are kept in memory, the latest 1024; the oldest goes first."""
    from pipeline_dsl.serve.responses import ResponseStore

    store = ResponseStore()
    for i in range(1025):
        store.put(f"resp_{i}", {"id": f"resp_{i}"}, [])
    assert store.get("resp_0") is None and store.get("resp_1") is not None and store.get("resp_1024") is not None
    assert len(store.items) == 1024


def test_the_store_keeps_at_most_its_bytes_of_responses_however_few_they_are():
    """docs/openai.md: the store keeps at most 64 MiB of responses' JSON, the oldest going first:
    responses with top_logprobs hold hundreds of bytes a token, and 1024 of them alone could hold
    gigabytes on a long-running server. What it keeps reads back equal to what was put."""
    from pipeline_dsl.serve.responses import STORED_BYTES, ResponseStore

    store = ResponseStore()

    def response(rid: str, text: str) -> dict:        # a response's shape: its output a list of items
        return {"id": rid, "output": [{"id": f"msg_{rid}", "type": "message", "role": "assistant",
                                       "content": [{"type": "output_text", "text": text}]}]}

    big = "x" * (STORED_BYTES // 10)                    # ten of them fill the store
    puts = 14                                           # past ten: the oldest have to go (each a 6 MiB JSON)
    last = f"resp_{puts - 1}"
    for i in range(puts):
        store.put(f"resp_{i}", response(f"resp_{i}", big), [{"role": "user", "content": "hi"}])
    kept = [i for i in range(puts) if store.get(f"resp_{i}") is not None]
    assert kept == list(range(puts - len(kept), puts)) and 1 <= len(kept) < 10
    assert store.bytes <= STORED_BYTES
    assert store.item(f"msg_resp_{kept[0]}")["id"] == f"msg_resp_{kept[0]}"
    assert store.item("msg_resp_0") is None                          # a forgotten response's items go with it
    assert store.get(last) == (response(last, big), [{"role": "user", "content": "hi"}])
    assert store.put("huge", response("huge", "x" * (STORED_BYTES + 1)), []) is False
    assert store.get("huge") is None and store.get(last) is not None    # too big alone: not kept
    assert store.delete(last) and store.get(last) is None
    assert store.bytes == sum(len(text) for text in store.items.values())


def sdk_required_missing(model, data: dict, where: str = "") -> list[str]:
    """The fields the installed openai SDK's pydantic `model` marks required that `data` lacks,
    nested objects included."""
    import typing

    out = []
    for name, field in model.model_fields.items():
        if name not in data:
            out += [where + name] if field.is_required() else []
            continue
        for inner in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel) and isinstance(data[name], dict):
                out += sdk_required_missing(inner, data[name], f"{where}{name}.")
    return out


def test_usage_gives_every_field_the_sdk_requires(server):
    from openai.types.completion_usage import CompletionUsage
    from openai.types.responses import ResponseUsage

    body = {"model": "tiny", "input": "the cat", "max_output_tokens": 3}
    whole = server.http.post(server.url + "/v1/responses", json=body, timeout=60).json()
    with server.http.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")][-1]
    for use in (whole["usage"], last["response"]["usage"]):
        assert sdk_required_missing(ResponseUsage, use) == []
        assert use["input_tokens_details"]["cache_write_tokens"] == 0
        assert use["input_tokens_details"]["cached_tokens"] <= use["input_tokens"]
    chat = server.http.post(server.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3},
                      timeout=60).json()
    assert sdk_required_missing(CompletionUsage, chat["usage"]) == []


def test_streamed_logprobs_come_with_each_delta_and_add_up_to_the_answers(client):
    """Streamed with include logprobs: each `response.output_text.delta` carries its own tokens'
    logprobs, and together they are those of `response.output_text.done` and of the final
    response's output_text part, token for token."""
    events = list(client.responses.create(model="tiny", input="the cat", max_output_tokens=5, top_logprobs=2,
                                          include=["message.output_text.logprobs"], stream=True,
                                          extra_body={"ignore_eos": True}))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and all(e.logprobs for e in deltas if e.delta)
    streamed = [lp.model_dump() for e in deltas for lp in e.logprobs]
    assert len(streamed) == 5 and "".join(lp["token"] for lp in streamed) == "".join(e.delta for e in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.model_dump() for lp in done.logprobs] == streamed
    final = events[-1].response.output[0].content[0]
    assert [lp.model_dump() for lp in final.logprobs] == streamed


def test_a_streamed_response_is_kept_and_continued_as_a_whole_one(client, server):
    """A streamed answer is stored as a whole one is: GET /v1/responses/{id} gives the final
    event's response, and previous_response_id continues its conversation."""
    events = list(client.responses.create(model="tiny", input="remember the fox", max_output_tokens=4, stream=True))
    final = events[-1].response
    kept = client.responses.retrieve(final.id)
    assert (kept.id, kept.output_text, kept.usage.output_tokens) == (final.id, final.output_text,
                                                                     final.usage.output_tokens)
    later = client.responses.create(model="tiny", input="and now?", previous_response_id=final.id, max_output_tokens=2)
    chat = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": "remember the fox"}, {"role": "assistant", "content": final.output_text},
        {"role": "user", "content": "and now?"}])
    assert later.usage.input_tokens == chat.usage.prompt_tokens


def test_a_function_call_answer_is_its_call_items_at_their_output_index(client):
    """An answer that is a call is only its function_call items (no empty message before them, as
    OpenAI answers); streamed, each item's events name its place in the final `output`."""
    kw = dict(model="tiny", input="add 2 and 3", tools=[ADD], tool_choice="required", max_output_tokens=200)
    whole = client.responses.create(**kw)
    assert whole.output and all(o.type == "function_call" for o in whole.output), whole.output
    events = list(client.responses.create(**kw, stream=True))
    output = events[-1].response.output
    assert output and all(o.type == "function_call" for o in output)
    placed = [e for e in events if hasattr(e, "output_index")]
    assert placed
    for e in placed:
        item_id = e.item.id if hasattr(e, "item") else e.item_id
        assert output[e.output_index].id == item_id, (e.type, e.output_index)


def test_a_call_answer_continued_by_previous_response_id_keeps_its_calls(client):
    """previous_response_id after an answer that called a function: the next turn, its
    function_call_output alone, runs on the stored call, as the same turn sent whole does."""
    first = client.responses.create(model="tiny", input="add 2 and 3", tools=[ADD], tool_choice="required",
                                    max_output_tokens=200)
    call = next(o for o in first.output if o.type == "function_call")
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "5"}
    chained = client.responses.create(model="tiny", tools=[ADD], tool_choice="none", max_output_tokens=2,
                                      previous_response_id=first.id, input=[output])
    whole = client.responses.create(model="tiny", tools=[ADD], tool_choice="none", max_output_tokens=2, input=[
        {"role": "user", "content": "add 2 and 3"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}, output])
    assert chained.usage.input_tokens == whole.usage.input_tokens


def test_usage_counts_the_cached_prompt_and_totals_input_and_output(client):
    """The same input twice: the second answer's input_tokens_details.cached_tokens says what the
    prefix cache served, and total_tokens is still input_tokens + output_tokens, whole and streamed."""
    kw = dict(model="tiny", input="a prompt long enough to fill a block of the cache twice over", max_output_tokens=3)
    first = client.responses.create(**kw)
    again = client.responses.create(**kw)
    streamed = list(client.responses.create(**kw, stream=True))[-1].response
    for r in (again, streamed):
        assert 0 < r.usage.input_tokens_details.cached_tokens <= r.usage.input_tokens
        assert r.usage.input_tokens == first.usage.input_tokens
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_a_streamed_tool_call_is_counted_as_tool_calls(client, server):
    """A Responses answer that called a function, streamed or not, counts in vLLM's
    request_success_total as finished by tool_calls, as chat's does."""
    def calls() -> float:                       # none counted yet: the series is made by the first
        return server.metric("vllm:request_success_total", '{finished_reason="tool_calls"}', default=0.0)

    kw = dict(model="tiny", input="add 2 and 3", tools=[ADD], tool_choice="required", max_output_tokens=200)
    before = calls()
    client.responses.create(**kw)
    list(client.responses.create(**kw, stream=True))
    assert calls() == before + 2


def test_an_empty_streamed_answer_is_still_one_message_item(client):
    """An answer with no text (a stop string at its very start) streams a message item all the same,
    opened and closed, and the final response holds it with its empty text."""
    kw = dict(model="tiny", input="the cat", max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    said = client.responses.create(**kw).output_text
    assert said
    events = list(client.responses.create(**{**kw, "extra_body": {"ignore_eos": True, "stop": [said[0]]}},
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"], kinds
    output = events[-1].response.output
    assert [(o.type, o.content[0].text) for o in output] == [("message", "")]


def test_a_stream_that_fails_midway_ends_with_response_failed_naming_the_errors_code(tiny_gguf):
    """A request failed after its first tokens (a stream stage raising): the Responses stream ends
    with `response.failed` whose error code is the one a request failed before streaming gets
    (stage_failed), not the error's type."""
    from test_serve import TINY

    text = (TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=1)
            .replace("kv -> gen -> out", "kv -> gen -> p -> out")
            .replace("stage out", 'stage p       : python        { fn = "flowkit:fail_after_first_chunk"  '
                                  'stream = true }\n    stage out'))
    s = LiveServer(tiny_gguf, text=text)
    try:
        body = {"model": "tiny", "input": "hello", "max_output_tokens": 4, "ignore_eos": True}
        whole = s.http.post(s.url + "/v1/responses", json=body, timeout=60)
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "stage_failed", whole.text[:300]
        with s.http.stream("POST", s.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        s.close()
    last = data[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "stage_failed" and last["response"]["error"]["message"]


class Delta(str):
    """A streamed delta that counts the times something is added to it: `text += delta` on the
    text so far (a copy of the whole text each delta: quadratic on a long stream) is one."""
    added = 0

    def __radd__(self, other):
        Delta.added += 1
        return str(other) + str(self)


def test_a_long_streamed_message_joins_its_deltas_once_and_does_not_copy_its_text_each_delta():
    from types import SimpleNamespace as NS

    from pipeline_dsl.serve.responses_events import ResponseEvents

    kept = []
    owner = NS(g=NS(config=NS(retry_after_s=1), apipe=NS(runtime=NS(reasoning_parser=None))),
               vocabs=lambda c: NS(want_lp=False),
               keep=lambda call, body: kept.append(body))
    call = NS(req=NS(max_tokens_field="max_output_tokens", format_field="response_format", tools_active=False,
                     model="tiny"), settings={})
    events = ResponseEvents(owner, call, None, None, "resp_1", None)
    Delta.added = 0
    sent = [events.on_delta(0, NS(delta_text=Delta(f"{i % 10}"))) for i in range(2000)]
    done = events.finish(NS(choices=[NS(text="", finish_reason="stop", data={})],
                            usage={"prompt_tokens": 1, "completion_tokens": 2000, "cached_tokens": 0}))
    assert Delta.added == 0
    text = "".join(str(i % 10) for i in range(2000))
    deltas = [json.loads(chunk.split(b"data: ", 1)[1]) for out in sent for chunk in out
              if chunk.startswith(b"event: response.output_text.delta")]
    assert "".join(d["delta"] for d in deltas) == text
    ends = {json.loads(chunk.split(b"data: ", 1)[1])["type"]: json.loads(chunk.split(b"data: ", 1)[1])
            for chunk in done}
    assert ends["response.output_text.done"]["text"] == text
    assert ends["response.output_item.done"]["item"]["content"][0]["text"] == text
    assert kept[0]["output"][0]["content"][0]["text"] == text and kept[0]["status"] == "completed"


def test_a_response_too_large_for_the_store_answers_store_false_and_its_404_says_why(client, server, caplog):
    """`"store": true` asks to keep the answer; one alone over the store's bytes is not kept, and
    says so: its response object has `store: false` (streamed too), the server logs it, and GET,
    or previous_response_id, of its id is a 404 saying it was too large rather than unknown."""
    from pipeline_dsl.serve.responses import ResponseStore

    state = server.app.state.responses
    saved, state.store = state.store, ResponseStore(max_bytes=64)       # any answer is over 64 bytes
    try:
        with caplog.at_level("INFO", logger="agp.serve"):
            r = client.responses.create(model="tiny", input="hello", store=True, max_output_tokens=2)
            events = list(client.responses.create(model="tiny", input="hello", max_output_tokens=2, stream=True))
        streamed = events[-1].response
        assert r.store is False and streamed.store is False
        for rid in (r.id, streamed.id):
            assert any(f"the response '{rid}' was not stored" in m for m in caplog.messages)
            got = httpx.get(f"{server.url}/v1/responses/{rid}", timeout=30)
            assert got.status_code == 404 and got.json()["error"]["code"] == "response_not_found"
            assert f"the response '{rid}' was not stored: its " in got.json()["error"]["message"]
            assert "bytes are over the store's 64 bytes" in got.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError, match="was not stored"):
            client.responses.create(model="tiny", input="and?", previous_response_id=r.id, max_output_tokens=2)
        unknown = httpx.get(f"{server.url}/v1/responses/resp_unknown", timeout=30).json()["error"]["message"]
        assert unknown.startswith('no stored response has the id "resp_unknown"')
        small = client.responses.create(model="tiny", input="hello", store=False, max_output_tokens=2)
        assert small.store is False
    finally:
        state.store = saved
    kept = client.responses.create(model="tiny", input="hello", max_output_tokens=2)       # the store as it was
    assert kept.store is True and client.responses.retrieve(kept.id).id == kept.id


def test_an_item_reference_sends_the_stored_output_item_it_names(server):
    """An `item_reference` in `input` (what the Vercel AI SDK sends for an earlier answer of a
    stored response, and OpenAI resolves) stands for the output item of a kept response it names:
    the turn runs on the same prompt as the item sent whole, a message or a function_call, with its
    `type` given or left out (OpenAI's is optional). An id no kept response holds, a deleted
    response's and an unstored one's, is a 404 naming the reference."""
    post = functools.partial(server.http.post, server.url + "/v1/responses", timeout=120)
    said = post(json={"model": "tiny", "input": "hi", "max_output_tokens": 4}).json()
    message = said["output"][0]
    assert message["type"] == "message" and message["id"]
    called = post(json={"model": "tiny", "input": "add 2 and 3", "tools": [ADD], "tool_choice": "required",
                        "max_output_tokens": 200}).json()
    call = called["output"][0]
    assert call["type"] == "function_call"
    whole_call = {k: call[k] for k in ("type", "call_id", "name", "arguments")}
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "5"}
    user = {"role": "user", "content": "hi"}
    again = {"role": "user", "content": "again"}
    whole = {"role": "assistant", "content": [{"type": "output_text", "text": message["content"][0]["text"]}]}
    for sent, referenced in (
            ([user, whole, again], [user, {"type": "item_reference", "id": message["id"]}, again]),
            ([user, whole, again], [user, {"id": message["id"]}, again]),
            ([user, whole_call, output], [user, {"type": "item_reference", "id": call["id"]}, output])):
        body = {"model": "tiny", "tools": [ADD], "tool_choice": "none", "max_output_tokens": 4}
        a, b = post(json={**body, "input": sent}), post(json={**body, "input": referenced})
        assert a.status_code == b.status_code == 200, b.text
        assert b.json()["usage"]["input_tokens"] == a.json()["usage"]["input_tokens"]
        assert b.json()["output"][0]["content"] == a.json()["output"][0]["content"]
    unstored = post(json={"model": "tiny", "input": "hi", "max_output_tokens": 2, "store": False}).json()
    assert server.http.delete(f"{server.url}/v1/responses/{said['id']}", timeout=30).status_code == 200
    for item_id in ("msg_none", message["id"], unstored["output"][0]["id"]):
        r = post(json={"model": "tiny", "input": [user, {"type": "item_reference", "id": item_id}]})
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert error["param"] == "input[1].id" and error["code"] == "item_not_found" and item_id in error["message"]
    r = post(json={"model": "tiny", "input": [{"type": "item_reference", "id": 7}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].id"


def test_an_input_item_is_a_reference_only_when_it_holds_an_id_alone(server):
    """OpenAI's item_reference is `{"id"}` with an optional `type`: an item with other keys beside
    its id and no type is a message, and one lacking its role is a 400 naming input[0].role (it was
    taken as a reference, a 404 item_not_found naming input[0].id); an id alone is still a reference."""
    post = functools.partial(server.http.post, server.url + "/v1/responses", timeout=120)
    for item in ({"id": "msg_1", "content": "hi"}, {"id": "msg_1", "type": None, "content": "hi"}):
        r = post(json={"model": "tiny", "input": [item]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "input[0].role"
    for item in ({"id": "msg_none"}, {"id": "msg_none", "type": None}):
        r = post(json={"model": "tiny", "input": [item]})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["param"] == "input[0].id" and r.json()["error"]["code"] == "item_not_found"


def test_a_refusal_shows_only_the_start_of_a_long_value_it_quotes(server):
    """A megabyte `include` value, item id or `?stream=` of GET was repeated whole in the 400/404
    (and in the log): the message shows the value's start, as every other refusal does."""
    long = "x" * 1_000_000
    post = functools.partial(server.http.post, server.url + "/v1/responses", timeout=120)
    answers = (post(json={"model": "tiny", "input": "hi", "include": [long]}),
               post(json={"model": "tiny", "input": [{"type": "item_reference", "id": long}]}),
               server.http.get(server.url + "/v1/responses/resp_none", params={"stream": "x" * 4000}, timeout=30))
    for r, status, param in zip(answers, (400, 404, 400), ("include[0]", "input[0].id", "stream")):
        assert r.status_code == status, r.text[:300]
        error = r.json()["error"]
        assert error["param"] == param and '"xxxxxxxxxx' in error["message"] and len(error["message"]) < 600


def test_the_store_forgets_the_items_of_the_responses_it_forgets():
    """An output item is found by its id while its response is kept, and no longer once the store
    has let the response go (the oldest first) or it was deleted."""
    from pipeline_dsl.serve.responses import ResponseStore

    store = ResponseStore(size=2)
    for i in range(3):
        store.put(f"resp_{i}", {"id": f"resp_{i}", "output": [{"type": "message", "id": f"msg_{i}"}]}, [])
    assert store.item("msg_0") is None and store.item("msg_2") == {"type": "message", "id": "msg_2"}
    assert store.delete("resp_2") and store.item("msg_2") is None and store.item("msg_1") is not None
    assert len(store.owner) == 1


def test_a_stored_response_asked_for_as_a_stream_is_a_400_not_an_empty_stream(server):
    """GET /v1/responses/{id}?stream=true (the SDKs' `responses.retrieve(id, stream=True)`, which
    OpenAI answers for background responses alone) is a 400 naming `stream`: answered with the JSON
    object, the client read its body as events and got an empty stream, no error. stream=false (or 0,
    as 1 asks for one) and no stream give the stored response."""
    rid = server.http.post(server.url + "/v1/responses", timeout=120,
                           json={"model": "tiny", "input": "hi", "max_output_tokens": 2}).json()["id"]
    for value in ("true", "True", "1"):
        r = server.http.get(f"{server.url}/v1/responses/{rid}", params={"stream": value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    for params in ({"stream": "false"}, {"stream": "0"}, {}):
        r = server.http.get(f"{server.url}/v1/responses/{rid}", params=params, timeout=30)
        assert r.status_code == 200 and r.json()["id"] == rid


def test_an_include_value_openai_does_not_take_is_a_400_naming_its_place(server):
    """`include` takes OpenAI's values (its SDKs' ResponseIncludable): the logprobs, and the
    others, which ask for what tools and reasoning agp has none of would add, change nothing.
    Another value, a misspelt logprobs among them, is a 400 naming its place (it was taken and the
    answer came without logprobs, saying nothing), with the value it is close to."""
    post = functools.partial(server.http.post, server.url + "/v1/responses", timeout=120)
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 2, "ignore_eos": True}
    r = post(json={**body, "include": ["reasoning.encrypted_content", "message.output_text.logprob"]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "include[1]" and "'message.output_text.logprobs'" in error["message"]
    assert post(json={**body, "include": ["bogus"]}).json()["error"]["param"] == "include[0]"
    r = post(json={**body, "include": ["reasoning.encrypted_content", "file_search_call.results",
                                       "message.output_text.logprobs"]})
    assert r.status_code == 200 and len(r.json()["output"][0]["content"][0]["logprobs"]) == 2
    r = post(json={**body, "include": ["reasoning.encrypted_content"]})
    assert r.status_code == 200 and "logprobs" not in r.json()["output"][0]["content"][0]


def test_an_answer_a_guard_stopped_is_incomplete_for_content_filter_whole_and_streamed(tiny_gguf):
    """A guard after the model that answers in the model's place with finish_reason
    "content_filter" (docs/language.md's own example): the response said `completed`, where
    OpenAI's says `incomplete` with `incomplete_details.reason: content_filter`; streamed, its last
    event is `response.incomplete`. An answer the guard lets through is as before."""
    from test_serve import TINY

    text = (TINY.format(model=tiny_gguf, max_queue=64, max_batch_size=8, timeout=1)
            .replace("kv -> gen -> out", "kv -> gen -> guard -> out")
            .replace("stage out", 'stage guard   : python        { fn = "flowkit:refuse_blocked" }\n    stage out'))
    s = LiveServer(tiny_gguf, text=text)
    try:
        body = {"model": "tiny", "input": "this is blocked", "max_output_tokens": 4}
        whole = s.http.post(s.url + "/v1/responses", json=body, timeout=60).json()
        with s.http.stream("POST", s.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
            data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        free = s.http.post(s.url + "/v1/responses", json={**body, "input": "hello", "ignore_eos": True},
                           timeout=60).json()
    finally:
        s.close()
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "content_filter"}
    assert whole["output"][0]["content"][0]["text"] == "I can't help with that."
    last = data[-1]
    assert last["type"] == "response.incomplete", last["type"]
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert free["status"] == "incomplete" and free["incomplete_details"] == {"reason": "max_output_tokens"}


def test_many_item_references_to_one_response_read_its_json_once():
    """A request naming the items of a kept response many times reads that response's JSON once,
    not once a reference: a reference is a few bytes of body, and each read of a large answer
    (one with top_logprobs holds megabytes) took the whole read again."""
    from collections import OrderedDict

    from pipeline_dsl.serve.responses import ResponseStore

    class Reads(OrderedDict):
        count = 0

        def get(self, key, default=None):
            Reads.count += 1
            return super().get(key, default)

    store = ResponseStore()
    output = [{"type": "message", "id": "msg_a", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]},
              {"type": "function_call", "id": "fc_a", "call_id": "call_a", "name": "add", "arguments": "{}"}]
    store.put("resp_a", {"id": "resp_a", "output": output}, [])
    store.items = Reads(store.items)
    refs = [{"type": "item_reference", "id": i} for i in ("msg_a", "fc_a")] * 500
    call = parse_responses({"model": "tiny", "input": refs}, max_model_len=4096, served=("tiny",), store=store)
    assert len(call.conversation) == 1000 and call.conversation[0]["content"] == "hi"
    assert Reads.count == 1


def test_a_conversation_continued_again_and_again_is_parsed_once_and_handed_out_fresh():
    """previous_response_id reads the stored conversation it continues: it was parsed from its
    JSON (up to the store's 64 MiB) again on every request naming it. Its parsed form is kept
    once read, and each request gets a copy of its own: what one request's handling changes in
    its messages, the next one does not see."""
    from collections import OrderedDict

    from pipeline_dsl.serve.responses import ResponseStore

    class Reads(OrderedDict):
        count = 0

        def get(self, key, default=None):
            if key == "resp_a":
                Reads.count += 1
            return super().get(key, default)

    store = ResponseStore()
    calls = [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    store.put("resp_a", {"id": "resp_a", "output": []}, history)
    store.items = Reads(store.items)
    body = {"model": "tiny", "input": "and then?", "previous_response_id": "resp_a"}
    first = parse_responses(dict(body), max_model_len=4096, served=("tiny",), store=store)
    assert first.conversation[:2] == history and first.conversation[2] == {"role": "user", "content": "and then?"}
    first.conversation[1]["tool_calls"][0]["function"]["name"] = "changed"
    first.conversation[0]["content"] = "changed"
    Reads.count = 0
    for _ in range(3):
        again = parse_responses(dict(body), max_model_len=4096, served=("tiny",), store=store)
        assert again.conversation[:2] == history
    assert Reads.count == 0                             # its JSON is not read again


def test_the_parsed_conversations_kept_hold_at_most_the_stores_bytes_and_go_with_their_responses():
    from pipeline_dsl.serve.responses import ResponseStore

    """The parsed form of many short messages holds many times the bytes of their JSON: the kept
    ones hold at most the store's max_bytes of Python objects, the least recently read going."""
    store = ResponseStore(size=8, max_bytes=40_000)
    history = [{"role": "user", "content": "x"}] * 30                 # ~1 KB of JSON, ~10 KB parsed
    for i in range(8):
        store.put(f"resp_{i}", {"id": f"resp_{i}"}, history)
    for i in range(8):
        assert store.conversation(f"resp_{i}") == history
    assert store.bytes < 10_000 and len(store.items) == 8                          # every response is kept
    assert 0 < store.parsed_bytes <= store.max_bytes and 1 < len(store.parsed) < 8  # the latest read stay parsed
    assert "resp_7" in store.parsed and "resp_0" not in store.parsed
    assert store.delete("resp_7") and "resp_7" not in store.parsed and store.conversation("resp_7") is None
    store.put("resp_6", {"id": "resp_6"}, [{"role": "user", "content": "new"}])     # kept again: read anew
    assert store.conversation("resp_6") == [{"role": "user", "content": "new"}]
    assert store.parsed_bytes == sum(weight for _, weight in store.parsed.values())


def test_a_parsed_conversation_read_again_stays_parsed_over_one_read_once_since():
    """The parsed conversations kept are the latest read, not the latest first read: a
    conversation a client continues again and again is not parsed anew because others were read
    once after its first read."""
    from pipeline_dsl.serve.responses import ResponseStore

    store = ResponseStore(size=8, max_bytes=40_000)
    history = [{"role": "user", "content": "x"}] * 30                 # ~1 KB of JSON, ~10 KB parsed
    for i in range(8):
        store.put(f"resp_{i}", {"id": f"resp_{i}"}, history)
    for i in range(1, 8):
        store.conversation("resp_0")                                  # the one continued every turn
        store.conversation(f"resp_{i}")
        assert "resp_0" in store.parsed and f"resp_{i}" in store.parsed, i
    assert 1 < len(store.parsed) < 8 and "resp_1" not in store.parsed

def test_references_to_a_kept_reasoning_item_count_toward_the_text_references_may_bring():
    """A reference to a kept answer's reasoning item brings its thinking (the next assistant turn's
    reasoning_content) and counts as a message's does: 2,000 references to 100 KB of thinking, an
    80 KB body, built a 200 MB string. Past the bound, a 400 names the reference that went over."""
    from pipeline_dsl.serve.responses import ResponseStore

    store = ResponseStore()
    output = [{"type": "reasoning", "id": "rs_a", "summary": [],
               "content": [{"type": "reasoning_text", "text": "x" * 100_000}]},
              {"type": "message", "id": "msg_a", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}]
    store.put("resp_a", {"id": "resp_a", "output": output}, [])
    refs = [{"type": "item_reference", "id": "rs_a"}] * 2000 + [{"type": "item_reference", "id": "msg_a"}]
    with pytest.raises(P.APIError) as e:
        parse_responses({"model": "tiny", "input": [{"role": "user", "content": "q"}, *refs]}, max_model_len=4096,
                        served=("tiny",), store=store, max_referenced=1_000_000)
    assert e.value.param == "input[11]" and "1000000 characters" in e.value.message   # the 11th: 1,100,000 > 1,000,000
    kept = parse_responses({"model": "tiny", "input": [{"role": "user", "content": "q"}, *refs[-3:]]},
                           max_model_len=4096, served=("tiny",), store=store, max_referenced=1_000_000)
    assert kept.conversation[-1] == {"role": "assistant", "content": "hi", "reasoning_content": "x" * 200_000}


def test_item_references_bringing_more_text_than_a_body_holds_are_a_400_naming_the_one_past_it(server):
    """The items `input`'s references bring hold at most --max-body-bytes characters of text all
    told, as the items sent whole would: thousands of 40-byte references to a long kept answer
    made a prompt of gigabytes from a small body. Past it, a 400 names the reference that went
    over; the server answers others as before."""
    state = server.app.state.responses
    text = "x" * 100_000
    state.store.put("resp_long", {"id": "resp_long", "output": [
        {"type": "message", "id": "msg_long", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]}, [])
    refs = [{"type": "item_reference", "id": "msg_long"}] * 50           # 5,000,000 characters, in 2 KB
    r = server.http.post(server.url + "/v1/responses", json={"model": "tiny", "input": refs}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "input[41]" and "--max-body-bytes" in error["message"]    # 42 * 100,000 > 4 MiB
    ok = server.http.post(server.url + "/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 2},
                          timeout=120)
    assert ok.status_code == 200


def test_a_404_names_a_long_id_the_client_sent_cut_short_in_its_answer_and_log(server, caplog):
    """An item_reference's or a previous_response_id's id of 100,000 characters that no kept
    response holds is a 404 naming the id cut short (requests_io.shown), in the answer and in the
    log line: it was sent back, and logged at INFO, whole, as many megabytes as the body held."""
    post = functools.partial(server.http.post, server.url + "/v1/responses", timeout=120)
    long_id = "msg_" + "x" * 100_000
    with caplog.at_level("INFO", logger="agp.serve"):
        for body, param in (({"input": [{"type": "item_reference", "id": long_id}]}, "input[0].id"),
                            ({"input": "hi", "previous_response_id": long_id}, "previous_response_id")):
            r = post(json={"model": "tiny", **body})
            assert r.status_code == 404, r.text[:300]
            error = r.json()["error"]
            assert error["param"] == param and shown(long_id) in error["message"]
            assert len(error["message"]) < 1000
    logged = [rec.getMessage() for rec in caplog.records if "-> 404" in rec.getMessage()]
    assert len(logged) == 2 and all(len(line) < 1000 for line in logged)


def test_the_input_token_count_is_the_prompt_a_response_to_the_same_body_has(client):
    """responses.input_tokens.count (OpenAI's POST /v1/responses/input_tokens; pydantic-ai calls it
    for UsageLimits(count_tokens_before_request=True)) counts the prompt a response to the same
    body would have: its instructions, the stored turns of previous_response_id, its input and its
    tools, each as many tokens as the answer's usage.input_tokens says. Nothing is generated or
    stored; a field that does not shape the prompt is a 400 naming it."""
    first = client.responses.create(model="tiny", input="hello world", instructions="Be brief.", max_output_tokens=4)
    bodies = [dict(input="hello world"), dict(input="hello world", instructions="Be brief."),
              dict(input=[{"role": "user", "content": "add 2 and 3"}], tools=[ADD], tool_choice="auto"),
              dict(input="and again", previous_response_id=first.id, instructions="Be brief.")]
    counts = []
    for body in bodies:
        counted = client.responses.input_tokens.count(model="tiny", **body)
        assert counted.object == "response.input_tokens"
        assert counted.input_tokens == client.responses.create(model="tiny", max_output_tokens=2,
                                                               **body).usage.input_tokens, body
        counts.append(counted.input_tokens)
    alone = client.responses.input_tokens.count(model="tiny", input="and again", instructions="Be brief.")
    assert counts[3] > alone.input_tokens            # the stored turns are counted
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_tokens.count(model="tiny", input="hi", extra_body={"max_output_tokens": 4})
    assert e.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="tiny", input="hi", previous_response_id="resp_none")


def test_the_input_token_count_takes_previous_response_id_without_input(client):
    """OpenAI's count takes a body of previous_response_id alone (its input is optional there): the
    stored conversation is counted, as the same turns sent as `input` are. Without either it is
    still a 400 naming `input`."""
    first = client.responses.create(model="tiny", input="hello world", max_output_tokens=4)
    alone = client.responses.input_tokens.count(model="tiny", previous_response_id=first.id)
    turns = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": first.output_text}]
    assert alone.input_tokens == client.responses.input_tokens.count(model="tiny", input=turns).input_tokens
    assert alone.input_tokens < client.responses.input_tokens.count(
        model="tiny", previous_response_id=first.id, input="and again").input_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_tokens.count(model="tiny", instructions="Be brief.")
    assert e.value.body["param"] == "input"


def test_an_input_token_count_is_not_a_generation_request_in_the_metrics(server, client):
    """agp_requests_total counts generation requests by status: a count, answered or refused (400,
    404), is none, as /tokenize is not (its refusals were counted and its answers not)."""
    def total(status):
        try:
            return server.metric("agp_requests_total", f'{{status="{status}"}}')
        except AssertionError:                  # none of that status yet
            return 0

    def totals():
        return {status: total(status) for status in (200, 400, 404)}

    before = totals()
    client.responses.input_tokens.count(model="tiny", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.input_tokens.count(model="tiny", input="hi", extra_body={"max_output_tokens": 4})
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="tiny", input="hi", previous_response_id="resp_none")
    assert totals() == before
    client.responses.create(model="tiny", input="hi", max_output_tokens=1)     # a generation request is
    assert totals() == {**before, 200: before[200] + 1}

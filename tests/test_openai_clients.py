"""What an OpenAI client sends today, against `agp serve` on the tiny model: the request fields
current SDKs and agent frameworks set on chat (`safety_identifier`, `prompt_cache_key`, `user`)
are taken as OpenAI takes them, a field agp does not serve is named without a misleading
suggestion, `parallel_tool_calls: false` gives at most one call however many the model writes,
request bodies recorded from client libraries (pydantic-ai, instructor) are answered as vLLM answers them,
and a tool turn of each agent framework (openai-agents, autogen, haystack, smolagents, the Vercel AI SDK,
llm) is answered in the shape it reads."""
from __future__ import annotations

import json

import openai
import pytest

from pipeline_dsl.serve import protocol as P
from test_serve import LiveServer

USER = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(long_gguf):
    # room for the tools' prompt; requests come one at a time: a 1 ms batch window
    s = LiveServer(long_gguf, overrides={"kv_budget_bytes": 8 << 20}, batch_timeout_s=0.001)
    yield s
    s.close()


def test_chat_takes_openais_end_user_and_cache_identifiers(server):
    # OpenAI's chat API: safety_identifier replaces user; prompt_cache_key groups requests for caching
    kw = dict(model="tiny", messages=USER, max_tokens=3, temperature=0)
    plain = server.client.chat.completions.create(**kw)
    tagged = server.client.chat.completions.create(**kw, safety_identifier="u-7f3a", prompt_cache_key="conv-1",
                                                   user="someone")
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    assert tagged.usage == plain.usage or tagged.usage.completion_tokens == plain.usage.completion_tokens


CACHE_SETTINGS = [dict(prompt_cache_retention="24h"), dict(prompt_cache_retention=None, prompt_cache_options=None),
                  dict(prompt_cache_retention="in_memory", prompt_cache_options={"mode": "explicit", "ttl": "30m"}),
                  dict(prompt_cache_options={})]


@pytest.mark.parametrize("settings", CACHE_SETTINGS)
def test_openais_prompt_cache_settings_are_taken_and_change_nothing(server, settings):
    # the SDK's own parameters of chat and responses; agp's prefix cache reuses prompts by their tokens
    kw = dict(model="tiny", messages=USER, max_tokens=3, temperature=0)
    plain = server.client.chat.completions.create(**kw)
    assert server.client.chat.completions.create(**kw, **settings).choices[0].message.content \
        == plain.choices[0].message.content
    plain = server.client.responses.create(model="tiny", input="hello world", max_output_tokens=3, temperature=0)
    resp = server.client.responses.create(model="tiny", input="hello world", max_output_tokens=3, temperature=0,
                                          **settings)
    assert resp.output_text == plain.output_text


@pytest.mark.parametrize("field, value", [("prompt_cache_retention", "1h"), ("prompt_cache_retention", 24),
                                          ("prompt_cache_options", "30m"), ("prompt_cache_options", {"mode": "off"}),
                                          ("prompt_cache_options", {"ttl": 30})])
def test_a_bad_prompt_cache_setting_is_a_400_naming_it(server, field, value):
    for call in (lambda: server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                                                extra_body={field: value}),
                 lambda: server.client.responses.create(model="tiny", input="hello", max_output_tokens=2,
                                                        extra_body={field: value})):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == field and "unrecognized" not in e.value.message


@pytest.mark.parametrize("field", ["safety_identifier", "prompt_cache_key", "user"])
def test_an_identifier_that_is_not_a_string_is_a_400_naming_it(server, field):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: 5})
    assert e.value.param == field and "must be a string" in e.value.message


@pytest.mark.parametrize("field, value", [("verbosity", "low"),
                                          ("modalities", ["text", "audio"]), ("web_search_options", {}),
                                          ("prediction", {"type": "content", "content": "x"})])
def test_an_openai_feature_the_models_lack_is_a_400_that_says_so(server, field, value):
    # not "unrecognized ...; did you mean 'response_format'?": the field is OpenAI's, agp lacks the feature
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: value})
    assert e.value.param == field and e.value.code == "unsupported_parameter"
    assert "not supported by agp" in e.value.message and "did you mean" not in e.value.message


def test_verbosity_medium_openais_default_asks_nothing_and_is_answered_where_low_and_high_are_refused(server):
    """verbosity "medium" is OpenAI's default (a client that writes out every setting sends it), so
    it asks for nothing, as modalities ["text"]: answered, in chat and as the Responses API's
    text.verbosity; "low" and "high" ask for a shorter or longer answer agp cannot steer: a 400."""
    chat = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, verbosity="medium")
    assert chat.choices[0].message.content is not None
    assert server.client.responses.create(model="tiny", input="hi", max_output_tokens=2,
                                          text={"verbosity": "medium"}).output_text is not None
    for value in ("low", "high"):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, verbosity=value)
        assert e.value.param == "verbosity" and '"medium", the default, is taken' in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            server.client.responses.create(model="tiny", input="hi", max_output_tokens=2, text={"verbosity": value})
        assert e.value.param == "text.verbosity" and e.value.code == "unsupported_parameter"


def test_vllms_prompt_embeds_is_a_400_that_says_so_even_when_lenient(server):
    """vLLM's prompt-embeds client sends prompt "" and the prompt's input embeddings (base64 of a
    tensor): agp takes prompts as text or token ids and says so, naming prompt_embeds, rather than
    "'prompt' is empty" or, under --lenient, an answer to the text prompt beside them."""
    import base64

    from pipeline_dsl.requests_io import RequestError, parse_request

    embeds = base64.b64encode(bytes(64)).decode()
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="tiny", prompt="", max_tokens=5, temperature=0.0,
                                         extra_body={"prompt_embeds": embeds})
    assert (e.value.param, e.value.code) == ("prompt_embeds", "unsupported_parameter")
    assert "not supported by agp: it takes a prompt as text or token ids" in e.value.message
    with pytest.raises(P.APIError) as lenient:
        P.parse_completion({"prompt": "hello", "prompt_embeds": embeds}, max_model_len=64, served=("tiny",),
                           lenient=True)
    assert lenient.value.param == "prompt_embeds"
    with pytest.raises(RequestError) as line:                 # an agp run request line, the same
        parse_request({"prompt": "hello", "prompt_embeds": embeds})
    assert line.value.param == "prompt_embeds"
    assert server.client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                            extra_body={"prompt_embeds": None}).choices


def test_a_reasoning_effort_is_taken_on_chat_as_on_responses_and_checked_alike(server):
    """vLLM's chat takes reasoning_effort and its Responses reasoning.effort: both are checked against
    one list of efforts and change nothing (agp's models do not reason); Responses repeats its own.
    The list is the `openai` SDK's and vLLM's: "none", "xhigh" and "max" were 400s, though the SDK
    types them and vLLM serves them."""
    for effort in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):
        out = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, reasoning_effort=effort)
        assert out.choices[0].finish_reason in ("stop", "length")
    got = server.client.responses.create(model="tiny", input="hello", max_output_tokens=2, reasoning={"effort": "none"})
    assert got.reasoning.effort == "none"
    for call, param in ((lambda: server.client.chat.completions.create(
                            model="tiny", messages=USER, max_tokens=2, extra_body={"reasoning_effort": "maximum"}),
                         "reasoning_effort"),
                        (lambda: server.client.responses.create(
                            model="tiny", input="hello", max_output_tokens=2,
                            extra_body={"reasoning": {"effort": "maximum"}}),
                         "reasoning.effort")):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.param == param
        assert e.value.message.endswith(f"'{param}' must be \"none\", \"minimal\", \"low\", \"medium\", \"high\", "
                                        f"\"xhigh\" or \"max\", not a string (\"maximum\")")


def test_vllms_include_reasoning_is_taken_on_chat_and_changes_nothing(server):
    """vLLM's chat field include_reasoning (its gpt-oss clients send it): true or false, taken and
    checked, as reasoning_effort is; the answer is the same (agp's models do not reason)."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    kw = dict(model="tiny", messages=USER, max_tokens=3, temperature=0)
    plain = server.client.chat.completions.create(**kw).choices[0].message.content
    for value in (True, False, None):
        got = server.client.chat.completions.create(**kw, extra_body={"include_reasoning": value})
        assert got.choices[0].message.content == plain
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(**kw, extra_body={"include_reasoning": "yes"})
    assert e.value.param == "include_reasoning" and "must be true or false" in e.value.message
    assert parse_request({"messages": USER, "include_reasoning": True}).messages    # an agp run line takes it too
    with pytest.raises(RequestError):
        parse_request({"messages": USER, "include_reasoning": 1})


def test_the_values_of_those_features_that_ask_for_nothing_are_taken(server):
    out = server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, modalities=["text"],
                                                extra_body={"prediction": None, "reasoning_effort": None})
    assert out.choices[0].finish_reason in ("stop", "length")


def test_an_unknown_field_is_offered_a_name_only_when_it_is_close(server):
    def message(field):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body={field: 1})
        assert (e.value.param, e.value.code) == (field, "unknown_parameter")      # OpenAI's code
        return e.value.message

    assert "did you mean 'temperature'?" in message("temprature")
    assert "did you mean" not in message("presence")            # not 'presence_penalty': a guess, not a typo
    assert "did you mean" not in message("n_choices")          # not 'tool_choice'


CITY = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TWO_CALLS = ('<tool_call>[{"name": "weather", "arguments": {"city": "Paris"}}, '
             '{"name": "weather", "arguments": {"city": "Rome"}}]</tool_call>')


@pytest.mark.parametrize("parallel, cities", [(False, ["Paris"]), (True, ["Paris", "Rome"]), (None, ["Paris", "Rome"])])
def test_parallel_tool_calls_false_gives_at_most_one_call_streamed_or_not(server, parallel, cities):
    # the model writes two calls (held to that text by guided_choice) under tool_choice "auto"
    pytest.importorskip("llguidance")
    kw = dict(model="tiny", messages=[{"role": "user", "content": "weather in Paris and Rome"}], max_tokens=200,
              tools=[CITY], extra_body={"guided_choice": [TWO_CALLS], "parallel_tool_calls": parallel})
    out = server.client.chat.completions.create(**kw)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments)["city"] for c in calls] == cities
    streamed = [d for ch in server.client.chat.completions.create(**kw, stream=True) if ch.choices
                for d in ch.choices[0].delta.tool_calls or []]
    assert [json.loads(d.function.arguments)["city"] for d in streamed] == cities
    assert [d.index for d in streamed] == list(range(len(cities)))
    resp = server.client.responses.create(model="tiny", input="weather in Paris and Rome", max_output_tokens=200,
                                          tools=[{"type": "function", **CITY["function"]}],
                                          extra_body={"guided_choice": [TWO_CALLS],
                                                      "parallel_tool_calls": parallel})
    assert [json.loads(o.arguments)["city"] for o in resp.output if o.type == "function_call"] == cities


def test_a_vllm_reasoning_client_reads_null_reasoning_and_carries_the_message_on(server):
    """vLLM's reasoning examples read `message.reasoning_content` (its older name) or `message.reasoning`
    unguarded, on a model that does not reason too: both are null, on a plain answer and on a tool
    call, and the message sent back as the SDK gave it goes on with the conversation."""
    pytest.importorskip("llguidance")
    messages = [{"role": "user", "content": "9.11 and 9.8, which is greater?"}]
    first = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    called = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, tools=[CITY],
                                                   tool_choice="required")
    for out in (first, called):
        message = out.choices[0].message
        assert message.reasoning_content is None and message.reasoning is None
    assert called.choices[0].message.tool_calls
    messages += [first.choices[0].message, {"role": "user", "content": "How many Rs are in 'strawberry'?"}]
    second = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert second.choices[0].message.reasoning_content is None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_an_assistant_refusal_part_is_its_text_in_the_conversation(server):
    # OpenAI's assistant content parts are text and refusal: a client replaying a refused turn sends one
    import httpx

    def prompt(content):
        msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": content},
                {"role": "user", "content": "the cat"}]
        r = server.http.post(server.url + "/tokenize", json={"messages": msgs}, timeout=30)
        assert r.status_code == 200, r.text
        out = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        assert out.usage.prompt_tokens == r.json()["count"]
        return r.json()["tokens"]

    assert prompt([{"type": "refusal", "refusal": "is that so"}]) == prompt("is that so")

    def input_tokens(part):
        return server.client.responses.create(model="tiny", max_output_tokens=2, input=[
            {"role": "user", "content": "hello"}, {"type": "message", "role": "assistant", "content": [part]},
            {"role": "user", "content": "the cat"}]).usage.input_tokens

    assert (input_tokens({"type": "refusal", "refusal": "is that so"})
            == input_tokens({"type": "output_text", "text": "is that so", "annotations": []}))
    with pytest.raises(openai.BadRequestError, match="refusal"):       # only an assistant refuses
        server.client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}])


def test_every_answer_and_chunk_names_the_configuration_it_came_from(server, long_gguf):
    """OpenAI's system_fingerprint: the same on every answer of one configuration (read with `seed`
    to know the server behind the answers is unchanged), another when the configuration changes."""
    from pipeline_dsl.serve.build import system_fingerprint

    s = LiveServer(long_gguf, overrides={"kv_budget_bytes": 8 << 20}, batch_timeout_s=0.001,
                   system_fingerprint="fp_0123456789")
    try:
        kw = dict(model="tiny", max_tokens=2)
        answers = [s.client.chat.completions.create(messages=USER, **kw),
                   s.client.completions.create(prompt="the cat", **kw),
                   *s.client.chat.completions.create(messages=USER, stream=True,
                                                     stream_options={"include_usage": True}, **kw),
                   *s.client.completions.create(prompt="the cat", stream=True, **kw)]
        assert {a.system_fingerprint for a in answers} == {"fp_0123456789"}
        fp = system_fingerprint(s.runtime)
        assert fp == system_fingerprint(server.runtime) and fp.startswith("fp_")    # another load, same setup
        assert system_fingerprint(s.runtime, chat_template="{{ messages }}") != fp
    finally:
        s.close()


def test_a_context_overflow_names_the_length_field_the_client_sent(server):
    # the engine speaks of max_tokens; a chat client that sent max_completion_tokens, or a Responses
    # client that sent max_output_tokens, reads its own field's name
    words = "the cat and the world " * 20
    for call, field in [
            (lambda: server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words}],
                                                           max_completion_tokens=4090), "max_completion_tokens"),
            (lambda: server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": words}],
                                                           max_tokens=4090), "max_tokens"),
            (lambda: server.client.responses.create(model="tiny", input=words, max_output_tokens=4090),
             "max_output_tokens")]:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.code == "context_length_exceeded"
        assert f"{field} 4090" in e.value.message and (field == "max_tokens" or "max_tokens" not in e.value.message)


SDK_CALLS = {"/v1/chat/completions": ("chat.completions", {"messages": USER, "max_tokens": 2}),
             "/v1/completions": ("completions", {"prompt": "hello", "max_tokens": 2}),
             "/v1/responses": ("responses", {"input": "hello", "max_output_tokens": 2}),
             "/v1/embeddings": ("embeddings", {"input": "hello"})}


def sdk_parameters(resource: str) -> list[str]:
    """The request parameters of the installed openai SDK's `create` of a resource."""
    import inspect

    owner = openai.OpenAI(api_key="unused")
    for part in resource.split("."):
        owner = getattr(owner, part)
    return [name for name, p in inspect.signature(owner.create).parameters.items()
            if p.kind is p.KEYWORD_ONLY and not name.startswith("extra_") and name != "timeout"]


@pytest.mark.parametrize("path", SDK_CALLS)
def test_every_parameter_of_the_installed_sdk_is_taken_as_left_out_when_null(server, path):
    # a client that sends null for what it leaves unset (as the SDK sends an explicit None) gets its answer
    resource, needed = SDK_CALLS[path]
    body = {name: None for name in sdk_parameters(resource) if name not in needed}
    r = server.http.post(server.url + path, json={**body, **needed}, timeout=60)
    assert r.status_code == 200, (sorted(body), r.text)


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "moderation", {"model": "omni-moderation-latest"}),
    ("/v1/responses", "moderation", {"model": "omni-moderation-latest"}),
    ("/v1/responses", "conversation", "conv_1"), ("/v1/responses", "prompt", {"id": "pmpt_1"}),
    ("/v1/responses", "context_management", [{"type": "compaction", "compact_threshold": 1000}]),
    ("/v1/responses", "access_programs", {"cyber": "standard"}),
    ("/v1/responses", "background_options", {"completion_window": "2h"})])
def test_an_sdk_parameter_agp_cannot_honour_is_a_400_naming_it(server, path, field, value):
    r = server.http.post(server.url + path, json={**SDK_CALLS[path][1], field: value}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert "not supported by agp" in error["message"]


def test_the_responses_values_that_ask_for_nothing_are_taken(server):
    r = server.client.responses.create(model="tiny", input="hello", max_output_tokens=2, context_management=[],
                                       access_programs={}, background_options={},
                                       image={"context_compression": "auto"})
    assert r.status in ("completed", "incomplete")
    bad = server.http.post(server.url + "/v1/responses", json={"input": "x", "image": {"context_compression": "max"}},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"


def test_stream_options_take_include_obfuscation_and_refuse_an_unknown_key_as_a_top_level_field(server):
    # OpenAI's include_obfuscation: taken (agp's chunks carry no obfuscation field), on chat, completions, responses
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=2, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": True}))
    assert chunks[-1].usage.completion_tokens >= 1 and not any("obfuscation" in c.model_extra for c in chunks)
    assert list(server.client.completions.create(model="tiny", prompt="hello", max_tokens=2, stream=True,
                                                 stream_options={"include_obfuscation": False}))
    events = list(server.client.responses.create(model="tiny", input="hello", max_output_tokens=2, stream=True,
                                                 stream_options={"include_obfuscation": True}))
    assert events[-1].type in ("response.completed", "response.incomplete")
    for path, (_, body) in SDK_CALLS.items():
        if path == "/v1/embeddings":
            continue
        r = server.http.post(server.url + path, json={**body, "stream": True, "stream_options": {"include_usgae": True}},
                       timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("stream_options.include_usgae", "unknown_parameter")
        assert error["message"].startswith('unrecognized request argument "stream_options.include_usgae"')
    # --lenient ignores it, as it ignores an unknown top-level field
    lenient = P.parse_chat({"messages": USER, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
                           max_model_len=64, served=("tiny",), lenient=True)
    assert lenient.include_usage


# Bodies recorded from client libraries that turn a pydantic model with a nested model into a
# forced tool call: its parameters refer to the nested model through "#/$defs/...", as pydantic
# writes it (pydantic-ai 2.31's default structured output, on chat and on the Responses API;
# instructor 1.16's Iterable in TOOLS mode, streamed under a named tool_choice). vLLM takes them.
TRIP_PARAMETERS = {"properties": {"stops": {"items": {"$ref": "#/$defs/City"}, "type": "array"}},
                   "required": ["stops"], "type": "object", "additionalProperties": False,
                   "$defs": {"City": {"properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                                      "required": ["city", "country"], "type": "object",
                                      "additionalProperties": False}}}
USERS_PARAMETERS = {"$defs": {"User": {"properties": {"name": {"title": "Name", "type": "string"},
                                                      "age": {"title": "Age", "type": "integer"}},
                                       "required": ["name", "age"], "title": "User", "type": "object"}},
                    "properties": {"tasks": {"description": "Correctly segmented list of `User` tasks",
                                             "items": {"$ref": "#/$defs/User"}, "title": "Tasks", "type": "array"}},
                    "type": "object", "required": []}
PYDANTIC_AI_CHAT = {
    "messages": [{"role": "user", "content": "Plan a trip: Paris then Rome."}], "model": "tiny",
    "max_completion_tokens": 300, "stream": False, "temperature": 0, "tool_choice": "required",
    "tools": [{"type": "function", "function": {
        "name": "final_result", "description": "The final response which ends this conversation",
        "parameters": TRIP_PARAMETERS, "strict": True}}]}
PYDANTIC_AI_RESPONSES = {
    "input": [{"role": "user", "content": "Plan a trip: Paris then Rome."}], "max_output_tokens": 300,
    "model": "tiny", "stream": False, "temperature": 0, "tool_choice": "required",
    "tools": [{"name": "final_result", "parameters": TRIP_PARAMETERS, "type": "function",
               "description": "The final response which ends this conversation", "strict": True}]}
INSTRUCTOR_ITERABLE = {
    "messages": [{"role": "user", "content": "Extract: Jason is 25 years old."}], "model": "tiny",
    "max_tokens": 300, "stream": True, "tool_choice": {"type": "function", "function": {"name": "IterableUser"}},
    "tools": [{"type": "function", "function": {"name": "IterableUser",
                                                "description": "Correct segmentation of `User` tasks",
                                                "parameters": USERS_PARAMETERS}}]}


def test_a_forced_call_whose_parameters_refer_to_their_own_defs_is_made_and_validates(server):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    r = server.http.post(server.url + "/v1/chat/completions", json=PYDANTIC_AI_CHAT, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "final_result"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TRIP_PARAMETERS)

    r = server.http.post(server.url + "/v1/responses", json=PYDANTIC_AI_RESPONSES, timeout=120)
    assert r.status_code == 200, r.text
    calls = [o for o in r.json()["output"] if o["type"] == "function_call"]
    assert calls and r.json()["status"] == "completed", r.json()
    for call in calls:
        assert call["name"] == "final_result"
        jsonschema.validate(json.loads(call["arguments"]), TRIP_PARAMETERS)

    with server.http.stream("POST", server.url + "/v1/chat/completions", json=INSTRUCTOR_ITERABLE, timeout=120) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [d for ch in chunks for c in ch["choices"] for d in c["delta"].get("tool_calls") or []]
    assert [d["function"]["name"] for d in deltas if d["function"].get("name")] == ["IterableUser"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"          # a named tool_choice's, as OpenAI's
    jsonschema.validate(json.loads("".join(d["function"].get("arguments") or "" for d in deltas)), USERS_PARAMETERS)


# One turn of each agent framework's tool loop, as recorded against `agp serve` (model renamed; room
# for the tiny model's call: max tokens 300, temperature 0 where the turn must make a call): the first turn forces the call, the next carries the
# call and its result back in the framework's own shape, with the fields that framework adds.
WEATHER = {"name": "get_weather", "description": "Get the weather of a city.",
           "parameters": {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"],
                          "title": "get_weather_args", "type": "object", "additionalProperties": False},
           "strict": True}
ASKED = {"role": "user", "content": "What is the weather in Paris?"}
CALL_ID = "call_35f927dcc93542cb813a464f"
AGENTS_SDK = {"include": ["message.output_text.logprobs"], "instructions": "Use the tool.", "max_output_tokens": 300,
              "metadata": {"k": "v"}, "parallel_tool_calls": False, "prompt_cache_retention": "24h", "store": True,
              "temperature": 0, "tools": [{**WEATHER, "type": "function"}], "top_logprobs": 2, "top_p": 0.9,
              "truncation": "auto"}
AGENTS_SDK_CHAT = {"logprobs": True, "max_tokens": 300, "metadata": {"k": "v"}, "parallel_tool_calls": False,
                   "prompt_cache_retention": "24h", "store": True, "temperature": 0, "top_logprobs": 2, "top_p": 0.9,
                   "tools": [{"type": "function", "function": WEATHER}]}
ASSISTANT_CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
    "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
TOOL_RESULT = {"role": "tool", "tool_call_id": CALL_ID, "content": "sunny in Paris"}
HAYSTACK_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city.\n\n    :param city: the city's name\n    ",
    "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}
SMOL_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city.",
                                                "parameters": {"type": "object", "properties": {"city": {
                                                    "type": "string", "description": "the city's name"}},
                                                    "required": ["city"]}}},
              {"type": "function", "function": {"name": "final_answer",
                                                "description": "Provides a final answer to the given problem.",
                                                "parameters": {"type": "object", "properties": {"answer": {
                                                    "type": "string", "description": "The final answer to the problem"}},
                                                    "required": ["answer"]}}}]
AI_SDK_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city.",
    "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                   "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
FRAMEWORK_TURNS = {
    # openai-agents 0.24, OpenAIResponsesModel, ModelSettings with every field it maps
    "openai-agents responses, forced": ("/v1/responses", {**AGENTS_SDK, "input": [ASKED], "tool_choice": "required"}),
    "openai-agents responses, result": ("/v1/responses", {**AGENTS_SDK, "input": [
        ASKED, {"arguments": "{\"city\": \"Paris\"}", "call_id": CALL_ID, "name": "get_weather",
                "type": "function_call", "id": "fc_f362360b33e24aa1b8e083d1b2fded23", "status": "completed"},
        {"call_id": CALL_ID, "output": "sunny in Paris", "type": "function_call_output"}]}),
    # openai-agents 0.24, OpenAIChatCompletionsModel
    "openai-agents chat, forced": ("/v1/chat/completions", {**AGENTS_SDK_CHAT, "tool_choice": "required", "messages": [
        {"content": "Use the tool.", "role": "system"}, ASKED]}),
    "openai-agents chat, result": ("/v1/chat/completions", {**AGENTS_SDK_CHAT, "messages": [
        {"content": "Use the tool.", "role": "system"}, ASKED, ASSISTANT_CALL, TOOL_RESULT]}),
    # autogen-ext 0.7.5 OpenAIChatCompletionClient: the speaker's name, its create arguments
    "autogen": ("/v1/chat/completions", {
        "stream": False, "messages": [{"content": "Be brief.", "role": "system"},
                                      {"role": "user", "name": "alice", "content": "Say hello."}],
        "frequency_penalty": 0.1, "logit_bias": {"28": -5}, "max_tokens": 300, "parallel_tool_calls": False,
        "presence_penalty": 0.1, "reasoning_effort": "low", "seed": 3, "stop": ["\n\n"], "temperature": 0.7,
        "top_p": 0.9, "user": "u1", "tool_choice": "required",
        "tools": [{"type": "function", "function": {**WEATHER, "strict": False}}]}),
    # haystack-ai 3.4 OpenAIChatGenerator: an assistant turn of calls alone has no content key
    "haystack, result": ("/v1/chat/completions", {
        "stream": False, "max_tokens": 60, "n": 1, "tools": [HAYSTACK_TOOL], "messages": [
            ASKED, {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}, "id": CALL_ID}]},
            {"role": "tool", "content": "sunny in Paris", "tool_call_id": CALL_ID}]}),
    # smolagents 1.26 ToolCallingAgent: text parts, its stop strings, a call required every step, streamed
    "smolagents, forced": ("/v1/chat/completions", {
        "stream": True, "stream_options": {"include_usage": True}, "stop": ["Observation:", "Calling tools:"],
        "max_tokens": 300,
        "tool_choice": "required", "tools": SMOL_TOOLS, "temperature": 0, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are an expert assistant who can solve any "
                                                                    "task using tool calls."}]},
            {"role": "user", "content": [{"type": "text", "text": "New task:\nWhat is the weather in Paris?"}]}]}),
    # the Vercel AI SDK 6.0 (@ai-sdk/openai 3.0, openai.chat and openai.responses; @ai-sdk/openai-compatible
    # sends the chat bodies too): generateText with a zod tool (its JSON schema names $schema) forced, then
    # toolChoice "none" for the step that carries the call and its result back
    "vercel ai chat, forced": ("/v1/chat/completions", {
        "max_tokens": 300, "temperature": 0, "tools": [AI_SDK_TOOL], "tool_choice": "required",
        "messages": [{"role": "system", "content": "Use the tool."}, ASKED]}),
    "vercel ai chat, result": ("/v1/chat/completions", {
        "max_tokens": 300, "temperature": 0, "tools": [AI_SDK_TOOL], "tool_choice": "none", "messages": [
            {"role": "system", "content": "Use the tool."}, ASKED,
            {"role": "assistant", "content": None, "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            TOOL_RESULT]}),
    "vercel ai responses, forced": ("/v1/responses", {
        "max_output_tokens": 300, "tools": [{"type": "function", **AI_SDK_TOOL["function"]}], "tool_choice": "required",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": ASKED["content"]}]}]}),
    "vercel ai responses, result": ("/v1/responses", {
        "max_output_tokens": 60, "tools": [{"type": "function", **AI_SDK_TOOL["function"]}], "tool_choice": "none",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": ASKED["content"]}]},
                  {"type": "function_call", "call_id": CALL_ID, "name": "get_weather",
                   "arguments": "{\"city\":\"Paris\"}"},
                  {"type": "function_call_output", "call_id": CALL_ID, "output": "\"sunny in Paris\""}]}),
    # llm 0.36 with a `responses: true` model of extra-openai-models.yaml: `--functions`, a call's result
    "llm responses, result": ("/v1/responses", {
        "stream": True, "max_output_tokens": 60, "store": False, "temperature": 0.0,
        "tools": [{"type": "function", "name": "get_weather", "description": "Get the weather of a city.",
                   "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}],
        "input": [{"role": "user", "content": "What is the weather in Paris?"},
                  {"type": "function_call", "call_id": CALL_ID, "name": "get_weather",
                   "arguments": "{\"city\": \"Paris\"}"},
                  {"type": "function_call_output", "call_id": CALL_ID, "output": "sunny in Paris"}]}),
}


def _answer(server, path, body):
    """The answer as one JSON object: a stream's chunks put back together as the frameworks read them."""
    if not body.get("stream"):
        r = server.http.post(server.url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()
    with server.http.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    if path == "/v1/responses":
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        return events[-1]["response"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1   # include_usage
    calls = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls") or []]
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    return {"choices": [{"finish_reason": finish[-1], "message": {"tool_calls": calls or None}}]}


@pytest.mark.parametrize("turn", list(FRAMEWORK_TURNS))
def test_an_agent_frameworks_tool_turn_is_answered_as_it_reads_it(server, turn):
    pytest.importorskip("llguidance")
    path, body = FRAMEWORK_TURNS[turn]
    out = _answer(server, path, {"model": "tiny", **body})
    forced = body.get("tool_choice") == "required"
    if path == "/v1/responses":
        assert out["metadata"] == body.get("metadata", {}) and out["store"] == body.get("store", True)
        calls = [o for o in out["output"] if o["type"] == "function_call"]
    else:
        choice = out["choices"][0]
        calls = [c["function"] for c in choice["message"].get("tool_calls") or []]
        assert not forced or choice["finish_reason"] == "tool_calls", choice
    if forced:      # one call (parallel_tool_calls false, or one call a step) of a tool it offered, arguments in full
        tools = {t.get("function", t)["name"]: t.get("function", t)["parameters"]["required"] for t in body["tools"]}
        assert len(calls) == 1 and calls[0]["name"] in tools, calls
        assert set(json.loads(calls[0]["arguments"])) == set(tools[calls[0]["name"]])

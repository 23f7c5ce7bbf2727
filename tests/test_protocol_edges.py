"""The OpenAI wire format at its edges, without a server: each error names its field and shows
the value it got (the JSON type, at most 40 characters of it), and the answer bodies are the
exact objects OpenAI clients parse (chat and completion answers, stream chunks, usage)."""
from __future__ import annotations

import pytest

from pipeline_dsl.serve import protocol as P

SERVED = ("tiny", "tiny-model")
HI = [{"role": "user", "content": "hi"}]


def chat(obj, max_model_len=512, lenient=False):
    return P.parse_chat(obj, max_model_len=max_model_len, served=SERVED, stages=("gen",), lenient=lenient)


def completion(obj, max_model_len=512, lenient=False):
    return P.parse_completion(obj, max_model_len=max_model_len, served=SERVED, stages=("gen",), lenient=lenient)


def refused(parse, obj, **kw) -> P.APIError:
    with pytest.raises(P.APIError) as e:
        parse(obj, **kw)
    return e.value


# ---------------------------------------------------------------- what an error shows of the value

@pytest.mark.parametrize("raw, shown", [
    (b"null", "null"), (b"true", "a boolean"), (b"3", "a number"), (b"2.5", "a number"),
    (b'"hi"', "a string"), (b"[1]", "an array"),
])
def test_a_body_that_is_not_an_object_is_named_by_its_json_type(raw, shown):
    e = refused(P.parse_json, raw)
    assert e.message == f"the request body must be a JSON object, not {shown}"
    assert e.status == 400 and e.param is None


@pytest.mark.parametrize("value, message", [
    ({"a": 1}, "'stream' must be true or false, not an object ({\"a\": 1})"),
    ([True], "'stream' must be true or false, not an array ([true])"),
    ("yes", "'stream' must be true or false, not a string (\"yes\")"),
    (1, "'stream' must be true or false, not 1"),
])
def test_a_wrongly_typed_field_shows_its_type_and_value(value, message):
    e = refused(completion, {"prompt": "hi", "stream": value})
    assert (e.message, e.param, e.status) == (message, "stream", 400)


def test_a_bad_value_is_shown_whole_up_to_40_characters_and_cut_beyond():
    forty = "x" * 38                                   # 40 characters as JSON, with its quotes
    e = refused(completion, {"prompt": "hi", "stream": True, "stream_options": forty})
    assert e.message == f"'stream_options' must be an object, not a string (\"{forty}\")"
    e = refused(completion, {"prompt": "hi", "stream": True, "stream_options": forty + "y"})
    assert e.message == f"'stream_options' must be an object, not a string (\"{'x' * 36}...)"
    assert e.param == "stream_options"


def test_a_missing_or_null_value_is_shown_as_null():
    e = refused(P.parse_detokenize, {}, served=SERVED)
    assert (e.message, e.param) == ("'tokens' must be an array of token ids, not null (null)", "tokens")
    e = refused(P.parse_tokenize, {"prompt": None}, served=SERVED)
    assert (e.message, e.param) == ("'prompt' must be a string, not null (null)", "prompt")


# ---------------------------------------------------------------- fields served only at their neutral value

@pytest.mark.parametrize("field, value", [("best_of", 1), ("best_of", 1.0), ("suffix", "")])
def test_best_of_1_and_an_empty_suffix_are_accepted(field, value):
    assert completion({"prompt": "hi", field: value}).prompt == "hi"


@pytest.mark.parametrize("field, value, shown", [
    ("best_of", 2, "2"), ("best_of", True, "true"), ("best_of", float("inf"), "Infinity"),
    ("suffix", "x", '"x"'), ("suffix", 0, "0"),
])
def test_best_of_and_suffix_at_another_value_are_refused_naming_the_field(field, value, shown):
    e = refused(completion, {"prompt": "hi", field: value})
    neutral = "1" if field == "best_of" else '""'
    assert e.message == f"'{field}' = {shown} is not supported by agp (leave it out or use {neutral})"
    assert e.param == field


def test_an_unsupported_value_is_shown_up_to_40_characters():
    e = refused(completion, {"prompt": "hi", "suffix": "x" * 50})
    assert e.message == f"'suffix' = \"{'x' * 39} is not supported by agp (leave it out or use \"\")"


# ---------------------------------------------------------------- tool calls in an answer

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_a_chat_answer_with_tools_turns_a_call_into_tool_calls():
    use = P.usage(5, 7, 0)
    body = P.chat_response("r1", "tiny", [(0, "Let me look. " + CALL, "stop")], use, created=11, tools_active=True)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["index"] == 0 and choice["logprobs"] is None
    message = choice["message"]
    assert set(message) == {"role", "content", "tool_calls", "reasoning", "reasoning_content"}
    assert message["role"] == "assistant" and message["content"] == "Let me look. "   # as written: what a stream sends
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body == {"id": "r1", "object": "chat.completion", "created": 11, "model": "tiny", "system_fingerprint": None,
                    "choices": [choice], "usage": use}


def test_a_chat_answer_without_tools_keeps_a_call_as_text():
    body = P.chat_response("r1", "tiny", [(0, CALL, "length")], P.usage(1, 2, 0), created=3)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": CALL, **P.NO_REASONING},
                                "logprobs": None, "finish_reason": "length"}]
    message, reason = P.chat_message("plain text", "stop", tools_active=True)
    assert (message, reason) == ({"role": "assistant", "content": "plain text"}, "stop")


@pytest.mark.parametrize("cut, names", [
    ('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}, {"name": "c", "argu', "ab"),
    ('<tool_call>{"name": "a", "arguments": {"x": [1, 2]}}', "a"),
    ('<tool_call>[{"name": "a", "arguments": {"s": "}, {"}}', "a"),
])
def test_an_answer_cut_inside_a_call_block_keeps_its_finished_calls_whole_and_streamed(cut, names):
    """A model made to call (tool_choice "required") that writes calls until max_tokens: the
    calls written in full are its calls, the unfinished one is dropped; the partial block was
    returned as the message's content with no call at all."""
    from pipeline_dsl.tools import ToolStream

    message, reason = P.chat_message("Calling. " + cut, "length", tools_active=True)
    assert reason == "tool_calls" and message["content"] == "Calling. "
    assert "".join(c["function"]["name"] for c in message["tool_calls"]) == names
    stream = ToolStream()
    sent, calls = "", []
    for i in range(0, len("Calling. " + cut), 3):          # three characters a delta
        text, found = stream.feed(("Calling. " + cut)[i:i + 3])
        sent, calls = sent + text, calls + found
    rest, found = stream.finish()
    assert sent + rest == "Calling. " and [c["index"] for c in calls + found] == list(range(len(names)))
    assert [c["function"] for c in calls + found] == [c["function"] for c in message["tool_calls"]]
    # an unfinished block with no finished call stays the content, as before
    assert P.chat_message('<tool_call>[{"name": "a", "argu', "length", tools_active=True) == (
        {"role": "assistant", "content": '<tool_call>[{"name": "a", "argu'}, "length")
    one = ToolStream(limit=1)
    one.feed(cut)
    assert len(one.finish()[1]) == 1


# ---------------------------------------------------------------- answer bodies, exactly

def test_usage_counts_total_as_prompt_plus_completion_and_lists_cached():
    assert P.usage(9, 4, 8) == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
                                "prompt_tokens_details": {"cached_tokens": 8}}


@pytest.mark.parametrize("kind, obj", [("chat", "chat.completion.chunk"), ("completion", "text_completion")])
def test_the_usage_chunk_is_the_last_chunk_with_no_choices(kind, obj):
    use = P.usage(3, 2, 0)
    assert P.usage_chunk("r9", "tiny", 42, kind, use) == {
        "id": "r9", "object": obj, "created": 42, "model": "tiny", "system_fingerprint": None, "choices": [],
        "usage": use}


def test_chat_and_completion_chunks_carry_their_choice_index_delta_and_logprobs():
    lp = {"content": []}
    assert P.chat_chunk("r1", "tiny", 7, {"content": "hé"}, None, 2, lp) == {
        "id": "r1", "object": "chat.completion.chunk", "created": 7, "model": "tiny", "system_fingerprint": None,
        "choices": [{"index": 2, "delta": {"content": "hé"}, "logprobs": lp, "finish_reason": None}]}
    assert P.chat_chunk("r1", "tiny", 7, {}, "stop")["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert P.completion_chunk("r2", "tiny", 8, "ab", "length", 3, None) == {
        "id": "r2", "object": "text_completion", "created": 8, "model": "tiny", "system_fingerprint": None,
        "choices": [{"index": 3, "text": "ab", "logprobs": None, "finish_reason": "length"}]}
    assert P.completion_chunk("r2", "tiny", 8, "", "stop")["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]


def test_a_completion_answer_lists_its_choices_in_order_with_usage():
    use = P.usage(2, 3, 1)
    lp = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [None], "text_offset": [0]}
    assert P.completion_response("c1", "tiny", [(0, "a", "stop", lp), (1, "b", "length")], use, created=5) == {
        "id": "c1", "object": "text_completion", "created": 5, "model": "tiny", "system_fingerprint": None,
        "choices": [{"index": 0, "text": "a", "logprobs": lp, "finish_reason": "stop"},
                    {"index": 1, "text": "b", "logprobs": None, "finish_reason": "length"}],
        "usage": use}


def test_an_event_is_compact_utf8_json_then_a_blank_line():
    assert P.sse({"text": "é", "n": [1, 2]}) == 'data: {"text":"é","n":[1,2]}\n\n'.encode()
    assert P.sse("[DONE]") == b"data: [DONE]\n\n"


# ---------------------------------------------------------------- logprobs, both shapes

TEXT = {5: "he", 6: "llo", 7: " w", 8: "é"}


def test_chat_logprobs_list_each_token_with_its_utf8_bytes_and_alternatives():
    entries = [{"token_id": 5, "logprob": -0.1, "top": [(5, -0.1), (6, -2.5)]},
               {"token_id": 8, "logprob": -1.0, "top": []}]
    assert P.chat_logprobs(entries, TEXT.get) == {"content": [
        {"token": "he", "logprob": -0.1, "bytes": [104, 101],
         "top_logprobs": [{"token": "he", "logprob": -0.1, "bytes": [104, 101]},
                          {"token": "llo", "logprob": -2.5, "bytes": [108, 108, 111]}]},
        {"token": "é", "logprob": -1.0, "bytes": [195, 169], "top_logprobs": []}]}


# ---------------------------------------------------------------- requests: every field where it belongs

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_a_chat_request_carries_every_field_it_sets():
    req = chat({"model": "gen", "messages": HI, "logprobs": True, "top_logprobs": 20, "metadata": {"t": 1},
                "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False,
                "response_format": {"type": "json_object"}, "request_id": "abc",
                "chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False,
                "stream": True, "stream_options": {"include_usage": True}})
    assert req == P.GenerationRequest(
        "chat", "gen", {"logprobs": 20, "skip_special_tokens": False}, messages=tuple(HI), stream=True,
        include_usage=True, pin="gen", metadata={"t": 1}, tools=(TOOL,), tool_choice="required",
        parallel_tool_calls=False, response_format={"type": "json_object"}, request_id="abc",
        chat_template_kwargs={"enable_thinking": False})
    assert chat({"messages": HI, "tools": [TOOL]}).tool_choice == "auto"


def test_a_plain_chat_request_takes_the_defaults():
    req = chat({"messages": HI})
    assert req == P.GenerationRequest("chat", "tiny", {}, messages=tuple(HI))
    assert req.choices_per_prompt == 1 and not req.tools_active and req.split() == [req]


def test_chat_logprobs_top_logprobs_from_0_to_20_and_only_with_logprobs():
    assert chat({"messages": HI, "logprobs": True}).fields == {"logprobs": 0}
    assert chat({"messages": HI, "logprobs": True, "top_logprobs": 0}).fields == {"logprobs": 0}
    assert chat({"messages": HI, "logprobs": True, "top_logprobs": 20}).fields == {"logprobs": 20}
    assert chat({"messages": HI, "logprobs": False}).fields == {}
    # 0 asks for nothing: taken without logprobs, as vLLM takes its request model's default
    assert chat({"messages": HI, "top_logprobs": 0}).fields == chat({"messages": HI, "logprobs": False,
                                                                    "top_logprobs": 0}).fields == {}
    e = refused(chat, {"messages": HI, "logprobs": True, "top_logprobs": 21})
    assert (e.message, e.param) == ("'top_logprobs' must be an integer from 0 to 20, not 21",
                                    "top_logprobs")
    e = refused(chat, {"messages": HI, "top_logprobs": 2})
    assert (e.message, e.param) == ("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    e = refused(chat, {"messages": HI, "logprobs": 1})
    assert (e.message, e.param) == ("'logprobs' must be true or false, not 1", "logprobs")


@pytest.mark.parametrize("extra, message, param", [
    ({"metadata": [1]}, "'metadata' must be an object, not an array ([1])", "metadata"),
    ({"tools": 5}, "'tools' must be an array of tools, not 5", "tools"),
    ({"tools": [TOOL], "tool_choice": "maybe"},
     '\'tool_choice\' must be none, auto, required or {"type": "function", "function": {"name"}}, not "maybe"',
     "tool_choice"),
    ({"chat_template_kwargs": {"messages": []}},
     "'chat_template_kwargs.messages' is set by agp itself; send it as its own field", "chat_template_kwargs"),
    # docs/openai.md: each of the template's variables agp sets itself, not only messages
    *(({"chat_template_kwargs": {own: True}}, f"'chat_template_kwargs.{own}' is set by agp itself; send it as its own "
       "field", "chat_template_kwargs") for own in ("tools", "add_generation_prompt", "bos_token", "eos_token")),
    ({"stream": True, "stream_options": {"include_usage": "yes"}},
     "'stream_options.include_usage' must be true or false, not a string (\"yes\")", "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": 1}},
     "'stream_options.continuous_usage_stats' must be true or false, not 1", "stream_options.continuous_usage_stats"),
    ({"messages": [{"role": "user", "content": "hi", "name": 5}]},
     "field 'messages[0].name' must be a string, got 5", "messages[0].name"),
    ({"messages": [*HI, {"role": "tool", "tool_call_id": 7, "content": "x"}]},
     "field 'messages[1].tool_call_id' must be a string, got 7", "messages[1].tool_call_id"),
])
def test_a_bad_chat_field_is_a_400_naming_it(extra, message, param):
    e = refused(chat, {"messages": HI, **extra})
    assert (e.message, e.param, e.status) == (message, param, 400)


def test_messages_left_out_is_a_400_naming_messages():
    e = refused(chat, {"model": "tiny"})
    assert (e.message, e.param) == ("'messages' is required", "messages")


def test_an_unknown_field_is_refused_unless_lenient():
    body = {"messages": HI, "frobnicate": 1}
    e = refused(P.parse_chat, body, max_model_len=512, served=SERVED)
    assert (e.message, e.param) == ('unrecognized request argument "frobnicate"', "frobnicate")
    assert chat(body, lenient=True) == chat({"messages": HI})
    e = refused(P.parse_completion, {"prompt": "hi", "frobnicate": 1}, max_model_len=512, served=SERVED)
    assert e.param == "frobnicate"
    assert completion({"prompt": "hi", "frobnicate": 1}, lenient=True) == completion({"prompt": "hi"})


def test_a_completion_request_carries_every_field_it_sets():
    req = completion({"model": "gen", "prompt": ["a", [1, 2]], "echo": True, "logprobs": 3, "max_tokens": 0,
                      "n": 2, "stream": True, "stream_options": {"include_usage": True}, "request_id": "q",
                      "response_format": {"type": "json_object"}, "skip_special_tokens": False})
    assert req == P.GenerationRequest(
        "completion", "gen", {"n": 2, "logprobs": 3, "prompt_logprobs": 3, "max_tokens": 0, "echo": True,
                              "skip_special_tokens": False},
        prompt="a", stream=True, include_usage=True, pin="gen", response_format={"type": "json_object"},
        more_prompts=([1, 2],), request_id="q")
    first, second = req.split()
    assert (first.prompt, first.prompt_token_ids, first.more_prompts) == ("a", None, ())
    assert (second.prompt, second.prompt_token_ids, second.more_prompts) == (None, (1, 2), ())
    assert second.item("i")["prompt_token_ids"] == [1, 2] and req.choices_per_prompt == 2


# ---------------------------------------------------------------- prompts, n, and the context

def small(obj):
    return completion(obj, max_model_len=8)


@pytest.mark.parametrize("prompt, message, code", [
    ([], "'prompt' is empty", None),
    ("", "'prompt' is empty", None),
    (["a", ""], "'prompt[1]' is empty", None),
    ([[]], "'prompt' must be a string, an array of token ids, or an array of those, not an array ([[]])", None),
    # the element that is no token id is named by its place (a prompt of 2,000 ids shown cut would hide it)
    ([1, -1], "'prompt[1]' = -1 is not a token id (an integer from 0)", None),
    ([1, True], "'prompt[1]' = true is not a token id (an integer from 0)", None),
    ([7] * 2000 + [3.5], "'prompt[2000]' = 3.5 is not a token id (an integer from 0)", None),
    (["a", [1, 2], [5, -4]], "'prompt[2][1]' = -4 is not a token id (an integer from 0)", None),
    ({"a": 1}, "'prompt' must be a string, an array of token ids, or an array of those, not an object "
               "({\"a\": 1})", None),
    ([1] * 9, "'prompt' holds 9 tokens, beyond the context of 8 tokens", "context_length_exceeded"),
    (["a", [1] * 9], "'prompt[1]' holds 9 tokens, beyond the context of 8 tokens", "context_length_exceeded"),
    (["a"] * 257, "'prompt' holds 257 prompts; at most 256 a request", None),
    (None, "'prompt' is required", None),
])
def test_a_bad_prompt_is_a_400_naming_prompt(prompt, message, code):
    e = refused(small, {"prompt": prompt})
    assert (e.message, e.param, e.status, e.code) == (message, "prompt", 400, code)


def test_prompts_up_to_the_bounds_are_accepted():
    assert small({"prompt": [0] * 8}) == P.GenerationRequest("completion", "tiny", {}, prompt_token_ids=(0,) * 8)
    assert small({"prompt": [[0] * 8, "b"]}).more_prompts == ("b",)
    req = small({"prompt": ["a"] * 256})
    assert req.prompt == "a" and len(req.more_prompts) == 255
    assert small({"prompt": ["a"] * 4, "n": 64}).fields == {"n": 64}
    assert small({"prompt": "a", "max_tokens": 8}).fields == {"max_tokens": 8}
    assert refused(small, {}).message == "'prompt' is required"


@pytest.mark.parametrize("prompts, n, message, param", [
    (5, 60, "5 prompts x n = 60 asks for 300 answers; at most 256 a request (send fewer prompts or a smaller n)",
     "prompt"),
    (1, 257, "1 prompts x n = 257 asks for 257 answers; at most 256 a request (send fewer prompts or a smaller n)",
     "n"),
])
def test_more_than_256_answers_a_request_is_refused(prompts, n, message, param):
    with pytest.raises(P.APIError) as e:
        P.check_choices(prompts, n)
    assert (e.value.message, e.value.param) == (message, param)
    P.check_choices(4, 64)
    P.check_choices(1, 256)
    e = refused(small, {"prompt": ["a"] * 5, "n": 60})
    assert e.param == "prompt" and "asks for 300 answers" in e.message


def test_max_tokens_beyond_the_context_names_the_field_the_client_wrote():
    e = refused(small, {"prompt": "a", "max_tokens": 9})
    assert (e.message, e.param, e.code) == (
        "'max_tokens' = 9 is beyond the context of 8 tokens, which the prompt shares; "
        "ask for at most 8 less the prompt's tokens", "max_tokens", "context_length_exceeded")
    e = refused(chat, {"messages": HI, "max_completion_tokens": 9, "max_tokens": 2}, max_model_len=8)
    assert (e.message, e.param) == (
        "'max_completion_tokens' = 9 is beyond the context of 8 tokens, which the prompt shares; "
        "ask for at most 8 less the prompt's tokens", "max_completion_tokens")
    assert chat({"messages": HI, "max_tokens": 5}).fields == {"max_tokens": 5}
    assert chat({"messages": HI, "max_completion_tokens": 6, "max_tokens": 5}).fields == {"max_tokens": 6}
    assert chat({"messages": HI, "max_completion_tokens": None, "max_tokens": 5}).fields == {"max_tokens": 5}


def test_a_chat_body_and_an_agp_run_line_read_max_tokens_from_the_same_field():
    """max_completion_tokens wins over max_tokens where given (null is not given), for agp serve's
    chat bodies and agp run's lines alike (requests_io.max_tokens_field): the same max_tokens, and
    the same field named where it is refused."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    for given, field, value in [({"max_tokens": 5}, "max_tokens", 5),
                                ({"max_completion_tokens": 6, "max_tokens": 5}, "max_completion_tokens", 6),
                                ({"max_completion_tokens": None, "max_tokens": 5}, "max_tokens", 5),
                                ({"max_completion_tokens": 7}, "max_completion_tokens", 7)]:
        served, line = chat({"messages": HI, **given}), parse_request({"messages": HI, **given})
        assert (served.max_tokens_field, served.fields["max_tokens"]) == (field, value), given
        assert (line.max_tokens_field, line.sampling["max_tokens"]) == (field, value), given
        body = {"messages": HI, **given, "min_tokens": 9}
        with pytest.raises(RequestError) as e:
            parse_request(body)
        assert refused(chat, body).message == str(e.value)
        assert f"above '{field}' = {value}" in str(e.value)


@pytest.mark.parametrize("extra, message, param", [
    ({"stop_token_ids": [1, -2]}, "'stop_token_ids[1]' = -2 is not a token id (an integer from 0)", "stop_token_ids"),
    ({"stop_token_ids": [1, True]}, "'stop_token_ids[1]' = true is not a token id (an integer from 0)",
     "stop_token_ids"),
    ({"stop_token_ids": 3}, "'stop_token_ids' must be an array of token ids, not 3", "stop_token_ids"),
    ({"logit_bias": [1]}, "'logit_bias' must be an object {\"token id\": bias}, not [1]", "logit_bias"),
    ({"temperature": 5}, "'temperature' must be a number from 0 to 2, not 5.0", "temperature"),
    ({"stream_options": {"include_usage": True}}, "'stream_options' is only allowed with \"stream\": true",
     "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "y"}},
     "'stream_options.include_usage' must be true or false, not a string (\"y\")", "stream_options.include_usage"),
    ({"echo": 1}, "'echo' must be true or false, not 1", "echo"),
    ({"logprobs": 21}, "'logprobs' must be an integer from 0 to 20, not 21", "logprobs"),
    ({"logprobs": -1}, "'logprobs' must be an integer from 0 to 20, not -1", "logprobs"),
    ({"logprobs": True}, "'logprobs' must be an integer from 0 to 20, not a boolean (true)", "logprobs"),
    ({"model": 5}, "'model' must be a string, not 5", "model"),
    ({"max_tokns": 3}, "unrecognized request argument \"max_tokns\"; did you mean 'max_tokens'?", "max_tokns"),
    ({"zzzzqq": 3}, "unrecognized request argument \"zzzzqq\"", "zzzzqq"),
])
def test_a_bad_completion_field_is_a_400_naming_it(extra, message, param):
    e = refused(small, {"prompt": "a", **extra})
    assert (e.message, e.param, e.status) == (message, param, 400)


def test_completion_fields_at_their_edges():
    assert small({"prompt": "a", "stop_token_ids": [0, 2]}).fields == {"stop_token_ids": [0, 2]}
    assert small({"prompt": "a", "stop_token_ids": []}).fields == {"stop_token_ids": []}
    assert small({"prompt": "a", "logit_bias": {"5": 1}}).fields == {"logit_bias": {5: 1.0}}
    assert small({"prompt": "a", "logprobs": 0}).fields == {"logprobs": 0}
    assert small({"prompt": "a", "logprobs": 20}).fields == {"logprobs": 20}
    assert small({"prompt": "a", "echo": True, "max_tokens": 3}).fields == {"max_tokens": 3, "echo": True}
    e = refused(small, {"prompt": "a", "echo": False, "max_tokens": 0})    # 0 tokens: only to score an echo
    assert (e.message, e.param) == ("'max_tokens' = 0 generates nothing, so it is taken only with \"echo\": true "
                                    "(the prompt scored, with \"logprobs\": lm-eval's loglikelihood); give 1 or "
                                    "more to generate", "max_tokens")
    assert small({"prompt": "a", "echo": True, "max_tokens": 0}).fields == {"max_tokens": 0, "echo": True}
    for not_a_count, shown in ((False, "false"), (0.0, "0.0")):    # no more a token count with echo
        e = refused(small, {"prompt": "a", "echo": True, "max_tokens": not_a_count})
        assert (e.message, e.param) == (f"'max_tokens' must be an integer from 1 to 1048576, not {shown}",
                                        "max_tokens")
    assert small({"prompt": "a", "echo": True, "logprobs": 2}).fields == {"logprobs": 2, "prompt_logprobs": 2,
                                                                          "echo": True}
    req = small({"prompt": "a", "stream": True, "stream_options": {}})
    assert (req.stream, req.include_usage) == (True, False)
    req = small({"prompt": "a", "stream": True, "stream_options": {"include_usage": False}})
    assert (req.stream, req.include_usage) == (True, False)
    req = small({"prompt": "a", "stream": False})
    assert (req.stream, req.include_usage) == (False, False)


@pytest.mark.parametrize("model, answered, pin", [
    (None, "tiny", None), ("tiny", "tiny", None), ("tiny-model", "tiny-model", None), ("gen", "gen", "gen"),
])
def test_the_model_answered_and_the_stage_it_pins(model, answered, pin):
    assert P.model_of({"model": model} if model else {}, SERVED, ("gen",)) == (answered, pin)
    req = small({"prompt": "a", **({"model": model} if model else {})})
    assert (req.model, req.pin) == (answered, pin)


def test_an_unknown_model_is_a_404_with_the_closest_name_or_the_list():
    e = refused(small, {"prompt": "a", "model": "nothing"})
    assert (e.message, e.param, e.status, e.code) == (
        "the model 'nothing' does not exist; the pipeline answers to tiny, tiny-model, gen", "model", 404,
        "model_not_found")
    e = refused(small, {"prompt": "a", "model": "gem"})
    assert e.message == "the model 'gem' does not exist; did you mean 'gen'?"
    e = refused(small, {"prompt": "a", "model": "tyni"})        # two letters swapped in a short name
    assert e.message == "the model 'tyni' does not exist; did you mean 'tiny'?"
    e = refused(P.parse_completion, {"prompt": "a", "model": "gen"}, max_model_len=8, served=SERVED)
    assert e.status == 404 and e.message == "the model 'gen' does not exist; the pipeline answers to tiny, tiny-model"


# ---------------------------------------------------------------- /tokenize and /detokenize

def tokenize(obj):
    return P.parse_tokenize(obj, served=SERVED, stages=("gen",))


def detokenize(obj, max_model_len=None):
    return P.parse_detokenize(obj, served=SERVED, stages=("gen",), max_model_len=max_model_len)


def test_tokenize_takes_a_prompt_or_messages_and_the_stage_the_model_names():
    plain = {"prompt": "hi", "add_special_tokens": True, "pin": None, "return_token_strs": False}
    assert tokenize({"prompt": "hi"}) == plain
    assert tokenize({"prompt": "hi", "add_special_tokens": False, "model": "gen", "return_token_strs": True}) == {
        **plain, "add_special_tokens": False, "pin": "gen", "return_token_strs": True}
    assert tokenize({"prompt": "hi", "add_special_tokens": True}) == plain
    assert tokenize({"prompt": ""}) == {**plain, "prompt": ""}       # counted, as vLLM counts it
    chat = {"messages": HI, "pin": None, "chat_template_kwargs": None, "return_token_strs": False}
    assert tokenize({"messages": HI}) == chat
    assert tokenize({"messages": HI, "add_generation_prompt": True, "return_token_strs": False}) == {
        **chat, "add_generation_prompt": True}
    assert tokenize({"messages": HI, "add_generation_prompt": False, "continue_final_message": True}) == {
        **chat, "add_generation_prompt": False, "continue_final_message": True}
    assert tokenize({"messages": HI, "model": "gen", "tools": [TOOL], "chat_template_kwargs": {"x": 1}}) == {
        **chat, "pin": "gen", "chat_template_kwargs": {"x": 1}, "tools": [TOOL], "tool_choice": "auto"}


def test_tokenize_and_detokenize_take_null_as_left_out_as_they_are_described():
    """A client sends null for the fields it leaves unset: {"prompt": "hi", "messages": null} was a 400
    ("give exactly one of 'prompt' or 'messages'"), and /openapi.json described no field of either
    route as nullable, where every generation route's optional fields are."""
    import jsonschema

    from pipeline_dsl.serve import openapi as OA

    assert tokenize({"prompt": "hi", "messages": None}) == tokenize({"prompt": "hi"})
    assert tokenize({"messages": HI, "prompt": None}) == tokenize({"messages": HI})
    assert refused(tokenize, {"prompt": None, "messages": None}).message == "give exactly one of 'prompt' or 'messages'"
    for body in ({"prompt": "hi", "messages": None, "model": None, "add_special_tokens": None},
                 {"messages": HI, "prompt": None, "tools": None, "add_generation_prompt": None}):
        jsonschema.validate(body, OA.TOKENIZE_REQUEST)
    detokenize_schema = OA.DETOKENIZE["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate({"tokens": [1, 2], "model": None}, detokenize_schema)
    assert detokenize({"tokens": [1, 2], "model": None}) == detokenize({"tokens": [1, 2]})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tokens": None}, detokenize_schema)


@pytest.mark.parametrize("obj, message, param", [
    ({"prompt": 5}, "'prompt' must be a string, not 5", "prompt"),
    ({}, "give exactly one of 'prompt' or 'messages'", "prompt"),
    ({"prompt": "a", "messages": HI}, "give exactly one of 'prompt' or 'messages'", "prompt"),
    ({"messages": HI, "tools": 3}, "'tools' must be an array of tools, not 3", "tools"),
    ({"messages": []}, "'messages' is empty: give at least one message", "messages"),
    ({"prompt": "a", "add_special_tokens": "no"},
     "'add_special_tokens' must be true or false, not a string (\"no\")", "add_special_tokens"),
    ({"prompt": "a", "foo": 1}, "unrecognized request argument \"foo\"", "foo"),
    ({"messages": HI, "continue_final_message": True, "add_generation_prompt": True},
     "'continue_final_message' and 'add_generation_prompt' cannot both be true: the answer either goes on with "
     "the last message or starts a new turn", "continue_final_message"),
    ({"messages": HI, "add_generation_prompt": 1}, "'add_generation_prompt' must be true or false, not 1",
     "add_generation_prompt"),
    ({"prompt": "a", "return_token_strs": "yes"},
     "'return_token_strs' must be true or false, not a string (\"yes\")", "return_token_strs"),
    ({"prompt": "a", "model": 1}, "'model' must be a string, not 1", "model"),
    # what renders a conversation, beside a prompt (once taken unchecked, a value of any type), and the
    # start token beside messages (once ignored): refused as /v1/embeddings refuses them
    ({"prompt": "a", "add_generation_prompt": 12345},
     "'add_generation_prompt' renders 'messages', and this request tokenizes a 'prompt'", "add_generation_prompt"),
    ({"prompt": "a", "continue_final_message": True},
     "'continue_final_message' renders 'messages', and this request tokenizes a 'prompt'", "continue_final_message"),
    ({"prompt": "a", "chat_template_kwargs": "x"},
     "'chat_template_kwargs' renders 'messages', and this request tokenizes a 'prompt'", "chat_template_kwargs"),
    ({"prompt": "a", "tools": [TOOL]}, "'tools' renders 'messages', and this request tokenizes a 'prompt'", "tools"),
    ({"messages": HI, "add_special_tokens": True}, "'add_special_tokens' = true is not supported with 'messages': the "
     "chat template writes the special tokens (leave it out or use false)", "add_special_tokens"),
])
def test_a_bad_tokenize_request_is_a_400_naming_its_field(obj, message, param):
    e = refused(tokenize, obj)
    assert (e.message, e.param, e.status) == (message, param, 400)


def test_detokenize_takes_token_ids_up_to_the_context():
    assert detokenize({"tokens": [1, 2]}) == ([1, 2], None)
    assert detokenize({"tokens": [0, 2], "model": "gen"}, max_model_len=2) == ([0, 2], "gen")
    assert detokenize({"tokens": []}) == ([], None)
    e = refused(detokenize, {"tokens": [1, 2, 3]}, max_model_len=2)
    assert (e.message, e.param, e.code) == ("'tokens' holds 3 ids; at most 2 (the context)", "tokens",
                                            "context_length_exceeded")
    for bad, message in (([1, -2], "'tokens[1]' = -2 is not a token id (an integer from 0)"),
                         ([True], "'tokens[0]' = true is not a token id (an integer from 0)"),
                         ("1", "'tokens' must be an array of token ids, not a string (\"1\")")):
        e = refused(detokenize, {"tokens": bad})
        assert (e.message, e.param) == (message, "tokens")
    e = refused(detokenize, {"tokens": [], "x": 1})
    assert e.param == "x"
    e = refused(detokenize, {"tokens": [], "model": "nope"})
    assert e.status == 404 and e.param == "model"


# ---------------------------------------------------------------- completion logprobs (the legacy shape)

def at(start: int = 0, text=TEXT.get) -> P.TextOffsets:
    """text_offset from `start`, each token's bytes its text's (no token here splits a character)."""
    return P.TextOffsets(lambda t: text(t).encode(), start)


def test_completion_logprobs_list_tokens_with_offsets_from_the_start():
    data = {"logprobs": [{"token_id": 5, "logprob": -0.5, "top": [(5, -0.5), (6, -1.5)]},
                         {"token_id": 6, "logprob": -0.25, "top": None}]}
    assert P.completion_logprobs(data, TEXT.get, None, at(3)) == {
        "tokens": ["he", "llo"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"he": -0.5, "llo": -1.5}, None], "text_offset": [3, 5]}
    chosen = {"logprobs": [{"token_id": 6, "logprob": -1.5, "top": [(5, -0.5)]}]}    # not among the top 1
    assert P.completion_logprobs(chosen, TEXT.get, None, at())["top_logprobs"] == [{"he": -0.5, "llo": -1.5}]
    zero = {"logprobs": [{"token_id": 6, "logprob": -1.5, "top": []}]}                 # logprobs: 0
    assert P.completion_logprobs(zero, TEXT.get, None, at())["top_logprobs"] == [{"llo": -1.5}]
    assert P.completion_logprobs({}, TEXT.get, None, at()) == {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def test_echoed_completion_logprobs_start_with_the_prompt_whose_first_token_has_none():
    data = {"prompt_token_ids": [7, 8],
            "prompt_logprobs": [{"token_id": 99, "logprob": -9.0, "top": [(5, -1.0)]},
                                {"token_id": 8, "logprob": -2.0, "top": [(8, -2.0), (5, -3.0)]}],
            "logprobs": [{"token_id": 5, "logprob": -0.5, "top": [(5, -0.5)]}]}
    assert P.completion_logprobs(data, TEXT.get, " wé", at()) == {
        "tokens": [" w", "é", "he"], "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {"é": -2.0, "he": -3.0}, {"he": -0.5}], "text_offset": [0, 2, 3]}
    assert P.completion_logprobs(data, TEXT.get, None, at())["tokens"] == ["he"]       # not echoed: the answer only
    assert P.completion_logprobs({**data, "prompt_logprobs": None}, TEXT.get, " wé", at())["tokens"] == ["he"]


def test_text_offsets_of_tokens_that_split_a_character_point_into_the_text():
    """A byte-level BPE cuts "日" (3 bytes) over tokens that each read U+FFFD alone: their offsets
    stay inside the text (the character they begin in), and the tokens after are placed where
    their text is, not a character further for every split."""
    text = " 日本 ok"
    pieces = {1: b" \xe6\x97", 2: b"\xa5", 3: "本".encode(), 4: b" ", 5: b"o", 6: b"k"}
    names = {t: b.decode("utf-8", errors="replace") for t, b in pieces.items()}
    data = {"logprobs": [{"token_id": t, "logprob": -1.0, "top": None} for t in pieces]}
    lp = P.completion_logprobs(data, names.get, None, P.TextOffsets(pieces.get))
    assert lp["tokens"] == [" \ufffd", "\ufffd", "本", " ", "o", "k"]
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5]
    assert all(text[o:o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]) if "\ufffd" not in t)
    # a stream's chunks carry one TextOffsets per choice: a character cut between two chunks too
    offsets = P.TextOffsets(pieces.get, 10)
    first = P.completion_logprobs({"logprobs": data["logprobs"][:1]}, names.get, None, offsets)
    rest = P.completion_logprobs({"logprobs": data["logprobs"][1:]}, names.get, None, offsets)
    assert first["text_offset"] + rest["text_offset"] == [10, 11, 12, 13, 14, 15]


def test_special_tokens_the_text_leaves_out_take_no_characters():
    """4 is a special token ("<s>"): a prompt's one counts where the echoed prompt holds it (typed
    in it) and not where the tokenizer put it first; a generated one counts only when the answer
    keeps special tokens (skip_special_tokens false)."""
    text = {4: "<s>", 5: "he", 6: "llo"}
    pieces = {t: x.encode() for t, x in text.items()}
    entries = [{"token_id": t, "logprob": -1.0, "top": None} for t in (4, 5)]
    data = {"prompt_token_ids": [4, 5], "prompt_logprobs": [None, entries[1]],
            "logprobs": [{"token_id": t, "logprob": -1.0, "top": None} for t in (6, 4, 5)]}

    def offsets(echoed, skip=True):
        return P.completion_logprobs(data, text.get, echoed, P.TextOffsets(pieces.get, 0, {4}, skip))["text_offset"]

    assert offsets("he") == [0, 0, 2, 5, 5]                  # "he" + "llohe"
    assert offsets("<s>he") == [0, 3, 5, 8, 8]               # "<s>he" + "llohe"
    assert offsets("he", skip=False) == [0, 0, 2, 5, 8]      # "he" + "llo<s>he"
    assert offsets(None) == [0, 3, 3]                        # "llohe"


def test_alternatives_whose_text_coincides_keep_the_likeliest():
    text = {1: "\ufffd", 2: "\ufffd", 3: "a"}.get
    data = {"logprobs": [{"token_id": 3, "logprob": -0.1, "top": [(1, -1.0), (3, -0.1), (2, -0.5)]}]}
    assert P.completion_logprobs(data, text, None, at(text=text))["top_logprobs"] == [{"\ufffd": -1.0, "a": -0.1}]


# ---------------------------------------------------------------- the request as items carry it

def test_the_request_item_carries_what_the_client_set():
    req = chat({"model": "tiny", "messages": HI, "n": 2, "metadata": {"k": "v"}, "tools": [TOOL],
                "response_format": {"type": "json_object"}, "chat_template_kwargs": {"x": 1}, "seed": 4})
    assert req.item("r7") == {
        "id": "r7", "messages": HI, "n": 2, "seed": 4, "model": "tiny", "metadata": {"k": "v"}, "headers": {},
        "tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": True,
        "response_format": {"type": "json_object"}, "chat_template_kwargs": {"x": 1}}
    assert req.choices_per_prompt == 2 and req.tools_active
    assert completion({"prompt": "hi"}).item("c") == {"id": "c", "prompt": "hi", "model": "tiny", "metadata": {},
                                                      "headers": {}}
    assert completion({"prompt": [3, 4]}).item("c") == {"id": "c", "prompt_token_ids": [3, 4], "model": "tiny",
                                                        "metadata": {}, "headers": {}}


def test_answers_without_a_creation_time_get_the_current_one():
    import time
    before = int(time.time())
    body = P.chat_response("r", "tiny", [], P.usage(0, 0, 0))
    assert before <= body["created"] <= int(time.time()) and body["choices"] == []
    body = P.completion_response("r", "tiny", [], P.usage(0, 0, 0))
    assert before <= body["created"] <= int(time.time()) and body["object"] == "text_completion"


def test_a_body_is_parsed_as_a_json_object_or_refused_saying_why():
    assert P.parse_json(b'{"a": [1, 2]}') == {"a": [1, 2]}
    e = refused(P.parse_json, b"\xff")
    assert (e.message, e.param, e.status) == ("the request body is not UTF-8 text (byte 0)", None, 400)
    e = refused(P.parse_json, b"{")
    assert e.message == ("the request body is not valid JSON: Expecting property name enclosed in double quotes "
                         "(line 1, column 2)")
    e = refused(P.parse_json, b'{"prompt": "\\ud800"}')
    assert (e.message, e.param) == (
        "the request body holds a lone UTF-16 surrogate (invalid Unicode) in 'prompt'", "prompt")


def test_a_lenient_server_logs_the_fields_it_ignores(caplog):
    with caplog.at_level("INFO", logger="agp.serve"):
        assert chat({"messages": HI, "frobnicate": 1, "zap": 2}, lenient=True) == chat({"messages": HI})
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring unrecognized request arguments: 'frobnicate', 'zap'"]


def test_a_batch_of_string_prompts_splits_into_string_prompts():
    _, second, third = completion({"prompt": ["a", "b", [5]]}).split()
    assert (second.prompt, second.prompt_token_ids) == ("b", None)
    assert second.item("i") == {"id": "i", "prompt": "b", "model": "tiny", "metadata": {}, "headers": {}}
    assert (third.prompt, third.prompt_token_ids) == (None, (5,))


def test_a_chat_item_says_whether_tool_calls_may_run_in_parallel():
    req = chat({"messages": HI, "tools": [TOOL], "parallel_tool_calls": False})
    assert req.item("i")["parallel_tool_calls"] is False


def test_min_tokens_above_max_tokens_is_refused_naming_min_tokens():
    """vLLM refuses min_tokens > max_tokens (400); so do agp serve bodies and agp run lines."""
    from pipeline_dsl.requests_io import RequestError, parse_request

    e = refused(completion, {"prompt": "hi", "max_tokens": 5, "min_tokens": 10})
    assert e.param == "min_tokens" and "'min_tokens' = 10 is above 'max_tokens' = 5" in e.message
    e = refused(chat, {"messages": HI, "max_completion_tokens": 3, "min_tokens": 4})
    assert e.param == "min_tokens" and "'max_completion_tokens' = 3" in e.message
    assert completion({"prompt": "hi", "max_tokens": 5, "min_tokens": 5}).fields["min_tokens"] == 5
    assert completion({"prompt": "hi", "min_tokens": 500}).fields["min_tokens"] == 500      # the stage's max cuts it
    with pytest.raises(RequestError) as err:
        parse_request({"prompt": "hi", "max_tokens": 2, "min_tokens": 3})
    assert err.value.param == "min_tokens"


def test_a_completions_default_max_tokens_is_set_as_if_sent_and_bounds_min_tokens():
    """parse_completion's default_max_tokens (agp serve MODEL's 16) is the max_tokens of a body that
    sets none (or sets null), checked against min_tokens as a sent one is, with an error that says where
    it comes from; a sent max_tokens wins, a scored prompt (echo, max_tokens 0) takes none, and the
    default is not bounded by the context as a sent max_tokens is (the engine cuts at the context)."""
    def defaulted(obj, max_model_len=512):
        return P.parse_completion(obj, max_model_len=max_model_len, served=SERVED, default_max_tokens=16)

    assert defaulted({"prompt": "hi"}).fields["max_tokens"] == 16
    assert defaulted({"prompt": "hi", "max_tokens": None}).fields["max_tokens"] == 16
    assert defaulted({"prompt": "hi", "max_tokens": 40, "min_tokens": 30}).fields["max_tokens"] == 40
    assert defaulted({"prompt": "hi", "min_tokens": 16}).fields["min_tokens"] == 16
    assert defaulted({"prompt": "hi", "echo": True, "max_tokens": 0, "min_tokens": 20}).fields["max_tokens"] == 0
    assert defaulted({"prompt": "hi"}, max_model_len=8).fields["max_tokens"] == 16
    e = refused(defaulted, {"prompt": "hi", "min_tokens": 20})
    assert e.status == 400 and e.param == "min_tokens"
    assert e.message == ("'min_tokens' = 20 is above 'max_tokens' = 16, the completions default where a request sets "
                         "none: an answer cannot be longer than max_tokens allows (give max_tokens >= min_tokens)")
    e = refused(defaulted, {"prompt": "hi", "max_tokens": 16, "min_tokens": 20})      # sent: no default to name
    assert e.message == ("'min_tokens' = 20 is above 'max_tokens' = 16: an answer cannot be longer than max_tokens "
                         "allows (give min_tokens <= max_tokens)")
    assert "max_tokens" not in completion({"prompt": "hi"}).fields          # no default: the stage's


@pytest.mark.parametrize("kind, status, code, retry_after", [
    ("invalid", 400, None, False),
    ("rejected", 400, "rejected", False),            # a python stage's Reject
    ("queue_full", 429, "queue_full", True),
    ("unavailable", 503, "unavailable", True),       # draining, an engine failed, a stage's transient failure
    ("aborted", 499, "aborted", False),
    ("timeout", 504, "stage_timeout", False),        # a stage's own timeout passed
    ("failed", 500, "stage_failed", False),          # a user function raised
])
def test_each_way_the_pipeline_fails_a_request_is_the_documented_http_answer(kind, status, code, retry_after):
    """docs/serve.md, "Errors": the status, code and Retry-After of each PipelineError kind;
    an input error names the prompt or the field (`param`); a Reject, a failure and a stage's
    timeout name no field (`param` null: OpenAI clients read it as the request's field at fault)
    and their stage in the error's `stage` (a failure's `param` was its stage), as a stage's transient
    failure (unavailable) does."""
    from pipeline_dsl.flow import PipelineError
    from pipeline_dsl.serve.errors import api_error

    err = api_error(PipelineError("why", kind, stage="guard"), "chat", retry_after_s=3)
    assert (err.status, err.code, err.message) == (status, code, "why")
    assert err.headers == ({"Retry-After": "3"} if retry_after else {})
    assert err.param == {"invalid": "messages"}.get(kind)
    assert err.body()["error"].get("stage") == ("guard" if kind in ("rejected", "failed", "timeout", "unavailable")
                                                else None)


@pytest.mark.parametrize("kind, max_tokens_field, param, sent", [
    ("chat", "max_tokens", "metadata.tenant", "metadata.tenant"),
    ("chat", "max_completion_tokens", "max_tokens", "max_completion_tokens"),   # the field the client wrote
    ("responses", "max_output_tokens", "max_tokens", "max_output_tokens"),
    ("responses", "max_output_tokens", "messages", "input"),
    ("completions", "max_tokens", None, None),
])
def test_a_rejects_own_param_and_code_are_the_answers_as_the_client_named_the_field(kind, max_tokens_field,
                                                                                    param, sent):
    """docs/language.md, python stages: Reject(..., param=, code=) are the error's `param` and
    `code` (the field named as the client sent it: a Responses request's `input`, not the chat
    `messages` it runs as); the stage is the error's `stage`, and a 5xx is a server_error."""
    from pipeline_dsl.flow import PipelineError
    from pipeline_dsl.serve.errors import api_error

    e = PipelineError("no", "rejected", stage="gate", code="over_budget" if param else None, param=param)
    body = api_error(e, kind, max_tokens_field=max_tokens_field).body()["error"]
    assert body == {"message": "no", "type": "invalid_request_error", "param": sent,
                    "code": "over_budget" if param else "rejected", "stage": "gate"}
    err = api_error(PipelineError("down", "rejected", stage="gate", status=503, retry_after=1.5), kind)
    assert (err.status, err.type, err.code, err.headers) == (503, "server_error", "rejected", {"Retry-After": "2"})


def test_a_request_id_of_1_to_128_printable_characters_is_taken():
    """docs/openai.md, request_id: 1 to 128 printable ASCII characters without spaces."""
    assert chat({"messages": HI, "request_id": "r" * 128}).request_id == "r" * 128
    assert completion({"prompt": "hi", "request_id": "~"}).request_id == "~"
    for bad in ("r" * 129, "", "a b", "é"):
        assert refused(chat, {"messages": HI, "request_id": bad}).param == "request_id"


@pytest.mark.parametrize("field, neutral, other", [
    ("echo", False, True), ("add_special_tokens", False, True), ("documents", None, [{"text": "x"}]),
])
def test_a_chat_field_served_only_at_its_neutral_value_refuses_any_other(field, neutral, other):
    """docs/openai.md, chat: `echo: false`, `add_special_tokens: false` (the chat template writes
    the special tokens), `documents: null`; any other value is a 400 naming the field."""
    assert chat({"messages": HI, field: neutral}) == chat({"messages": HI})
    e = refused(chat, {"messages": HI, field: other})
    assert (e.status, e.param) == (400, field) and "is not supported by agp" in e.message


def test_truncate_prompt_tokens_minus_one_keeps_the_whole_context():
    """docs/openai.md: truncate_prompt_tokens keeps the prompt's last k tokens, -1 the context's
    worth: a prompt within the context keeps every token."""
    req = completion({"prompt": [5, 6, 7], "truncate_prompt_tokens": -1})
    assert req.fields["truncate_prompt_tokens"] == 512 and req.prompt_token_ids == (5, 6, 7)
    assert completion({"prompt": [5, 6, 7], "truncate_prompt_tokens": 2}).prompt_token_ids == (6, 7)
    assert chat({"messages": HI, "truncate_prompt_tokens": -1}).fields["truncate_prompt_tokens"] == 512


# ---------------------------------------------------------------- the end user's ids reach the item

def test_user_and_safety_identifier_reach_the_request_a_stage_sees():
    """docs/openai.md: `user` and `safety_identifier` are the end user's ids a pipeline splits
    traffic or routes by: chat, completions, the Responses API and an `agp run` line all put them
    on the request item (python stages and conditions read it); left out, the item has neither."""
    from pipeline_dsl.requests_io import parse_request
    from pipeline_dsl.serve.responses import parse_responses

    ids = {"user": "alice", "safety_identifier": "s-9"}
    item = chat({"model": "tiny", "messages": HI, **ids}).item("r")
    assert (item["user"], item["safety_identifier"]) == ("alice", "s-9")
    assert completion({"model": "tiny", "prompt": "hi", "user": "bob"}).item("r")["user"] == "bob"
    assert [r.item("r")["user"] for r in completion({"model": "tiny", "prompt": ["a", "b"], "user": "bob"}).split()] \
        == ["bob", "bob"]
    call = parse_responses({"model": "tiny", "input": "hi", **ids}, max_model_len=512, served=SERVED)
    assert {k: call.req.item("r")[k] for k in ids} == ids
    line = parse_request({"id": 1, "prompt": "hi", **ids}).item()
    assert {k: line[k] for k in ids} == ids
    assert not {"user", "safety_identifier"} & set(chat({"model": "tiny", "messages": HI}).item("r"))
    assert not {"user", "safety_identifier"} & set(parse_request({"prompt": "hi"}).item())
    assert refused(chat, {"model": "tiny", "messages": HI, "user": 5}).param == "user"


def test_a_request_line_carries_headers_as_agp_serve_copies_them():
    """docs/language.md: the request a python stage sees has `headers` ({} on a line that gives
    none), so a stage reads item["headers"].get("x-tenant") under agp run and agp serve alike;
    a line (or a request a stage hands back) may give them, checked as agp serve bounds them."""
    from pipeline_dsl.requests_io import MAX_HEADER_VALUE, MAX_HEADERS, RequestError, parse_request

    assert parse_request({"prompt": "hi"}).item()["headers"] == {}
    assert parse_request({"prompt": "hi", "headers": {"x-tenant": "acme"}}).item()["headers"] == {"x-tenant": "acme"}
    for bad, words in [([1], "'headers' must be an object"), ({"X-Tenant": "a"}, "lower-case HTTP token"),
                       ({"x-tenant": 5}, "'headers.x-tenant' must be a string"),
                       ({"x-tenant": "t" * (MAX_HEADER_VALUE + 1)}, f"at most {MAX_HEADER_VALUE} characters"),
                       ({f"h{i}": "v" for i in range(MAX_HEADERS + 1)}, f"at most {MAX_HEADERS}")]:
        with pytest.raises(RequestError, match=words):
            parse_request({"prompt": "hi", "headers": bad})
    # a name written as HTTP writes it ("X-Tenant") is told the spelling to use; one no casing mends is not
    with pytest.raises(RequestError, match='write "x-tenant", as agp serve hands a header over'):
        parse_request({"prompt": "hi", "headers": {"X-Tenant": "a"}})
    with pytest.raises(RequestError) as bad_name:
        parse_request({"prompt": "hi", "headers": {"x tenant": "a"}})
    assert "write" not in str(bad_name.value)


def test_chat_messages_reach_the_template_with_their_names_calls_and_tool_results():
    """What a chat template may read of a message is kept: a message's `name`, an assistant's
    refusal part as its text, an assistant's earlier `tool_calls` (content null is ""), each call
    with its id (call_<i> where the client gave none) and its arguments as a JSON string, and a
    tool result's `tool_call_id`."""
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
             {"type": "function", "function": {"name": "g", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "hi", "name": "ann"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert chat({"messages": messages}).item("r")["messages"] == [
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "I can't."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "call_1", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"}]


def test_a_refusal_part_is_an_assistant_message_s_only():
    e = refused(chat, {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]})
    assert e.param == "messages[0].content" and "a refusal part: an assistant message's" in e.message


def test_an_empty_message_is_taken_beside_one_with_text_and_refused_when_all_are_empty():
    req = chat({"messages": [{"role": "system", "content": ""}, *HI]})
    assert req.item("r")["messages"] == [{"role": "system", "content": ""}, *HI]
    e = refused(chat, {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " "}]})
    assert (e.message, e.param) == ("every message in 'messages' is empty", "messages")


@pytest.mark.parametrize("kind", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                                  {"type": "json_schema", "schema": {}}])
def test_a_response_format_keeps_its_own_json_options(kind):
    """compact and close_objects (what structured_outputs' disable_any_whitespace and
    disable_additional_properties set, carried by a request item a python stage hands back) are kept."""
    from pipeline_dsl.requests_io import parse_response_format

    spec = parse_response_format({**kind, "compact": True, "close_objects": False})
    assert spec["compact"] is True and spec["close_objects"] is False
    assert "compact" not in parse_response_format({**kind, "compact": "yes"})


def test_continuous_usage_stats_take_effect_where_the_stream_asks_for_usage():
    """vLLM's stream_options.continuous_usage_stats puts the usage so far on every chunk where the
    stream asks for usage at all (include_usage); alone it asks for both, as vLLM's StreamOptions
    default include_usage to true (it changed nothing: a vLLM client sending it alone got no usage)."""
    def usage(options):
        req = chat({"messages": HI, "stream": True, "stream_options": options})
        return req.include_usage, req.continuous_usage

    assert usage({"include_usage": True, "continuous_usage_stats": True}) == (True, True)
    assert usage({"continuous_usage_stats": True}) == (True, True)
    assert usage({"include_usage": False, "continuous_usage_stats": True}) == (False, False)
    assert usage({"include_usage": None, "continuous_usage_stats": True}) == (False, False)
    assert usage({"include_usage": True}) == (True, False)
    assert usage({"continuous_usage_stats": False}) == (False, False)


def test_logit_bias_takes_minus_100_to_100_inclusive_and_refuses_beyond():
    assert chat({"messages": HI, "logit_bias": {"5": 100, "6": -100}}).fields["logit_bias"] == {5: 100.0, 6: -100.0}
    e = refused(chat, {"messages": HI, "logit_bias": {"5": 100.5}})
    assert e.param == "logit_bias" and "from -100 to 100" in e.message

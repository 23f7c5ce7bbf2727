"""The OpenAI wire format at its edges, without a server: each error names its field and shows
the value it got (the JSON type, at most 40 characters of it), and the answer bodies are the
exact objects OpenAI clients parse (chat and completion answers, stream chunks, usage)."""
from __future__ import annotations

import json

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
    (1, "'stream' must be true or false, not a number (1)"),
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
    assert (e.message, e.param) == ("'prompt' must be a non-empty string, not null (null)", "prompt")


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


# ---------------------------------------------------------------- tool calls in an answer

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_a_chat_answer_with_tools_turns_a_call_into_tool_calls():
    use = P.usage(5, 7, 0)
    body = P.chat_response("r1", "tiny", [(0, "Let me look. " + CALL, "stop")], use, created=11, tools_active=True)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["index"] == 0 and choice["logprobs"] is None
    message = choice["message"]
    assert set(message) == {"role", "content", "tool_calls"}
    assert message["role"] == "assistant" and message["content"] == "Let me look."
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body == {"id": "r1", "object": "chat.completion", "created": 11, "model": "tiny",
                    "choices": [choice], "usage": use}


def test_a_chat_answer_without_tools_keeps_a_call_as_text():
    body = P.chat_response("r1", "tiny", [(0, CALL, "length")], P.usage(1, 2, 0), created=3)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": CALL},
                                "logprobs": None, "finish_reason": "length"}]
    message, reason = P.chat_message("plain text", "stop", tools_active=True)
    assert (message, reason) == ({"role": "assistant", "content": "plain text"}, "stop")


# ---------------------------------------------------------------- answer bodies, exactly

def test_usage_counts_total_as_prompt_plus_completion_and_lists_cached():
    assert P.usage(9, 4, 8) == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
                                "prompt_tokens_details": {"cached_tokens": 8}}


@pytest.mark.parametrize("kind, obj", [("chat", "chat.completion.chunk"), ("completion", "text_completion")])
def test_the_usage_chunk_is_the_last_chunk_with_no_choices(kind, obj):
    use = P.usage(3, 2, 0)
    assert P.usage_chunk("r9", "tiny", 42, kind, use) == {
        "id": "r9", "object": obj, "created": 42, "model": "tiny", "choices": [], "usage": use}


def test_chat_and_completion_chunks_carry_their_choice_index_delta_and_logprobs():
    lp = {"content": []}
    assert P.chat_chunk("r1", "tiny", 7, {"content": "hé"}, None, 2, lp) == {
        "id": "r1", "object": "chat.completion.chunk", "created": 7, "model": "tiny",
        "choices": [{"index": 2, "delta": {"content": "hé"}, "logprobs": lp, "finish_reason": None}]}
    assert P.chat_chunk("r1", "tiny", 7, {}, "stop")["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert P.completion_chunk("r2", "tiny", 8, "ab", "length", 3, None) == {
        "id": "r2", "object": "text_completion", "created": 8, "model": "tiny",
        "choices": [{"index": 3, "text": "ab", "logprobs": None, "finish_reason": "length"}]}
    assert P.completion_chunk("r2", "tiny", 8, "", "stop")["choices"] == [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]


def test_a_completion_answer_lists_its_choices_in_order_with_usage():
    use = P.usage(2, 3, 1)
    lp = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [None], "text_offset": [0]}
    assert P.completion_response("c1", "tiny", [(0, "a", "stop", lp), (1, "b", "length")], use, created=5) == {
        "id": "c1", "object": "text_completion", "created": 5, "model": "tiny",
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
    e = refused(chat, {"messages": HI, "logprobs": True, "top_logprobs": 21})
    assert (e.message, e.param) == ("'top_logprobs' must be an integer from 0 to 20, not a number (21)",
                                    "top_logprobs")
    e = refused(chat, {"messages": HI, "top_logprobs": 2})
    assert (e.message, e.param) == ("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    e = refused(chat, {"messages": HI, "logprobs": 1})
    assert (e.message, e.param) == ("'logprobs' must be true or false, not a number (1)", "logprobs")


@pytest.mark.parametrize("extra, message, param", [
    ({"metadata": [1]}, "'metadata' must be an object, not an array ([1])", "metadata"),
    ({"tools": 5}, "'tools' must be an array of tools, not 5", "tools"),
    ({"tools": [TOOL], "tool_choice": "maybe"},
     '\'tool_choice\' must be none, auto, required or {"type": "function", "function": {"name"}}, not "maybe"',
     "tool_choice"),
    ({"chat_template_kwargs": {"messages": []}},
     "'chat_template_kwargs.messages' is set by agp itself; send it as its own field", "chat_template_kwargs"),
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
